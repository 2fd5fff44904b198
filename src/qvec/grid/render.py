"""What reports are made of: titled tables that render to Markdown and CSV, and figures saved as PNG and SVG
through matplotlib's Agg backend (imported on first use: it is slow to import)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path


@dataclass
class Table:
    """A titled table that renders to Markdown and CSV. Cells are strings or numbers (floats shown at 1 dp)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""
    digits: int = 1
    #: per-column format specs for Markdown (None: ``digits`` decimals); CSV keeps the numbers
    formats: list[str | None] | None = None

    def _fmt(self, v, col: int) -> str:
        if isinstance(v, float):
            spec = (self.formats or [None] * len(self.columns))[col] or f".{self.digits}f"
            return "–" if math.isnan(v) else format(v, spec)
        return str(v)

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|"
        body = ["| " + " | ".join(self._fmt(v, i) for i, v in enumerate(row)) + " |" for row in self.rows]
        note = f"\n\n{self.note}" if self.note else ""
        return "\n".join([f"**{self.title}**", "", head, sep, *body]) + note

    def write(self, out_dir: Path) -> list[Path]:
        md, cs = out_dir / f"{self.name}.md", out_dir / f"{self.name}.csv"
        with atomic_path(md) as tmp:
            tmp.write_text(self.markdown() + "\n")
        with atomic_path(cs) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            for row in self.rows:
                w.writerow(["" if isinstance(v, float) and math.isnan(v) else
                            (round(v, 4) if isinstance(v, float) else v) for v in row])
        return [md, cs]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"{name}.{ext}"
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=ext, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(p)
    _plt().close(fig)
    return paths

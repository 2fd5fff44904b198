"""What reports are made of: titled tables that render to Markdown and CSV, figures saved as PNG and SVG
through matplotlib's Agg backend (imported on first use: it is slow to import), and the registry of the tables
and figures a report shows (:func:`register_figure`, :func:`register_table`), which ``write_report`` walks."""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qvec.core.atomic import atomic_path
from qvec.core.errors import QvecError
from qvec.core.registry import Registry


def nanmean(xs) -> float:
    """Mean of the values that are not NaN (a missing cell), NaN when none is."""
    v = [x for x in xs if not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


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


def pyplot():
    """matplotlib.pyplot on the Agg backend (reports are files, never windows)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    matplotlib.rcParams["svg.hashsalt"] = "qvec"  # stable element ids: a report is a pure function of its database
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """Write a figure as PNG and SVG and close it."""
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"{name}.{ext}"
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=ext, dpi=150 if ext == "png" else None, bbox_inches="tight",
                        metadata={"Date": None} if ext == "svg" else None)
        paths.append(p)
    pyplot().close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ registry
#: The report's sections, in page order: the summary (study-wide), one per bit-width, and the cost section.
SCOPES = ("study", "bits", "cost")


@dataclass
class ReportPart:
    """One registered table or figure of the report: what makes it, which section it goes in, and where.

    A figure's ``fn`` is ``fn(data, out_dir)`` (``fn(data, bits, out_dir)`` in the per-bit-width section) and
    returns the paths it saved (none: the figure is left out); a table's is ``fn(data)`` (``fn(data, bits)``) and
    returns a :class:`Table`, a list of them, or None. ``title`` is a figure's caption (``{bits}`` is filled in).
    """

    name: str
    kind: str
    fn: Callable
    scope: str
    order: float
    title: str = ""
    seq: int = 0

    def caption(self, bits: int | None = None) -> str:
        return self.title.format(bits=bits) if bits is not None else self.title


#: every table and figure a report may show, as ``table:NAME`` / ``figure:NAME``; built-ins register on import
REPORT_PARTS: Registry[ReportPart] = Registry(
    "report item", builtins=("qvec.grid.report_tables", "qvec.grid.report_figures", "qvec.grid.report_pipelines"))
_SEQ = itertools.count()


def _register(kind: str, name: str, scope: str, order: float, title: str) -> Callable[[Callable], Callable]:
    if scope not in SCOPES:
        raise QvecError(f"report {kind} {name!r}: scope must be one of {', '.join(SCOPES)}, not {scope!r}")

    def deco(fn: Callable) -> Callable:
        if f"{kind}:{name}" in REPORT_PARTS.registered():
            raise QvecError(f"a report {kind} named {name!r} is already registered")
        REPORT_PARTS.register(f"{kind}:{name}", ReportPart(name, kind, fn, scope, order, title, next(_SEQ)))
        return fn

    return deco


def register_figure(name: str, *, title: str, scope: str = "study", order: float = 100.0):
    """Decorator: put a figure in the report, section ``scope`` ("study", "bits" or "cost"), sorted by ``order``
    among that section's tables and figures (ties: registration order)."""
    return _register("figure", name, scope, order, title)


def register_table(name: str, *, scope: str = "study", order: float = 100.0):
    """Decorator: put a table (or a list of tables, or None for none) in the report; see :func:`register_figure`."""
    return _register("table", name, scope, order, "")


def _unregister(kind: str, name: str) -> None:
    if f"{kind}:{name}" not in REPORT_PARTS.registered():
        raise QvecError(f"no report {kind} named {name!r} is registered")
    REPORT_PARTS.unregister(f"{kind}:{name}")


def unregister_figure(name: str) -> None:
    _unregister("figure", name)


def unregister_table(name: str) -> None:
    _unregister("table", name)


def report_parts(scope: str) -> list[ReportPart]:
    """The tables and figures of one section, in page order."""
    return sorted((p for _, p in REPORT_PARTS.items() if p.scope == scope), key=lambda p: (p.order, p.seq))

"""Reports: the paper's tables and figures (SPEC section 7) from a results database, on one page.

``write_report(db, out_dir)`` writes ``report.md`` with a summary section (headline numbers, what RTN costs, the
study-wide figures), one section per bit-width of the study (the informative one first: tables and heatmaps of
the transfer Delta, recovery, the lambda rules and the PTQ pipelines), and a cost section. Tables are Markdown and
CSV, figures PNG and SVG (matplotlib, Agg).

The page walks the registered tables and figures of each section (:func:`~qvec.grid.render.register_table`,
:func:`~qvec.grid.render.register_figure`); the study is loaded by :mod:`qvec.grid.report_data`, the tables are
in :mod:`qvec.grid.report_tables` and the figures in :mod:`qvec.grid.report_figures`. Everything is computed from
the rows of one study, so the report is a pure function of the database.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from qvec.core.atomic import file_kind, make_folder
from qvec.core.checkpoint import atomic_path
from qvec.core.errors import QvecError
from qvec.grid.lock import run_status
from qvec.grid.render import Table, register_figure, register_table, report_parts, unregister_figure, unregister_table
from qvec.grid.report_data import (
    NAN,
    SEL,
    ZS,
    Pair,
    StudyData,
    load_study,
    pooled_recovery,
)
from qvec.grid.report_data import _median_lambda as _median_lambda  # tests
from qvec.grid.report_figures import bars_figure, heatmap_figure, lambda_figure, ptq_loss_figure, radar_figure
from qvec.grid.report_pipelines import pipelines_figure, which_pipeline_tables
from qvec.grid.report_rules import MIN_GAP_POINTS
from qvec.grid.report_tables import (
    baseline_table,
    cost_table,
    ptq_loss_table,
    ptq_verdict,
    recovery_table,
    summary_table,
    wise_table,
)
from qvec.grid.store import ResultStore

__all__ = [
    "MIN_GAP_POINTS", "NAN", "SEL", "ZS", "Pair", "StudyData", "bars_figure", "baseline_table",
    "cost_table", "heatmap_figure", "lambda_figure", "load_study", "partial_note", "pooled_recovery",
    "print_summary", "pipelines_figure", "ptq_loss_figure", "ptq_loss_table", "ptq_verdict", "radar_figure",
    "recovery_table", "register_figure", "register_table", "summary_table", "unregister_figure", "unregister_table",
    "which_pipeline_tables", "wise_table", "write_report",
]


def _rel(paths: Sequence[Path], ext: str = ".png") -> str | None:
    for p in paths:
        if p.suffix == ext:
            return p.name
    return None


def _header(data: StudyData, preamble: str) -> list[str]:
    """The page's title, the preamble and the study's settings."""
    md: list[str] = [f"# {data.study}: quantization-vector transfer report", ""]
    if preamble:
        md += [preamble.strip(), ""]
    cfg = data.config
    profile = f" (recipe profile `{cfg['profile']}`)" if cfg.get("profile") else ""
    if "pipelines" in cfg:
        quant = ", ".join(f"`{q[1]}`" for _, q in sorted(data.quantizer.items()))
        what = f"pipeline `{data.view[0]}` ({quant}), vector coverage `{data.view[1]}`"
    else:
        what = (f"{cfg.get('granularity', 'channel')} {'symmetric' if cfg.get('symmetric', True) else 'asymmetric'} "
                "RTN")
    return md + [
        f"- Model `{data.model}`{profile}, backbone `{cfg.get('backbone', '?')}`, {len(data.donors)} donors x "
        f"{len(data.receivers)} receivers, bits {data.bits}, {what}, seeds: {data.seeds}.",
        f"- λ grid {cfg.get('lambdas')}; **λ = 1 is zero-shot** (no receiver data); **λ\\* is chosen per pair on the "
        "receiver's validation split and reported on test: it uses receiver data**.",
        f"- Evaluation limits: validation {cfg.get('eval', {}).get('val_limit') or 'all'} images, "
        f"test {cfg.get('eval', {}).get('test_limit') or 'all'} images per receiver.",
        "- All numbers are top-1 on the receiver's test split, in %; Δ in points over FT+PTQ.",
        "",
    ]


def _section(data: StudyData, scope: str, out: Path, bits: int | None = None) -> list[str]:
    """Write the registered tables and figures of one section, in order; returns its Markdown."""
    md: list[str] = []
    for part in report_parts(scope):
        args = (data,) if bits is None else (data, bits)
        if part.kind == "figure":
            paths = part.fn(*args, out)
            png = _rel(paths)
            if png:
                title = part.caption(bits)
                md.extend([f"![{title}]({png})", "", f"*{title}* ([SVG]({_rel(paths, '.svg')}))", ""])
            continue
        made = part.fn(*args)
        for t in [made] if isinstance(made, Table) else made or []:
            t.write(out)
            md.extend([t.markdown(), "", f"([{t.name}.csv]({t.name}.csv))", ""])
    return md


def write_report(db: str | os.PathLike, out_dir: str | os.PathLike, study: str | None = None,
                 preamble: str = "") -> Path:
    """Write every table and figure of a study (default: the most recent) and ``report.md``; returns its path.

    The page is the study's primary pipeline (the paper's tables), with the cross-pipeline tables in its summary
    when the study has several; every other (pipeline, coverage) view gets a page of its own under ``views/``."""
    out = Path(out_dir)
    with ResultStore(db, create=False) as store:
        data = load_study(store, study)
    if not data.bits:
        raise QvecError(f"study {data.study!r} has no quantized results yet")
    note = partial_note(db, data.study)
    if out.exists() and not out.is_dir():
        raise QvecError(f"{out}: is {file_kind(out) or 'a file'}, not a folder; the report is a folder of tables "
                        "and figures (give a new or existing folder with -o)")
    make_folder(out)
    md = _header(data, preamble)
    if note:
        md[1:1] = ["", f"> **Partial report.** {note}"]
    lead, verdict = ptq_verdict(data)
    md += ["## Summary", "", verdict, ""]
    md += _section(data, "study", out)
    md += _bits_sections(data, lead, out)
    md += ["## Cost", ""]
    md += _section(data, "cost", out)
    if data.siblings:
        md += ["## Other pipelines and coverages", ""]
        for v, view in data.siblings.items():
            page = _view_page(view, out / "views" / f"{v[0]}-{v[1]}", preamble)
            md.append(f"- [{v[0]}, vector coverage {v[1]}]({page.relative_to(out).as_posix()})")
        md.append("")
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(md))
    return path


def _bits_sections(data: StudyData, lead: int, out: Path) -> list[str]:
    md: list[str] = []
    for b in [lead, *[b for b in data.bits if b != lead]]:
        md += [f"## {b}-bit", ""]
        md += _section(data, "bits", out, b)
    return md


def _view_page(view: StudyData, out: Path, preamble: str) -> Path:
    """One (pipeline, coverage) view's own page: its per-bit-width tables and figures."""
    out.mkdir(parents=True, exist_ok=True)
    md = _header(view, preamble)
    if view.bits:
        md += _bits_sections(view, ptq_verdict(view)[0], out)
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(md))
    return path


def partial_note(db: str | os.PathLike, study: str | None = None) -> str | None:
    """One line when ``study`` (default: the latest) is still being run (its lock is held): the report is
    partial, with its progress."""
    if study is None:
        with ResultStore(db, create=False) as store:
            study = store.resolve_study(None)
    info = run_status(db, study)
    if info is None:
        return None
    return (f"study {study!r} is still running ({info.who()}): this report is partial, {info.cells_done} of "
            f"{info.cells_total} cells done")


def print_summary(db: str | os.PathLike, study: str | None = None,
                  echo: Callable[[str], None] = print) -> StudyData:
    """Echo the headline table of a study (what ``qvec demo`` prints)."""
    with ResultStore(db, create=False) as store:
        data = load_study(store, study)
    echo(summary_table(data).markdown())
    return data

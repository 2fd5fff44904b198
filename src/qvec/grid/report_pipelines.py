"""The deployment question of a report: which pipeline to run for the data and the bits a user has.

Every view of a study (a pipeline, alone or with its matched vector at one coverage; :mod:`qvec.grid.report_data`)
becomes rows of one table per bit-width: mean test top-1 over receivers, its distance to the FT float model, the
storage cost in bits per weight, and the receiver-side data the row needed: none, generic images (a calibration
or probe set that is not the receiver's), the receiver's unlabeled inputs, or its labels (lambda*, QAT). The
``answer`` table keeps, per data budget, the best row that needs no more than it; the figure plots accuracy
against bits per weight, coloured by the same data classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qvec.grid.render import Table, nanmean, pyplot, register_figure, register_table, save_figure
from qvec.grid.report_data import NAN, StudyData, study_rules_domain
from qvec.vectors.rules import MEAN_DONOR
from qvec.vectors.signals import USES_GENERIC, USES_INPUTS, USES_LABELS, USES_NOTHING

#: the data classes, from least to most receiver-side data
DATA_ORDER = (USES_NOTHING, USES_GENERIC, USES_INPUTS, USES_LABELS)
COLOURS = {USES_NOTHING: "#1b9e77", USES_GENERIC: "#7570b3", USES_INPUTS: "#d95f02", USES_LABELS: "#e7298a"}


@dataclass(frozen=True)
class PipelineRow:
    """One way to deploy at one bit-width, averaged over receivers (patched rows: over single donors first)."""

    pipeline: str
    vector: str
    uses: str
    bits: int
    bits_per_weight: float
    acc: float
    float_acc: float
    worst: float

    @property
    def gap(self) -> float:
        return self.acc - self.float_acc


def calibration_uses(quant_label: str) -> str:
    """The data a quantizer reads, from its label (``gptq-w3-... calib=receiver:128``)."""
    if " calib=" not in quant_label:
        return USES_NOTHING
    source = quant_label.split(" calib=", 1)[1].rsplit(":", 1)[0]
    return {"receiver": USES_INPUTS, "noise": USES_NOTHING}.get(source, USES_GENERIC)


def _more(a: str, b: str) -> str:
    return max(a, b, key=DATA_ORDER.index)


def _row(view: StudyData, vector: str, uses: str, bits: int, per_receiver: Mapping[str, float]) -> PipelineRow:
    floats = {r: view.base("ft", r) for r in view.receivers}
    gaps = [a - floats[r] for r, a in per_receiver.items() if not math.isnan(a)]
    return PipelineRow(view.view[0], vector, uses, bits, view.quantizer.get(bits, (NAN, "", 0.0))[0],
                       nanmean(per_receiver.values()), nanmean(floats.values()), min(gaps) if gaps else NAN)


def _donor_mean(values: Sequence[tuple[str, str, float]], receiver: str) -> float:
    return nanmean(a for d, r, a in values if r == receiver and d not in (receiver, MEAN_DONOR))


def view_rows(view: StudyData, bits: int, alone: bool = True) -> list[PipelineRow]:
    """The rows of one view at ``bits``: alone (and its QAT ceiling) when ``alone``, then with its vector at
    lambda = 1, at lambda* and at the study's first label-free rule."""
    if bits not in view.bits:
        return []
    base = calibration_uses(view.quantizer[bits][1])
    rows = []
    if alone:
        rows.append(_row(view, "–", base, bits, {r: view.base("ft_ptq", r, bits) for r in view.receivers}))
    pairs = [(p.donor, p.receiver, p) for p in view.pairs_at(bits)]
    if pairs:
        cov = view.view[1]
        for label, attr, uses in ((f"λ=1 ({cov})", "acc_one", base), (f"λ* ({cov})", "acc_star", USES_LABELS)):
            vals = [(d, r, getattr(p, attr)) for d, r, p in pairs]
            rows.append(_row(view, label, uses, bits, {r: _donor_mean(vals, r) for r in view.receivers}))
        rules, _ = study_rules_domain(view)
        free = [r for r in rules if r.zero_shot and r.metric is not None]
        if free:
            rule = free[0]
            vals = [(o.donor, o.receiver, o.acc) for o in view.outcomes if o.bits == bits and o.rule == rule.name]
            if vals:
                rows.append(_row(view, f"{rule.name} ({cov})", _more(base, rule.uses), bits,
                                 {r: _donor_mean(vals, r) for r in view.receivers}))
    if alone:
        rows.append(_row(view, "own QAT", USES_LABELS, bits, {r: view.base("qat_ptq", r, bits)
                                                              for r in view.receivers}))
    return [r for r in rows if not math.isnan(r.acc)]


def pipeline_rows(data: StudyData, bits: int) -> list[PipelineRow]:
    """Every view's rows at ``bits`` (a pipeline's alone rows once, with its first coverage)."""
    out, seen = [], set()
    for v in data.views:
        view = data.siblings.get(v, data)
        out += view_rows(view, bits, alone=v[0] not in seen)
        seen.add(v[0])
    return out


def _table_rows(rows: Sequence[PipelineRow]) -> list[list]:
    return [[r.pipeline, r.vector, r.uses, r.bits_per_weight, r.acc, r.gap, r.worst] for r in rows]


_COLS = ["Pipeline", "Vector", "Receiver data", "Bits/weight", "Top-1", "Δ to float", "Worst receiver Δ"]
_FORMATS = [None, None, None, ".2f", ".1f", "+.1f", "+.1f"]


@register_table("which_pipeline", scope="study", order=15)
def which_pipeline_tables(data: StudyData) -> list[Table]:
    """Per bit-width: every pipeline, alone and with its vector, sorted by the data it needs; then the answer."""
    if len({v[0] for v in data.views}) < 2:
        return []
    out = []
    for bits in sorted(data.bits, reverse=True):
        rows = sorted(pipeline_rows(data, bits), key=lambda r: (DATA_ORDER.index(r.uses), -r.acc))
        if not rows:
            continue
        out.append(Table(
            f"pipelines_w{bits}", f"Every pipeline at {bits}-bit: mean test top-1 (%) over receivers", _COLS,
            _table_rows(rows),
            "Vector rows add the donor's matched vector (mean over single donors, self-pairs out) at λ = 1, at λ* "
            "(chosen on the receiver's labelled validation split) or at the study's first label-free rule; the "
            "coverage is in brackets. Receiver data: what the row needs from the receiver (generic images are "
            "not the receiver's). Bits/weight counts codes, scales and zero points over the quantized weights.",
            formats=_FORMATS))
        out.append(answer_table(rows, bits))
    return out


def answer_table(rows: Sequence[PipelineRow], bits: int) -> Table:
    """Per data budget, the best row that needs no more receiver data than it."""
    best = []
    for i, uses in enumerate(DATA_ORDER):
        allowed = [r for r in rows if DATA_ORDER.index(r.uses) <= i]
        if allowed:
            r = max(allowed, key=lambda r: r.acc)
            best.append([uses, r.pipeline, r.vector, r.bits_per_weight, r.acc, r.gap, r.worst])
    return Table(f"answer_w{bits}", f"What to run at {bits}-bit, by the receiver data you have",
                 ["You have", "Pipeline", "Vector", "Bits/weight", "Top-1", "Δ to float", "Worst receiver Δ"], best,
                 "Each line: the most accurate row of the table above that needs no more receiver data.",
                 formats=_FORMATS)


@register_figure("pipelines_bpw", title="Top-1 against bits per weight, by the receiver data each pipeline needs",
                 order=15)
def pipelines_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """Mean test top-1 against bits per weight: one point per row of the pipeline tables."""
    if len({v[0] for v in data.views}) < 2:
        return []
    rows = [r for b in data.bits for r in pipeline_rows(data, b) if not math.isnan(r.bits_per_weight)]
    if not rows:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for uses in DATA_ORDER:
        mine = [r for r in rows if r.uses == uses]
        for alone, marker in ((True, "o"), (False, "^")):
            pts = [r for r in mine if (r.vector in ("–", "own QAT")) == alone]
            if pts:
                ax.scatter([r.bits_per_weight for r in pts], [r.acc for r in pts], c=COLOURS[uses], marker=marker,
                           s=36, alpha=0.85, label=f"{uses}{'' if alone else ', with vector'}")
    for r in rows:
        if r.vector == "–":
            ax.annotate(r.pipeline, (r.bits_per_weight, r.acc), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.axhline(rows[0].float_acc, color="grey", lw=1, ls="--", label="FT float")
    ax.set_xlabel("bits per weight (codes + scales + zero points)")
    ax.set_ylabel("mean test top-1 (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_dir, "pipelines_bpw")

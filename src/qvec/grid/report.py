"""Reports: the paper's tables and figures (SPEC section 7) from a results database.

``write_report(db, out_dir)`` writes, per bit-width of the study: donor-wise and receiver-wise tables (Best /
Worst / Mean Delta in points and Pos.%, at lambda = 1 and at lambda*, self-pairs excluded), donor x receiver
heatmaps of Delta (lambda = 1 beside lambda*), per-task bars of FT / FT+PTQ / QAT+PTQ, a radar of FT+PTQ,
patched+PTQ and QAT+PTQ, the recovery ratio Delta / (QAT+PTQ - FT+PTQ), and a cost table (receiver-side patch +
PTQ time against the receiver's own QAT run). Tables are Markdown and CSV, figures PNG and SVG (matplotlib, Agg),
and ``report.md`` ties them together.

Everything is computed from the rows of one study, so the report is a pure function of the database: lambda* is
re-derived from the stored validation rows with the same rule the workers used (:func:`qvec.grid.plan.select_lambda`).
lambda* uses the receiver's validation data, so it is never called zero-shot; lambda = 1 is.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import atomic_path
from ..errors import QvecError
from ..rules import MEAN_DONOR
from .plan import lam_key, select_lambda
from .render import Table, _plt, _save
from .report_pipelines import pipeline_cost, pipeline_of, pipeline_patched, pipelines_table
from .report_rules import (
    MIN_GAP_POINTS,
    RuleOutcome,
    donor_table,
    rule_outcomes,
    rules_figure,
    rules_tables,
    study_rules,
)
from .store import ResultStore

NAN = float("nan")
ZS = "λ = 1 (zero-shot)"
SEL = "λ* (val-selected, uses receiver data)"


# ---------------------------------------------------------------------------------------------- data model
@dataclass
class Pair:
    """One (donor, receiver) pair at one bit-width, averaged over seeds; accuracies in points (0..100)."""

    bits: int
    donor: str
    receiver: str
    #: test accuracy at lambda = 1 (the zero-shot setting); ``delta_one`` is its Delta over FT+PTQ
    acc_one: float
    acc_star: float
    lam_star: float
    baseline: float
    ceiling: float

    @property
    def self_pair(self) -> bool:
        return self.donor == self.receiver

    @property
    def delta_one(self) -> float:
        return self.acc_one - self.baseline

    @property
    def delta_star(self) -> float:
        return self.acc_star - self.baseline

    @property
    def gap(self) -> float:
        return self.ceiling - self.baseline

    def recovery(self, delta: float) -> float:
        return delta / self.gap if self.gap >= MIN_GAP_POINTS else NAN


@dataclass
class StudyData:
    """The numbers of one study, indexed for the report."""

    study: str
    model: str
    receivers: list[str]
    donors: list[str]
    bits: list[int]
    #: (kind, receiver, bits or None) -> test accuracy in points, averaged over seeds
    baselines: dict[tuple[str, str, int | None], float]
    pairs: list[Pair]
    #: (receiver, bits) -> mean receiver-side seconds of patch + PTQ
    patch_cost: dict[tuple[str, int], float] = field(default_factory=dict)
    #: (receiver, bits) -> seconds of the receiver's own QAT run
    qat_cost: dict[tuple[str, int], float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    seeds: int = 1
    #: every lambda rule's outcome per pair (qvec.grid.report_rules), the mean-of-others donor included
    outcomes: list[RuleOutcome] = field(default_factory=list)
    #: quantizer -> (bits, donor, receiver) -> {lambda: its accuracy on FT + lam tau}, for every quantizer other
    #: than RTN (qvec.grid.report_pipelines), and each one's cost (s/model, calibration images)
    pipelines: dict = field(default_factory=dict)
    pipeline_cost: dict = field(default_factory=dict)

    def base(self, kind: str, receiver: str, bits: int | None = None) -> float:
        return self.baselines.get((kind, receiver, bits), NAN)

    def pairs_at(self, bits: int, transfer_only: bool = True) -> list[Pair]:
        return [p for p in self.pairs if p.bits == bits and not (transfer_only and p.self_pair)]


def pooled_recovery(pairs: Sequence[Pair], attr: str) -> float:
    """Sum of Delta over sum of gap, over pairs whose receiver has at least ``MIN_GAP_POINTS`` to recover.

    Pooled rather than a mean of per-pair ratios, which a receiver with a 1-point gap can swing by tens.
    """
    ok = [p for p in pairs if p.gap >= MIN_GAP_POINTS and not math.isnan(getattr(p, attr))]
    gap = sum(p.gap for p in ok)
    return sum(getattr(p, attr) for p in ok) / gap if gap else NAN


def _mean(xs: Iterable[float]) -> float:
    v = [x for x in xs if not math.isnan(x)]
    return sum(v) / len(v) if v else NAN


def _ordered(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def _median_lambda(lams: Sequence[float]) -> float:
    """Median lambda* over seeds, ignoring seeds without one, and always a value of the grid (the lower median)."""
    known = [lam for lam in lams if not math.isnan(lam)]
    return statistics.median_low(known) if known else NAN


def load_study(store: ResultStore, study: str | None = None) -> StudyData:
    """Collect a study's rows into baselines, pairs (with lambda* re-derived from validation) and costs."""
    study = store.resolve_study(study)
    config = store.study_config(study)
    rows = store.results(study)
    if not rows:
        raise QvecError(f"{store.path}: study {study!r} has no results yet")
    seeds = sorted({r.seed for r in rows})
    base_acc: dict[tuple, list[float]] = defaultdict(list)
    val: dict[tuple, dict[float, float]] = defaultdict(dict)
    test: dict[tuple, dict[str, float]] = defaultdict(dict)
    cost: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.kind == "score" or r.donor == MEAN_DONOR or (pipeline_of(r.kind) or ("",))[-1] == "patched":
            # report_rules / report_pipelines
            continue
        if r.kind != "patched":
            if r.split == "test":
                base_acc[(r.kind, r.receiver, r.bits)].append(100.0 * r.value)
            continue
        pk = (r.bits, r.donor, r.receiver, r.seed)
        if r.split == "val":
            val[pk][float(r.lam)] = r.value
        else:
            test[pk][lam_key(r.lam)] = 100.0 * r.value
            if lam_key(r.lam) == lam_key(1.0):  # the zero-shot deployment: one addition, one PTQ pass
                cost[(r.receiver, r.bits)].append(r.patch_seconds + r.ptq_seconds)
    baselines = {k: _mean(v) for k, v in base_acc.items()}
    grid = [float(v) for v in config.get("lambdas", [])]
    per_pair: dict[tuple, list[tuple[float, float, float]]] = defaultdict(list)
    for pk, accs in test.items():
        bits, donor, recv, _seed = pk
        if lam_key(1.0) not in accs:
            continue
        v = val.get(pk, {})
        if grid:
            v = {lam: a for lam, a in v.items() if lam_key(lam) in {lam_key(g) for g in grid}}
        complete = bool(v) and (not grid or len(v) == len(grid))
        lam_star = select_lambda(v) if complete else NAN
        acc_star = accs.get(lam_key(lam_star), NAN) if complete else NAN
        per_pair[(bits, donor, recv)].append((accs[lam_key(1.0)], acc_star, lam_star))
    pairs = []
    for (bits, donor, recv), vals in sorted(per_pair.items()):
        pairs.append(Pair(bits, donor, recv, _mean(a for a, _, _ in vals), _mean(s for _, s, _ in vals),
                          _median_lambda([lam for _, _, lam in vals]),
                          baselines.get(("ft_ptq", recv, bits), NAN), baselines.get(("qat_ptq", recv, bits), NAN)))
    tasks = config.get("tasks", [])
    receivers = _ordered({r.receiver for r in rows}, config.get("receivers") or tasks)
    donors = _ordered({p.donor for p in pairs}, config.get("donors") or tasks)
    bits_list = sorted({r.bits for r in rows if r.bits is not None})
    qat_cost = {(t.task, t.bits): t.seconds for t in store.trainings(study) if t.bits is not None}
    return StudyData(study, rows[0].model, receivers, donors, bits_list, baselines, pairs,
                     {k: _mean(v) for k, v in cost.items()}, qat_cost, config, len(seeds),
                     rule_outcomes(rows, config, baselines), pipeline_patched(rows), pipeline_cost(rows))


# -------------------------------------------------------------------------------------------------- tables
def _stats(deltas: Sequence[float]) -> list[float]:
    """Best, Worst, Mean Delta (points) and Pos.% of a list of deltas (NaNs dropped)."""
    d = [x for x in deltas if not math.isnan(x)]
    if not d:
        return [NAN, NAN, NAN, NAN]
    return [max(d), min(d), sum(d) / len(d), 100.0 * sum(x > 0 for x in d) / len(d)]


_STAT_COLS = ["Best", "Worst", "Mean", "Pos.%"]


def wise_table(data: StudyData, bits: int, by: str) -> Table:
    """Donor-wise (``by="donor"``) or receiver-wise table of transfer Delta at lambda = 1 and lambda*."""
    pairs = data.pairs_at(bits)
    names = data.donors if by == "donor" else data.receivers
    rows = []
    for name in names:
        mine = [p for p in pairs if getattr(p, by) == name]
        if not mine:
            continue
        rows.append([name, len(mine), *_stats([p.delta_one for p in mine]), *_stats([p.delta_star for p in mine])])
    rows.append(["all pairs", len(pairs), *_stats([p.delta_one for p in pairs]),
                 *_stats([p.delta_star for p in pairs])])
    cols = [by.capitalize(), "pairs"] + [f"{c} (λ=1)" for c in _STAT_COLS] + [f"{c} (λ*)" for c in _STAT_COLS]
    return Table(f"{by}_wise_w{bits}", f"{by.capitalize()}-wise transfer Δ at {bits}-bit (points over FT+PTQ)",
                 cols, rows, f"Δ = PTQ(θ_FT^R + λ·τ_D) − PTQ(θ_FT^R) on the receiver's test split; self-pairs "
                 f"excluded. λ = 1 is zero-shot; {SEL}.")


def baseline_table(data: StudyData, bits: int) -> Table:
    rows = []
    for r in data.receivers:
        ft, ftq, qq = data.base("ft", r), data.base("ft_ptq", r, bits), data.base("qat_ptq", r, bits)
        rows.append([r, ft, ftq, qq, data.base("pretrained", r), data.base("pretrained_ptq", r, bits),
                     ft - ftq, qq - ftq])
    return Table(f"baselines_w{bits}", f"Per-receiver test accuracy (%) at {bits}-bit",
                 ["Receiver", "FT", "FT+PTQ", "QAT+PTQ", "Pretrained", "Pretrained+PTQ", "PTQ loss", "QAT gain"],
                 rows, "PTQ loss = FT − FT+PTQ; QAT gain = QAT+PTQ − FT+PTQ (the ceiling a vector can recover). "
                 "Pretrained = θ_0's backbone under the receiver's own FT head.")


def ptq_loss_table(data: StudyData) -> Table:
    rows = [[r, data.base("ft", r), *[data.base("ft", r) - data.base("ft_ptq", r, b) for b in data.bits]]
            for r in data.receivers]
    rows.append(["mean", _mean(row[1] for row in rows),
                 *[_mean(row[2 + i] for row in rows) for i in range(len(data.bits))]])
    return Table("ptq_loss", "What RTN costs: FT − FT+PTQ (points) per task and bit-width",
                 ["Task", "FT acc."] + [f"{b}-bit" for b in data.bits], rows,
                 "The study is informative only where PTQ hurts: a task that loses little has little to recover.")


def recovery_table(data: StudyData, bits: int) -> Table:
    rows = []
    for r in data.receivers:
        mine = [p for p in data.pairs_at(bits) if p.receiver == r]
        if not mine:
            continue
        gap = mine[0].gap
        rows.append([r, gap, _mean(p.delta_one for p in mine), _mean(p.recovery(p.delta_one) for p in mine),
                     _mean(p.delta_star for p in mine), _mean(p.recovery(p.delta_star) for p in mine)])
    return Table(f"recovery_w{bits}", f"Recovery ratio at {bits}-bit: Δ / (QAT+PTQ − FT+PTQ), mean over donors",
                 ["Receiver", "Gap (pts)", "Mean Δ λ=1", "Recovery λ=1", "Mean Δ λ*", "Recovery λ*"], rows,
                 f"Recovery is undefined (–) where the gap is under {MIN_GAP_POINTS:g} points; 1.0 = the receiver's "
                 "own QAT.", digits=2)


def cost_table(data: StudyData) -> Table:
    rows = []
    for b in data.bits:
        for r in data.receivers:
            patch, qat = data.patch_cost.get((r, b), NAN), data.qat_cost.get((r, b), NAN)
            rows.append([r, b, 1000 * patch, qat, qat / patch if patch and not math.isnan(patch) else NAN])
    return Table("cost", "Cost: receiver-side patch + PTQ against the receiver's own QAT run",
                 ["Receiver", "bits", "Patch + PTQ (ms)", "QAT run (s)", "QAT / patch"], rows,
                 "Patch + PTQ = one vector addition and one RTN pass over the backbone (mean over the λ = 1 test "
                 "cells, measured "
                 "in the grid workers); QAT run = training time of the receiver's QAT checkpoint (excluding its "
                 "per-epoch evaluation).", formats=[None, None, ".1f", ".0f", ",.0f"])


def summary_table(data: StudyData) -> Table:
    """The headline numbers per bit-width (the ones SPEC section 9 reports for the paper)."""
    rows = []
    for b in data.bits:
        pairs = data.pairs_at(b)
        gains = [data.base("qat_ptq", r, b) - data.base("ft_ptq", r, b) for r in data.receivers]
        loss = [data.base("ft", r) - data.base("ft_ptq", r, b) for r in data.receivers]
        d1 = [p.delta_one for p in pairs if not math.isnan(p.delta_one)]
        ds = [p.delta_star for p in pairs if not math.isnan(p.delta_star)]
        lams = [p.lam_star for p in pairs if not math.isnan(p.lam_star)]
        rows.append([
            b, len(pairs), _mean(loss), _mean(gains),
            _mean(d1), statistics.median(d1) if d1 else NAN, 100.0 * sum(x > 0 for x in d1) / len(d1) if d1 else NAN,
            _mean(ds), 100.0 * sum(x > 0 for x in ds) / len(ds) if ds else NAN,
            f"{statistics.median(lams):g}" if lams else "–",
            pooled_recovery(pairs, "delta_one"), pooled_recovery(pairs, "delta_star"),
        ])
    return Table("summary", "Headline numbers per bit-width (transfer pairs, self-pairs excluded)",
                 ["bits", "pairs", "PTQ loss", "QAT gain", "Mean Δ λ=1", "Median Δ λ=1", "Win % λ=1",
                  "Mean Δ λ*", "Win % λ*", "Median λ*", "Recovery λ=1", "Recovery λ*"], rows,
                 "PTQ loss and QAT gain are means over receivers (points); Δ is over FT+PTQ; recovery is ΣΔ / Σgap "
                 f"over pairs whose receiver has a gap of at least {MIN_GAP_POINTS:g} points. Paper reference "
                 "(ViT-B/16, 22 tasks, 3-bit): QAT gain +45.3, mean Δ λ=1 +9.7, median +5.4, win 76.6%, median "
                 "λ* 0.75.")


def ptq_verdict(data: StudyData, threshold: float = 10.0) -> tuple[int, str]:
    """Which bit-width the study is informative at, and a sentence saying so plainly.

    The informative setting is the one where most receivers lose at least ``threshold`` points to RTN (ties: the
    milder bit-width); a bit-width where PTQ costs little leaves little for any vector to recover.
    """
    hurt = {}
    for b in data.bits:
        losses = [data.base("ft", r) - data.base("ft_ptq", r, b) for r in data.receivers]
        hurt[b] = (sum(x >= threshold for x in losses), _mean(losses))
    lead = max(data.bits, key=lambda b: (hurt[b][0], b))
    n = len(data.receivers)
    parts = [f"{b}-bit: {hurt[b][0]} of {n} tasks lose ≥ {threshold:g} points (mean loss {hurt[b][1]:.1f})"
             for b in sorted(data.bits)]
    text = "Where RTN hurts: " + "; ".join(parts) + ". "
    if hurt[lead][0] * 2 > n:
        text += f"**{lead}-bit is the informative setting** and is reported first."
    else:
        text += (f"At no bit-width do most tasks lose ≥ {threshold:g} points; {lead}-bit comes closest and is "
                 "reported first. Read every Δ against how little there is to recover.")
    return lead, text


# ------------------------------------------------------------------------------------------------- figures
def heatmap_figure(data: StudyData, bits: int, out_dir: Path) -> list[Path]:
    """Donor x receiver Delta at lambda = 1 beside lambda*; diverging colours centred on 0; diagonal outlined."""
    import numpy as np

    plt = _plt()
    donors, recvs = data.donors, data.receivers
    idx = {(p.donor, p.receiver): p for p in data.pairs if p.bits == bits}
    mats = []
    for attr in ("delta_one", "delta_star"):
        m = np.full((len(donors), len(recvs)), np.nan)
        for i, d in enumerate(donors):
            for j, r in enumerate(recvs):
                if (d, r) in idx:
                    m[i, j] = getattr(idx[(d, r)], attr)
                elif d == r and attr == "delta_one":  # self-pairs not run: own vector at lambda = 1 is QAT+PTQ
                    m[i, j] = data.base("qat_ptq", r, bits) - data.base("ft_ptq", r, bits)
        mats.append(m)
    finite = np.concatenate([m[np.isfinite(m)] for m in mats]) if any(np.isfinite(m).any() for m in mats) else []
    vmax = max(1.0, float(np.nanmax(np.abs(finite)))) if len(finite) else 1.0
    n = max(len(donors), len(recvs))
    cell = 0.62 if n <= 10 else 0.42
    fig, axes = plt.subplots(1, 2, figsize=(2 * cell * len(recvs) + 3.2, cell * len(donors) + 2.2),
                             constrained_layout=True)
    fs = 8 if n <= 8 else 6 if n <= 14 else 4.5
    for ax, m, title in zip(axes, mats, (ZS, "λ* (val-selected, receiver data)"), strict=True):
        im = ax.imshow(m, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="equal")
        ax.set_xticks(range(len(recvs)), recvs, rotation=45, ha="right", fontsize=fs + 1)
        ax.set_yticks(range(len(donors)), donors, fontsize=fs + 1)
        ax.set_xlabel("receiver")
        ax.set_title(title, fontsize=10)
        for i in range(len(donors)):
            for j in range(len(recvs)):
                v = m[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=fs,
                            color="white" if abs(v) > 0.6 * vmax else "black")
                if donors[i] == recvs[j]:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="0.3", lw=1.2, ls="--"))
    axes[0].set_ylabel("donor")
    fig.colorbar(im, ax=axes, shrink=0.8, label="Δ over FT+PTQ (points)")
    fig.suptitle(f"{data.model}, {bits}-bit RTN: transfer Δ (dashed diagonal = own vector = QAT ceiling)",
                 fontsize=11)
    return _save(fig, out_dir, f"heatmap_w{bits}")


_COLOURS = {"FT": "#4c72b0", "FT+PTQ": "#dd8452", "QAT+PTQ": "#55a868", "patched λ=1": "#c44e52",
            "patched λ*": "#8172b3"}


def _bits_colour(bits: int) -> str:
    """One colour per bit-width across figures (2-bit red ... 8-bit green)."""
    return {2: "#c44e52", 3: "#dd8452", 4: "#4c72b0", 8: "#55a868"}.get(bits, "#8172b3")


def bars_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """Per-task bars of FT / FT+PTQ / QAT+PTQ, one panel per bit-width."""
    import numpy as np

    plt = _plt()
    recvs = data.receivers
    fig, axes = plt.subplots(len(data.bits), 1, figsize=(max(6.0, 0.9 * len(recvs) + 2), 2.8 * len(data.bits)),
                             squeeze=False, constrained_layout=True)
    x = np.arange(len(recvs))
    w = 0.27
    for ax, b in zip(axes[:, 0], data.bits, strict=True):
        series = {"FT": [data.base("ft", r) for r in recvs], "FT+PTQ": [data.base("ft_ptq", r, b) for r in recvs],
                  "QAT+PTQ": [data.base("qat_ptq", r, b) for r in recvs]}
        for k, (name, vals) in enumerate(series.items()):
            ax.bar(x + (k - 1) * w, vals, w, label=name, color=_COLOURS[name])
        ax.set_xticks(x, recvs, rotation=30, ha="right")
        ax.set_ylabel("test top-1 (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{b}-bit RTN", fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=3, fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 1.28))
    fig.suptitle(f"{data.model}: FT vs FT+PTQ vs QAT+PTQ per task", fontsize=11)
    return _save(fig, out_dir, "bars")


def radar_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """A radar per bit-width: FT+PTQ, patched+PTQ (mean over donors, lambda = 1 and lambda*), QAT+PTQ.

    The radial axis starts 10 points below the lowest value (rounded down to 10), not at 0, so that gaps of a few
    points stay visible; the floor is printed on the figure.
    """
    import numpy as np

    plt = _plt()
    recvs = data.receivers
    if len(recvs) < 3:
        return []
    ang = np.linspace(0, 2 * np.pi, len(recvs), endpoint=False)
    per_bits = {}
    for b in data.bits:
        pairs = data.pairs_at(b)
        per_bits[b] = {
            "FT+PTQ": [data.base("ft_ptq", r, b) for r in recvs],
            "patched λ=1": [_mean(p.acc_one for p in pairs if p.receiver == r) for r in recvs],
            "patched λ*": [_mean(p.acc_star for p in pairs if p.receiver == r) for r in recvs],
            "QAT+PTQ": [data.base("qat_ptq", r, b) for r in recvs],
        }
    values = [v for series in per_bits.values() for vals in series.values() for v in vals if not math.isnan(v)]
    floor = max(0.0, 10 * math.floor((min(values, default=0.0) - 10) / 10))
    fig, axes = plt.subplots(1, len(data.bits), figsize=(5.0 * len(data.bits), 5.4), squeeze=False,
                             subplot_kw={"projection": "polar"})
    for ax, b in zip(axes[0], data.bits, strict=True):
        ax.set_theta_offset(np.pi / 2)
        ax.set_theta_direction(-1)
        for name, vals in per_bits[b].items():
            v = np.array([floor if math.isnan(x) else x for x in vals], float)
            loop_a, loop_v = np.append(ang, ang[0]), np.append(v, v[0])
            ax.plot(loop_a, loop_v, lw=1.8, color=_COLOURS[name], label=name, ls="--" if name == "patched λ*" else "-",
                    marker="o", ms=3)
            if name in ("FT+PTQ", "QAT+PTQ"):
                ax.fill(loop_a, loop_v, alpha=0.07, color=_COLOURS[name])
        ax.set_xticks(ang, recvs, fontsize=8)
        ax.tick_params(axis="x", pad=10)
        ax.set_ylim(floor, 100)
        ticks = [t for t in range(int(floor) + 10, 101, 10 if 100 - floor <= 50 else 20)]
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=6, color="0.45")
        ax.set_rlabel_position(180 / len(recvs))
        ax.set_title(f"{b}-bit (radius from {floor:.0f}%)", fontsize=10, pad=18)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{data.model}: test top-1 (%) per receiver; patched = mean over donors (self excluded)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return _save(fig, out_dir, "radar")


def ptq_loss_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """FT − FT+PTQ per task, grouped by bit-width: where RTN starts to hurt."""
    import numpy as np

    plt = _plt()
    recvs = data.receivers
    bits = sorted(data.bits)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(recvs) + 2), 3.2), constrained_layout=True)
    x = np.arange(len(recvs))
    w = 0.8 / max(1, len(bits))
    for k, b in enumerate(bits):
        vals = [data.base("ft", r) - data.base("ft_ptq", r, b) for r in recvs]
        ax.bar(x + (k - (len(bits) - 1) / 2) * w, vals, w, label=f"{b}-bit", color=_bits_colour(b))
    ax.axhline(10, color="0.3", lw=0.8, ls=":")
    ax.text(-0.45, 10, "10 points", ha="left", va="bottom", fontsize=7, color="0.3",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.set_xticks(x, recvs, rotation=30, ha="right")
    ax.set_ylabel("FT − FT+PTQ (points)")
    ax.set_title(f"{data.model}: accuracy lost to RTN per task", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_dir, "ptq_loss")


def lambda_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """How often each lambda of the grid is selected as lambda* (transfer pairs), per bit-width."""
    plt = _plt()
    grid = sorted(float(v) for v in data.config.get("lambdas", []))
    if not grid or all(math.isnan(p.lam_star) for p in data.pairs):
        return []
    fig, ax = plt.subplots(figsize=(6.4, 2.9), constrained_layout=True)
    w = 0.8 / max(1, len(data.bits))
    for k, b in enumerate(sorted(data.bits)):
        lams = [lam_key(p.lam_star) for p in data.pairs_at(b) if not math.isnan(p.lam_star)]
        counts = [lams.count(lam_key(g)) for g in grid]
        ax.bar([i + (k - (len(data.bits) - 1) / 2) * w for i in range(len(grid))], counts, w, label=f"{b}-bit",
               color=_bits_colour(b))
    ax.set_xticks(range(len(grid)), [f"{g:g}" for g in grid])
    ax.set_xlabel("λ* (chosen on the receiver's validation split: uses receiver data)")
    ax.set_ylabel("transfer pairs")
    ax.set_title(f"{data.model}: which λ the validation split picks", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "lambda_star")


# ------------------------------------------------------------------------------------------------- report
def _rel(paths: Sequence[Path], ext: str = ".png") -> str | None:
    for p in paths:
        if p.suffix == ext:
            return p.name
    return None


def write_report(db: str | os.PathLike, out_dir: str | os.PathLike, study: str | None = None,
                 preamble: str = "") -> Path:
    """Write every table and figure of a study (default: the most recent) and ``report.md``; returns its path."""
    out = Path(out_dir)
    with ResultStore(db, create=False) as store:
        data = load_study(store, study)
    if not data.bits:
        raise QvecError(f"study {data.study!r} has no quantized results yet")
    out.mkdir(parents=True, exist_ok=True)
    md: list[str] = [f"# {data.study}: quantization-vector transfer report", ""]
    if preamble:
        md += [preamble.strip(), ""]
    cfg = data.config
    profile = f" (recipe profile `{cfg['profile']}`)" if cfg.get("profile") else ""
    md += [
        f"- Model `{data.model}`{profile}, backbone `{cfg.get('backbone', '?')}`, {len(data.donors)} donors x "
        f"{len(data.receivers)} receivers, bits {data.bits}, {cfg.get('granularity', 'channel')} "
        f"{'symmetric' if cfg.get('symmetric', True) else 'asymmetric'} RTN, seeds: {data.seeds}.",
        f"- λ grid {cfg.get('lambdas')}; **λ = 1 is zero-shot** (no receiver data); **λ\\* is chosen per pair on the "
        "receiver's validation split and reported on test: it uses receiver data**.",
        f"- Evaluation limits: validation {cfg.get('eval', {}).get('val_limit') or 'all'} images, "
        f"test {cfg.get('eval', {}).get('test_limit') or 'all'} images per receiver.",
        "- All numbers are top-1 on the receiver's test split, in %; Δ in points over FT+PTQ.",
        "",
    ]

    def emit(t: Table) -> None:
        t.write(out)
        md.extend([t.markdown(), "", f"([{t.name}.csv]({t.name}.csv))", ""])

    def fig(title: str, paths: list[Path]) -> None:
        png = _rel(paths)
        if png:
            md.extend([f"![{title}]({png})", "", f"*{title}* ([SVG]({_rel(paths, '.svg')}))", ""])

    lead, verdict = ptq_verdict(data)
    md += ["## Summary", "", verdict, ""]
    emit(summary_table(data))
    emit(ptq_loss_table(data))
    fig("Accuracy lost to RTN per task and bit-width", ptq_loss_figure(data, out))
    fig("FT vs FT+PTQ vs QAT+PTQ per task", bars_figure(data, out))
    fig("Radar per bit-width", radar_figure(data, out))
    fig("Distribution of λ*", lambda_figure(data, out))
    rules = study_rules(cfg)
    domain = [t for t in cfg.get("rules", {}).get("probe_domain", []) if t in data.receivers]
    if len(rules) > 2:
        fig("Transfer Δ per λ rule", rules_figure(data.outcomes, rules, data.bits, out, domain))
    for b in [lead, *[b for b in data.bits if b != lead]]:
        md += [f"## {b}-bit", ""]
        emit(baseline_table(data, b))
        fig(f"Transfer Δ at {b}-bit, {ZS} beside {SEL}", heatmap_figure(data, b, out))
        emit(wise_table(data, b, "donor"))
        emit(wise_table(data, b, "receiver"))
        emit(recovery_table(data, b))
        if len(rules) > 2:
            for t in rules_tables(data.outcomes, rules, b, domain):
                emit(t)
            dt = donor_table(data.outcomes, rules, b, domain)
            if dt is not None:
                emit(dt)
        free = [r for r in rules if r.zero_shot and r.metric is not None]
        pt = pipelines_table(data.baselines, data.outcomes, data.pipelines, data.receivers, b,
                             free[0] if free else None, data.pipeline_cost)
        if pt is not None:
            emit(pt)
    md += ["## Cost", ""]
    emit(cost_table(data))
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(md))
    return path


def print_summary(db: str | os.PathLike, study: str | None = None,
                  echo: Callable[[str], None] = print) -> StudyData:
    """Echo the headline table of a study (what ``qvec demo`` prints)."""
    with ResultStore(db, create=False) as store:
        data = load_study(store, study)
    echo(summary_table(data).markdown())
    return data

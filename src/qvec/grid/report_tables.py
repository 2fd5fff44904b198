"""The tables of a report (SPEC section 7), as functions of a loaded study (:class:`~qvec.grid.report_data.StudyData`).

Donor-wise and receiver-wise tables (Best / Worst / Mean Delta in points and Pos.%, at lambda = 1 and at lambda*,
self-pairs excluded), per-receiver baselines, what RTN costs per task, the recovery ratio Delta / (QAT+PTQ -
FT+PTQ), the headline summary and a cost table (receiver-side patch + PTQ time against the receiver's own QAT run).
Each table the page shows is registered with :func:`~qvec.grid.render.register_table`, with its section and place;
the rule and pipeline tables come from :mod:`qvec.grid.report_rules` and :mod:`qvec.grid.report_pipelines`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from qvec.grid.render import Table, nanmean, register_table
from qvec.grid.report_data import NAN, SEL, StudyData, pooled_recovery, study_rules_domain
from qvec.grid.report_rules import MIN_GAP_POINTS, donor_table, rules_tables


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


@register_table("baselines", scope="bits", order=10)
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


@register_table("ptq_loss", scope="study", order=20)
def ptq_loss_table(data: StudyData) -> Table:
    rows = [[r, data.base("ft", r), *[data.base("ft", r) - data.base("ft_ptq", r, b) for b in data.bits]]
            for r in data.receivers]
    rows.append(["mean", nanmean(row[1] for row in rows),
                 *[nanmean(row[2 + i] for row in rows) for i in range(len(data.bits))]])
    return Table("ptq_loss", "What RTN costs: FT − FT+PTQ (points) per task and bit-width",
                 ["Task", "FT acc."] + [f"{b}-bit" for b in data.bits], rows,
                 "The study is informative only where PTQ hurts: a task that loses little has little to recover.")


@register_table("recovery", scope="bits", order=50)
def recovery_table(data: StudyData, bits: int) -> Table:
    rows = []
    for r in data.receivers:
        mine = [p for p in data.pairs_at(bits) if p.receiver == r]
        if not mine:
            continue
        gap = mine[0].gap
        rows.append([r, gap, nanmean(p.delta_one for p in mine), nanmean(p.recovery(p.delta_one) for p in mine),
                     nanmean(p.delta_star for p in mine), nanmean(p.recovery(p.delta_star) for p in mine)])
    return Table(f"recovery_w{bits}", f"Recovery ratio at {bits}-bit: Δ / (QAT+PTQ − FT+PTQ), mean over donors",
                 ["Receiver", "Gap (pts)", "Mean Δ λ=1", "Recovery λ=1", "Mean Δ λ*", "Recovery λ*"], rows,
                 f"Recovery is undefined (–) where the gap is under {MIN_GAP_POINTS:g} points; 1.0 = the receiver's "
                 "own QAT.", digits=2)


@register_table("cost", scope="cost", order=10)
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


@register_table("summary", scope="study", order=10)
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
            b, len(pairs), nanmean(loss), nanmean(gains),
            nanmean(d1), statistics.median(d1) if d1 else NAN, 100.0 * sum(x > 0 for x in d1) / len(d1) if d1 else NAN,
            nanmean(ds), 100.0 * sum(x > 0 for x in ds) / len(ds) if ds else NAN,
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
        hurt[b] = (sum(x >= threshold for x in losses), nanmean(losses))
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


# ------------------------------------------------------------------------------------------ the page's tables
@register_table("donor_wise", scope="bits", order=30)
def _donor_wise(data: StudyData, bits: int) -> Table:
    return wise_table(data, bits, "donor")


@register_table("receiver_wise", scope="bits", order=40)
def _receiver_wise(data: StudyData, bits: int) -> Table:
    return wise_table(data, bits, "receiver")


@register_table("rules", scope="bits", order=60)
def _rules(data: StudyData, bits: int) -> list[Table]:
    """Every lambda rule's outcome (qvec.grid.report_rules), when the study measured more than ``one`` and ``val``."""
    rules, domain = study_rules_domain(data)
    return rules_tables(data.outcomes, rules, bits, domain, _probe(data)) if len(rules) > 2 else []


@register_table("donors", scope="bits", order=70)
def _donors(data: StudyData, bits: int) -> Table | None:
    """The label-free donor choice per receiver (qvec.grid.report_rules), with the rules table."""
    rules, domain = study_rules_domain(data)
    return donor_table(data.outcomes, rules, bits, domain, _probe(data)) if len(rules) > 2 else None


def _probe(data: StudyData) -> str:
    """The study's generic probe (``rules.probe``): what its probe rules ran on."""
    return str(data.config.get("rules", {}).get("probe", ""))

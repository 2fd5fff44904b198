"""The deployment question of a report: which PTQ pipeline to use, side by side per receiver at each bit-width.

RTN of FT, RTN of FT + lam tau at lambda = 1, lambda* and a label-free rule's choice, GPTQ of the same models,
and the ceiling QAT + RTN (with GPTQ of QAT beside it). GPTQ rows exist when the study has
``quantizers = ["rtn", "gptq"]``; the lambda a rule chose on RTN's scores is the one GPTQ is measured at.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

from ..rules import MEAN_DONOR, LambdaRule, lam_key
from .render import Table
from .report_rules import RuleOutcome

NAN = float("nan")


def gptq_patched(rows: Sequence) -> dict[tuple, dict[str, float]]:
    """(bits, donor, receiver) -> {lambda: GPTQ(FT + lam tau) test accuracy in points}, averaged over seeds."""
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.kind == "gptq:patched":
            acc[(r.bits, r.donor, r.receiver)][lam_key(r.lam)].append(100.0 * r.value)
    return {k: {lam: sum(v) / len(v) for lam, v in by.items()} for k, by in acc.items()}


def gptq_cost(rows: Sequence) -> tuple[float, int]:
    """Mean seconds of one GPTQ pass (calibration forward passes + per-layer solves) and the images it used."""
    secs = [r.ptq_seconds for r in rows if r.kind.startswith("gptq:")]
    imgs = [r.quant.rsplit(":", 1)[-1] for r in rows if r.kind.startswith("gptq:")]
    n = int(imgs[0]) if imgs and imgs[0].isdigit() else 0
    return (sum(secs) / len(secs) if secs else NAN), n


def _mean(xs) -> float:
    v = [x for x in xs if not math.isnan(x)]
    return sum(v) / len(v) if v else NAN


def pipelines_table(baselines: Mapping[tuple, float], outcomes: Sequence[RuleOutcome], gptq: Mapping[tuple, dict],
                    receivers: Sequence[str], bits: int, rule: LambdaRule | None, cost: tuple[float, int]
                    ) -> Table | None:
    """Per receiver: test top-1 of each pipeline (patched ones: mean over single donors, self-pairs out)."""
    if not any(k[0] == bits for k in gptq):
        return None
    rname = rule.name if rule is not None else None

    def rtn(recv: str, name: str) -> float:
        return _mean(o.acc for o in outcomes if o.bits == bits and o.receiver == recv and o.rule == name
                     and o.donor not in (recv, MEAN_DONOR))

    def g(recv: str, name: str) -> float:
        vals = []
        for o in outcomes:
            if o.bits != bits or o.receiver != recv or o.rule != name or o.donor in (recv, MEAN_DONOR):
                continue
            if o.lam == 0.0:
                vals.append(baselines.get(("gptq:ft_ptq", recv, bits), NAN))
            else:
                vals.append(gptq.get((bits, o.donor, recv), {}).get(lam_key(o.lam), NAN))
        return _mean(vals)

    rows = []
    for r in receivers:
        row = [r, baselines.get(("ft_ptq", r, bits), NAN), rtn(r, "one"), rtn(r, "val"),
               rtn(r, rname) if rname else NAN, baselines.get(("gptq:ft_ptq", r, bits), NAN), g(r, "one"),
               g(r, "val"), g(r, rname) if rname else NAN, baselines.get(("qat_ptq", r, bits), NAN),
               baselines.get(("gptq:qat_ptq", r, bits), NAN), baselines.get(("ft", r, None), NAN)]
        rows.append(row)
    rows.append(["mean", *[_mean(row[i] for row in rows) for i in range(1, len(rows[0]))]])
    label = rname or "–"
    secs, n = cost
    return Table(
        f"pipelines_w{bits}", f"Which pipeline at {bits}-bit: test top-1 (%) per receiver",
        ["Receiver", "RTN(FT)", "RTN λ=1", "RTN λ*", f"RTN {label}", "GPTQ(FT)", "GPTQ λ=1", "GPTQ λ*",
         f"GPTQ {label}", "QAT+RTN", "GPTQ(QAT)", "FT (float)"], rows,
        f"Patched columns: PTQ(θ_FT^R + λ·τ_D), mean over the single donors; λ* uses the receiver's labelled "
        f"validation split; `{label}` is a label-free rule (λ chosen on RTN's scores, the same λ for GPTQ; "
        f"λ = 0 means no patch). GPTQ is calibrated on {n} unlabeled images, {secs:.1f} s per "
        "model in the grid workers; RTN needs no data (milliseconds). QAT+RTN is the ceiling: the receiver's own "
        "QAT run.")

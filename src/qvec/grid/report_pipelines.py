"""The deployment question of a report: which PTQ pipeline to use, side by side per receiver at each bit-width.

RTN of FT, RTN of FT + lam tau at lambda = 1, lambda* and a label-free rule's choice, the same for every other
quantizer the study ran (``quantizers = ["rtn", "gptq", ...]``: rows ``<quantizer>:<kind>``), and the ceiling
QAT + RTN (with each quantizer of QAT beside it). The lambda a rule chose on RTN's scores is the one the other
quantizers are measured at. Column labels come from the quantizer configs (``QuantizerConfig.label``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from qvec.core.errors import QvecError
from qvec.grid.render import Table, nanmean
from qvec.grid.report_rules import RuleOutcome
from qvec.quant import get_quantizer
from qvec.vectors.rules import MEAN_DONOR, LambdaRule, lam_key

NAN = float("nan")


def pipeline_of(kind: str) -> tuple[str, str] | None:
    """``gptq:patched`` -> (``gptq``, ``patched``); None for RTN's own kinds."""
    name, sep, rest = kind.partition(":")
    return (name, rest) if sep else None


def pipeline_label(name: str) -> str:
    """How a report names a quantizer: its config's ``label`` (``GPTQ``), or the name when not registered here."""
    try:
        return get_quantizer(name).label
    except QvecError:
        return name.upper()


def pipeline_patched(rows: Sequence) -> dict[str, dict[tuple, dict[str, float]]]:
    """quantizer -> (bits, donor, receiver) -> {lambda: test accuracy of it on FT + lam tau, in points}, averaged
    over seeds."""
    acc: dict[str, dict[tuple, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        pk = pipeline_of(r.kind)
        if pk is not None and pk[1] == "patched":
            acc[pk[0]][(r.bits, r.donor, r.receiver)][lam_key(r.lam)].append(100.0 * r.value)
    return {q: {k: {lam: sum(v) / len(v) for lam, v in by.items()} for k, by in per.items()}
            for q, per in acc.items()}


def pipeline_cost(rows: Sequence) -> dict[str, tuple[float, int]]:
    """quantizer -> (mean seconds of one pass, calibration images used; 0 for one that needs no data)."""
    secs: dict[str, list[float]] = defaultdict(list)
    imgs: dict[str, str] = {}
    for r in rows:
        pk = pipeline_of(r.kind)
        if pk is not None:
            secs[pk[0]].append(r.ptq_seconds)
            imgs[pk[0]] = r.quant.rsplit(":", 1)[-1] if " calib=" in r.quant else "0"
    return {q: (sum(v) / len(v), int(imgs[q]) if imgs[q].isdigit() else 0) for q, v in secs.items()}



def pipelines_table(baselines: Mapping[tuple, float], outcomes: Sequence[RuleOutcome],
                    pipelines: Mapping[str, Mapping[tuple, dict]], receivers: Sequence[str], bits: int,
                    rule: LambdaRule | None, costs: Mapping[str, tuple[float, int]]) -> Table | None:
    """Per receiver: test top-1 of each pipeline (patched ones: mean over single donors, self-pairs out)."""
    names = [q for q, per in pipelines.items() if any(k[0] == bits for k in per)]
    if not names:
        return None
    rname = rule.name if rule is not None else None
    label = rname or "–"

    def patched(q: str | None, recv: str, rule_name: str | None) -> float:
        """Mean over single donors of quantizer ``q`` (None: RTN) on FT + lam tau at the rule's lambda."""
        vals = []
        for o in outcomes:
            if o.bits != bits or o.receiver != recv or o.rule != rule_name or o.donor in (recv, MEAN_DONOR):
                continue
            if q is None:
                vals.append(o.acc)
            elif o.lam == 0.0:
                vals.append(baselines.get((f"{q}:ft_ptq", recv, bits), NAN))
            else:
                vals.append(pipelines[q].get((bits, o.donor, recv), {}).get(lam_key(o.lam), NAN))
        return nanmean(vals)

    def block(q: str | None, recv: str) -> list[float]:
        ft = baselines.get((f"{q}:ft_ptq" if q else "ft_ptq", recv, bits), NAN)
        return [ft, patched(q, recv, "one"), patched(q, recv, "val"), patched(q, recv, rname) if rname else NAN]

    rows = []
    for r in receivers:
        row: list = [r, *block(None, r)]
        for q in names:
            row += block(q, r)
        row.append(baselines.get(("qat_ptq", r, bits), NAN))
        row += [baselines.get((f"{q}:qat_ptq", r, bits), NAN) for q in names]
        rows.append([*row, baselines.get(("ft", r, None), NAN)])
    rows.append(["mean", *[nanmean(row[i] for row in rows) for i in range(1, len(rows[0]))]])
    header = ["Receiver"]
    for lab in ["RTN", *(pipeline_label(q) for q in names)]:
        header += [f"{lab}(FT)", f"{lab} λ=1", f"{lab} λ*", f"{lab} {label}"]
    header += ["QAT+RTN", *(f"{pipeline_label(q)}(QAT)" for q in names), "FT (float)"]
    cost = "; ".join(f"{pipeline_label(q)} " + (f"is calibrated on {costs[q][1]} unlabeled images, "
                                                  if costs.get(q, (0, 0))[1] else "needs no data, ")
                     + f"{costs.get(q, (NAN, 0))[0]:.1f} s per model in the grid workers" for q in names)
    return Table(
        f"pipelines_w{bits}", f"Which pipeline at {bits}-bit: test top-1 (%) per receiver", header, rows,
        f"Patched columns: PTQ(θ_FT^R + λ·τ_D), mean over the single donors; λ* uses the receiver's labelled "
        f"validation split; `{label}` is a label-free rule (λ chosen on RTN's scores, the same λ for every "
        f"quantizer; λ = 0 means no patch). {cost}; RTN needs no data (milliseconds). QAT+RTN is the ceiling: the "
        "receiver's own QAT run.")

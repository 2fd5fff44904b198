"""The lambda-rule part of a report: what every rule of the study chose per pair, and what that gave on test.

Each rule's choice is re-derived from the stored validation rows and label-free scores with the same function the
workers used (:func:`qvec.vectors.rules.choices`), then looked up on test (lambda = 0 is the FT+PTQ baseline).
Receivers in the probe's own domain (``rules.probe_domain``) are shown apart: for them the "generic" probe images
are in-domain. The donor-choice table lets the same label-free score pick the donor per receiver, among the
single donors and, when the study has it, the mean of the other donors' vectors.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qvec.grid.render import Table, nanmean, pyplot, save_figure
from qvec.vectors.rules import MEAN_DONOR, LambdaRule, get_rule, lam_key, uses_label
from qvec.vectors.rules import choices as pair_choices

NAN = float("nan")
#: Receivers whose QAT ceiling is within this many points of FT+PTQ have nothing to recover; their recovery
#: ratio is not defined. A gap within a few points is test-split noise (+-1 point standard error on 2,000 test
#: images, +-3 on 240), and a ratio over it can read -25x.
MIN_GAP_POINTS = 5.0


@dataclass
class RuleOutcome:
    """One rule on one (donor, receiver, bits) pair, averaged over seeds; accuracies in points."""

    rule: str
    bits: int
    donor: str
    receiver: str
    lam: float
    acc: float
    baseline: float
    ceiling: float
    #: the rule's metric at its choice (val accuracy for ``val``; NaN for fixed rules)
    score: float
    #: receiver-side seconds of scoring every candidate of this pair (patch + PTQ + the signal's passes)
    seconds: float = 0.0

    @property
    def delta(self) -> float:
        return self.acc - self.baseline

    @property
    def gap(self) -> float:
        return self.ceiling - self.baseline


def study_rules(config: Mapping) -> list[LambdaRule]:
    """The rules a study measured, as its config names them (``one`` and ``val`` for studies before rules)."""
    names = ["one", *(["val"] if config.get("select_lambda", True) else []), *config.get("rules", {}).get("use", [])]
    out: dict[str, LambdaRule] = {}
    for n in names:
        try:
            r = get_rule(n)
        except Exception:  # a rule registered by code that is not loaded here: nothing to report for it
            continue
        out.setdefault(r.name, r)
    return list(out.values())



def rule_outcomes(rows: Sequence, config: Mapping, baselines: Mapping[tuple, float]) -> list[RuleOutcome]:
    """Every (rule, pair) outcome of a study's rows; pairs without a measured choice on test are left out."""
    rules = study_rules(config)
    grid = {lam_key(v) for v in config.get("lambdas", [])}
    val: dict[tuple, dict[float, float]] = defaultdict(dict)
    scores: dict[tuple, dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    secs: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    test: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        pk = (r.bits, r.donor, r.receiver, r.seed)
        if r.kind == "score":
            scores[pk][f"{r.split}.{r.metric}"][float(r.lam)] = r.value
            secs[pk][r.split][lam_key(r.lam)] = r.eval_seconds + r.patch_seconds + r.ptq_seconds
        elif r.kind == "patched" and r.split == "val" and (not grid or lam_key(r.lam) in grid):
            val[pk][float(r.lam)] = 100.0 * r.value
            secs[pk]["val"][lam_key(r.lam)] = r.eval_seconds + r.patch_seconds + r.ptq_seconds
        elif r.kind == "patched" and r.split == "test":
            test[pk][lam_key(r.lam)] = 100.0 * r.value
    per: dict[tuple, list[tuple[float, float, float, float]]] = defaultdict(list)
    for pk, accs in test.items():
        bits, donor, recv, _seed = pk
        v = val.get(pk, {})
        if grid and len(v) < len(grid):
            v = {}
        choices = pair_choices(rules, v, scores.get(pk, {}))
        base = baselines.get(("ft_ptq", recv, bits), NAN)
        for r in rules:
            if r.name not in choices:
                continue
            lam = choices[r.name]
            acc = base if lam == 0.0 else accs.get(lam_key(lam), NAN)
            if math.isnan(acc):
                continue
            by = v if r.signal == "val" else scores.get(pk, {}).get(r.metric or "", {})
            cost = sum(secs.get(pk, {}).get(r.signal or "", {}).values()) if r.signal else 0.0
            per[(r.name, bits, donor, recv)].append((acc, lam, by.get(lam, NAN), cost))
    out = []
    for (rule, bits, donor, recv), vals in sorted(per.items()):
        out.append(RuleOutcome(rule, bits, donor, recv, statistics.median_low([v[1] for v in vals]),
                               nanmean(v[0] for v in vals), baselines.get(("ft_ptq", recv, bits), NAN),
                               baselines.get(("qat_ptq", recv, bits), NAN), nanmean(v[2] for v in vals),
                               nanmean(v[3] for v in vals)))
    return out


def rule_stats(outs: Sequence[RuleOutcome]) -> dict[str, float]:
    """Mean and median Delta, win % (Delta > 0: choosing lambda = 0 is safe but not a win), worst pair, pooled
    recovery (sum of Delta over sum of gap, receivers with a gap of at least MIN_GAP_POINTS)."""
    d = [o.delta for o in outs if not math.isnan(o.delta)]
    if not d:
        return {"n": 0, "mean": NAN, "median": NAN, "win": NAN, "worst": NAN, "recovery": NAN, "lam": NAN,
                "refused": NAN}
    ok = [o for o in outs if o.gap >= MIN_GAP_POINTS]
    gap = sum(o.gap for o in ok)
    return {"n": len(d), "mean": sum(d) / len(d), "median": statistics.median(d),
            "win": 100.0 * sum(x > 0 for x in d) / len(d), "worst": min(d),
            "recovery": sum(o.delta for o in ok) / gap if gap else NAN,
            "lam": statistics.median([o.lam for o in outs]),
            "refused": 100.0 * sum(o.lam == 0.0 for o in outs) / len(outs)}


def choose_donors(outs: Sequence[RuleOutcome], rule: LambdaRule, with_mean: bool) -> list[RuleOutcome]:
    """Per (bits, receiver): the outcome whose score at its own choice is best among the single donors (and the
    mean of the others when ``with_mean``). Fixed rules have no score: nothing to choose."""
    if rule.metric is None:
        return []
    groups: dict[tuple, list[RuleOutcome]] = defaultdict(list)
    for o in outs:
        if o.rule == rule.name and o.donor != o.receiver and (with_mean or o.donor != MEAN_DONOR):
            groups[(o.bits, o.receiver)].append(o)
    sign = 1.0 if rule.higher_is_better else -1.0
    picked = []
    for _, cands in sorted(groups.items()):
        cands = [c for c in cands if not math.isnan(c.score)]
        if cands:
            picked.append(max(cands, key=lambda c: (sign * c.score, c.donor != MEAN_DONOR)))
    return picked


# -------------------------------------------------------------------------------------------------- tables
def _split(outs: Sequence[RuleOutcome], domain: Sequence[str]) -> list[tuple[str, list[RuleOutcome]]]:
    """The outcomes of single-donor pairs, with receivers of the probe's domain apart."""
    single = [o for o in outs if o.donor != MEAN_DONOR and o.donor != o.receiver]
    parts = [("", [o for o in single if o.receiver not in domain])]
    if domain:
        parts.append((f" (receivers in the probe's domain: {', '.join(domain)})",
                      [o for o in single if o.receiver in domain]))
    return [(t, p) for t, p in parts if p]


def rules_tables(outs: Sequence[RuleOutcome], rules: Sequence[LambdaRule], bits: int,
                 domain: Sequence[str] = (), probe: str = "") -> list[Table]:
    """Per rule at one bit-width: mean and median Delta, win %, worst pair, recovery, median lambda, how often it
    refused the vector (lambda = 0) and the receiver-side cost of choosing, per pair."""
    tables = []
    for i, (title, part) in enumerate(_split([o for o in outs if o.bits == bits], domain)):
        rows = []
        for r in rules:
            mine = [o for o in part if o.rule == r.name]
            if not mine:
                continue
            st = rule_stats(mine)
            rows.append([r.name, uses_label(r, probe), st["n"], st["mean"], st["median"], st["win"], st["worst"],
                         st["recovery"], f"{st['lam']:g}", st["refused"], statistics.median(o.seconds for o in mine)])
        name = f"rules_w{bits}" if i == 0 else f"rules_w{bits}_probe_domain"
        tables.append(Table(
            name, f"Lambda rules at {bits}-bit{title}: Δ on test (points over FT+PTQ)",
            ["Rule", "Receiver data used", "pairs", "Mean Δ", "Median Δ", "Win %", "Worst", "Recovery",
             "Median λ", "λ = 0 %", "Choose (s/pair)"], rows,
            "Each rule's λ is chosen per pair, then measured on the receiver's test split (λ = 0 is FT+PTQ itself: "
            "Δ = 0, safe, not a win). Win % counts Δ > 0. Recovery = ΣΔ / Σ(QAT+PTQ − FT+PTQ) over receivers with "
            f"a gap of at least {MIN_GAP_POINTS:g} points. Choose = receiver-side seconds to score every candidate "
            "of one pair (patch, PTQ and the rule's passes; none for fixed rules), the median over pairs, as "
            "measured in the grid workers (a busy machine inflates it).",
            formats=[None, None, None, ".1f", ".1f", ".0f", ".1f", ".2f", None, ".0f", ".1f"]))
    return tables


def donor_table(outs: Sequence[RuleOutcome], rules: Sequence[LambdaRule], bits: int,
                domain: Sequence[str] = (), probe: str = "") -> Table | None:
    """What choosing the donor gains over a single fixed donor, per rule (receivers of the probe's domain out)."""
    at = [o for o in outs if o.bits == bits and o.receiver not in domain and o.donor != o.receiver]
    has_mean = any(o.donor == MEAN_DONOR for o in at)
    rows = []
    for r in rules:
        mine = [o for o in at if o.rule == r.name]
        single = [o for o in mine if o.donor != MEAN_DONOR]
        if not single:
            continue
        per_donor = defaultdict(list)
        for o in single:
            per_donor[o.donor].append(o.delta)
        best_fixed = max(nanmean(v) for v in per_donor.values())
        mean_d = [o.delta for o in mine if o.donor == MEAN_DONOR]
        chosen = [o.delta for o in choose_donors(mine, r, with_mean=False)]
        chosen_m = [o.delta for o in choose_donors(mine, r, with_mean=True)] if has_mean else []
        rows.append([r.name, uses_label(r, probe), nanmean(o.delta for o in single), best_fixed,
                     nanmean(mean_d) if mean_d else NAN,
                     nanmean(chosen) if chosen else NAN, min(chosen) if chosen else NAN,
                     nanmean(chosen_m) if chosen_m else NAN, min(chosen_m) if chosen_m else NAN])
    if not rows:
        return None
    sfx = f"; receivers in the probe's domain ({', '.join(domain)}) left out" if domain else ""
    return Table(f"donors_w{bits}", f"Choosing the donor at {bits}-bit: mean Δ per receiver (points){sfx}",
                 ["Rule", "Receiver data used", "Single donor (mean)", "Best fixed donor", "Mean of others",
                  "Chosen donor", "Worst (chosen)", "Chosen incl. mean", "Worst (incl. mean)"], rows,
                 "Single donor = mean over every (donor, receiver) pair; best fixed donor = the one donor with the "
                 "best mean over receivers (picked in hindsight, on test). Mean of others = the mean of every other "
                 "donor's vector, λ by the rule. Chosen = per receiver, the candidate whose own score at its chosen "
                 "λ is best (the same label-free score; fixed rules cannot choose).")


def rules_figure(outs: Sequence[RuleOutcome], rules: Sequence[LambdaRule], bits_list: Sequence[int],
                 out_dir: Path, domain: Sequence[str] = ()) -> list[Path]:
    """Delta per rule: one dot per pair (probe-domain receivers hollow), the mean as a bar, per bit-width."""
    single = [o for o in outs if o.donor != MEAN_DONOR and o.donor != o.receiver]
    names = [r.name for r in rules if any(o.rule == r.name for o in single)]
    if not names:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(len(bits_list), 1, figsize=(max(6.0, 0.85 * len(names) + 2), 3.0 * len(bits_list)),
                             squeeze=False, constrained_layout=True)
    for ax, b in zip(axes[:, 0], bits_list, strict=True):
        for i, n in enumerate(names):
            mine = [o for o in single if o.rule == n and o.bits == b and not math.isnan(o.delta)]
            if not mine:
                continue
            out_d = [o.delta for o in mine if o.receiver not in domain]
            in_d = [o.delta for o in mine if o.receiver in domain]
            jit = [((k * 0.37) % 1 - 0.5) * 0.5 for k in range(len(mine))]
            ax.scatter([i + j for j in jit[:len(out_d)]], out_d, s=14, color="#4c72b0", alpha=0.8, zorder=3)
            ax.scatter([i + j for j in jit[len(out_d):]], in_d, s=14, facecolors="none", edgecolors="#c44e52",
                       zorder=3)
            if out_d:
                ax.hlines(nanmean(out_d), i - 0.35, i + 0.35, color="black", lw=2, zorder=4)
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("Δ over FT+PTQ (points)")
        ax.set_title(f"{b}-bit: Δ per rule (bar = mean{' without ' + ', '.join(domain) if domain else ''}; "
                     f"hollow = probe-domain receiver)", fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out_dir, "rules")

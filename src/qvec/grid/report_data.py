"""The data of a report: one study's rows, loaded from the results database into :class:`StudyData`.

Baselines and patched pairs are averaged over seeds; lambda* is re-derived from the stored validation rows with the
same rule the workers used (:func:`qvec.grid.plan.select_lambda`), so a report is a pure function of the database.
lambda* uses the receiver's validation data, so it is never called zero-shot; lambda = 1 is. The tables
(:mod:`qvec.grid.report_tables`) and figures (:mod:`qvec.grid.report_figures`) are functions of a StudyData.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from qvec.core.errors import QvecError
from qvec.grid.plan import lam_key, select_lambda
from qvec.grid.render import nanmean
from qvec.grid.report_pipelines import pipeline_cost, pipeline_patched
from qvec.grid.report_rules import MIN_GAP_POINTS, RuleOutcome, rule_outcomes, study_rules
from qvec.grid.store import ResultStore
from qvec.vectors.rules import MEAN_DONOR, LambdaRule

NAN = float("nan")
ZS = "λ = 1 (zero-shot)"
SEL = "λ* (val-selected, uses receiver data)"


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



def _ordered(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def _median_lambda(lams: Sequence[float]) -> float:
    """Median lambda* over seeds, ignoring seeds without one, and always a value of the grid (the lower median)."""
    known = [lam for lam in lams if not math.isnan(lam)]
    return statistics.median_low(known) if known else NAN


def study_rules_domain(data: StudyData) -> tuple[list[LambdaRule], list[str]]:
    """The lambda rules a study measured and its receivers in the probe's own domain (``rules.probe_domain``)."""
    domain = [t for t in data.config.get("rules", {}).get("probe_domain", []) if t in data.receivers]
    return study_rules(data.config), domain


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
        if r.kind == "score" or r.donor == MEAN_DONOR or r.kind.endswith(":patched"):
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
    baselines = {k: nanmean(v) for k, v in base_acc.items()}
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
        pairs.append(Pair(bits, donor, recv, nanmean(a for a, _, _ in vals), nanmean(s for _, s, _ in vals),
                          _median_lambda([lam for _, _, lam in vals]),
                          baselines.get(("ft_ptq", recv, bits), NAN), baselines.get(("qat_ptq", recv, bits), NAN)))
    tasks = config.get("tasks", [])
    receivers = _ordered({r.receiver for r in rows}, config.get("receivers") or tasks)
    donors = _ordered({p.donor for p in pairs}, config.get("donors") or tasks)
    bits_list = sorted({r.bits for r in rows if r.bits is not None})
    qat_cost = {(t.task, t.bits): t.seconds for t in store.trainings(study) if t.bits is not None}
    return StudyData(study, rows[0].model, receivers, donors, bits_list, baselines, pairs,
                     {k: nanmean(v) for k, v in cost.items()}, qat_cost, config, len(seeds),
                     rule_outcomes(rows, config, baselines), pipeline_patched(rows), pipeline_cost(rows))

"""The data of a report: one study's rows, loaded from the results database into :class:`StudyData`.

Baselines and patched pairs are averaged over seeds; lambda* is re-derived from the stored validation rows with the
same rule the workers used (:func:`qvec.vectors.rules.select_lambda`), so a report is a pure function of the database.
lambda* uses the receiver's validation data, so it is never called zero-shot; lambda = 1 is. The tables
(:mod:`qvec.grid.report_tables`) and figures (:mod:`qvec.grid.report_figures`) are functions of a StudyData.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from qvec.core.errors import QvecError
from qvec.grid.render import nanmean
from qvec.grid.report_rules import MIN_GAP_POINTS, RuleOutcome, rule_outcomes, study_rules
from qvec.grid.store import ResultStore
from qvec.vectors.rules import MEAN_DONOR, LambdaRule, lam_key, select_lambda

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
    #: the (pipeline, vector coverage) this data is the view of, and every view of the study in config order
    view: tuple[str, str] = ("rtn", "all")
    views: list[tuple[str, str]] = field(default_factory=list)
    #: the other views' data (filled for the view ``load_study`` returns; the siblings have none of their own)
    siblings: dict[tuple[str, str], StudyData] = field(default_factory=dict)
    #: bits -> (mean bits per weight of the view's quantizer, its quantizer label, mean seconds of one PTQ pass)
    quantizer: dict[int, tuple[float, str, float]] = field(default_factory=dict)

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


def primary_pipeline(config: Mapping) -> str:
    """The study's first pipeline (the paper's tables are its view); ``rtn`` for studies before pipelines."""
    return next(iter(config.get("pipeline_order") or config.get("pipelines") or {}), "rtn")


def row_view(r, primary: str) -> tuple[str, str, str]:
    """(pipeline, coverage, kind) of a row: ``""`` pipeline for float rows (every view shares them), and rows of
    databases before pipelines (kinds ``gptq:patched``, RTN without a pipeline) named as their config named them."""
    name, sep, rest = r.kind.partition(":")
    if sep:
        return name, "all", rest
    if r.bits is None:
        return "", "", r.kind
    return r.pipeline or primary, r.coverage or "", r.kind


def study_views(rows: Sequence, config: Mapping) -> list[tuple[str, str]]:
    """Every (pipeline, coverage) of a study, in config order; a pipeline measured alone only is one view."""
    primary = primary_pipeline(config)
    tagged = [row_view(r, primary) for r in rows]
    views = {(p, c or "all") for p, c, k in tagged if p and k == "patched"}
    views |= {(p, "all") for p, _, _ in tagged if p and not any(v[0] == p for v in views)}
    order = list(dict.fromkeys([primary, *(config.get("pipeline_order") or config.get("pipelines") or {}),
                                *(config.get("quantizers") or [])]))
    covs = ["all", "quantized"]
    return sorted(views, key=lambda v: (order.index(v[0]) if v[0] in order else len(order), v[0],
                                        covs.index(v[1]) if v[1] in covs else len(covs), v[1]))


def _view_rows(rows: Sequence, primary: str, view: tuple[str, str]) -> list:
    """The rows of one view, with plain kinds: float rows, the pipeline's alone rows, its cells at the coverage."""
    out = []
    for r in rows:
        pipe, cov, kind = row_view(r, primary)
        if pipe == "" or (pipe == view[0] and cov in ("", view[1])):
            out.append(r if kind == r.kind else replace(r, kind=kind))
    return out


def load_study(store: ResultStore, study: str | None = None, view: tuple[str, str] | None = None) -> StudyData:
    """Collect one view of a study (default: its primary pipeline at the first coverage) into baselines, pairs
    (with lambda* re-derived from validation) and costs; ``views`` lists every view the study has."""
    study = store.resolve_study(study)
    config = store.study_config(study)
    rows = store.results(study)
    if not rows:
        raise QvecError(f"{store.path}: study {study!r} has no results yet")
    primary = primary_pipeline(config)
    views = study_views(rows, config)
    if view is None:
        view = views[0] if views else (primary, "all")
    elif view not in views:
        raise QvecError(f"study {study!r} has no pipeline {view[0]!r} at coverage {view[1]!r} "
                        f"(it has: {', '.join(f'{p}/{c}' for p, c in views)})")
    trainings = store.trainings(study)
    data = _study_data(_view_rows(rows, primary, view), _view_config(config, view), trainings, study)
    data.view, data.views = view, views
    for v in views:
        if v != view:
            data.siblings[v] = _study_data(_view_rows(rows, primary, v), _view_config(config, v), trainings, study)
            data.siblings[v].view, data.siblings[v].views = v, views
    return data


def _view_config(config: Mapping, view: tuple[str, str]) -> dict:
    """The study's config as one view reads it: the lambda grid of that pipeline's cells (its own, if it has one)."""
    own = ((config.get("pipelines") or {}).get(view[0]) or {}).get("lambdas")
    return {**config, "lambdas": own} if own else dict(config)


def _quantizer_info(rows: Sequence) -> dict[int, tuple[float, str, float]]:
    by: dict[int, list] = defaultdict(list)
    for r in rows:
        if r.bits is not None:
            by[r.bits].append(r)
    return {b: (nanmean(r.bits_per_weight if r.bits_per_weight is not None else NAN for r in rs), rs[0].quant,
                nanmean(r.ptq_seconds for r in rs)) for b, rs in by.items()}


def _study_data(rows: Sequence, config: Mapping, trainings: Sequence, study: str) -> StudyData:
    seeds = sorted({r.seed for r in rows})
    base_acc: dict[tuple, list[float]] = defaultdict(list)
    val: dict[tuple, dict[float, float]] = defaultdict(dict)
    test: dict[tuple, dict[str, float]] = defaultdict(dict)
    cost: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.kind == "score" or r.donor == MEAN_DONOR:  # report_rules
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
    qat_cost = {(t.task, t.bits): t.seconds for t in trainings if t.bits is not None}
    return StudyData(study, rows[0].model, receivers, donors, bits_list, baselines, pairs,
                     {k: nanmean(v) for k, v in cost.items()}, qat_cost, config, len(seeds),
                     rule_outcomes(rows, config, baselines), quantizer=_quantizer_info(rows))

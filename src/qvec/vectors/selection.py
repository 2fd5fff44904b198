"""Choosing lambda and the donor without receiver labels: score Q(theta_FT^R + lam * tau) at every candidate with a
rule's signal (:mod:`qvec.vectors.measure`, with the deploy quantizer Q itself) and let the rule pick
(:func:`choose_lambda`, :func:`choose_donor`). ``qvec patch --lam auto`` and the grid's cells score through the same
measurement core, so a study and the command choose alike.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.core.schema import (
    META_DONOR,
    META_LAMBDA,
    META_LAMBDA_DONOR,
    META_LAMBDA_PROBE,
    META_LAMBDA_RULE,
    META_LAMBDA_SCORES,
)
from qvec.data.probe import ProbeSet
from qvec.data.tasks import Task
from qvec.quant import QuantizerConfig, QuantSpec
from qvec.quant.targets import ALL_TARGETS, TargetFilter
from qvec.vectors.measure import Bench
from qvec.vectors.rules import DEFAULT_LAMBDAS, MEAN_DONOR, LambdaRule, get_rule, uses_label
from qvec.vectors.signals import ImageAgreement, Signal, make_signal
from qvec.vectors.vector import QuantVector


@dataclass
class LambdaChoice:
    """What a rule chose, and every candidate's score: ``scores[donor][lam]`` (the rule's metric)."""

    rule: str
    metric: str | None
    lam: float
    donor: str
    scores: dict[str, dict[float, float]]
    #: seconds spent scoring (patch + PTQ + probe passes), the cost of choosing for this receiver
    seconds: float = 0.0
    probe: str = ""
    uses: str = ""

    def table(self) -> list[tuple[str, float, float]]:
        """(donor, lambda, score) for every candidate, in donor then lambda order."""
        return [(d, lam, s) for d, by in self.scores.items() for lam, s in sorted(by.items())]

    def to_meta(self) -> dict[str, str]:
        """The header metadata a patched checkpoint records (``qvec.lambda_rule``, ``qvec.lambda``, ...)."""
        return {META_LAMBDA_RULE: self.rule, META_LAMBDA: f"{self.lam:g}", META_LAMBDA_DONOR: self.donor,
                META_LAMBDA_SCORES: json.dumps({d: {f"{lam:g}": s for lam, s in by.items()}
                                                for d, by in self.scores.items()}, sort_keys=True),
                META_LAMBDA_PROBE: self.probe}


def rule_signal(rule: LambdaRule, probe: ProbeSet | str | Path | None, probe_size: int,
                task: Task | None) -> Signal | None:
    """The signal a rule reads, on the images given (None for a fixed lambda)."""
    if rule.signal is None:
        return None
    if rule.signal == "unlabeled" and probe is None and task is None:
        raise QvecError(f"lambda rule {rule.name!r} needs the receiver's unlabeled inputs: probe=... or task=...")
    source = probe if isinstance(probe, ProbeSet) or probe is None else str(probe)
    if rule.signal == "probe" and source is None:
        raise QvecError(f"lambda rule {rule.name!r} needs probe images: a folder, an .npz file or 'noise'")
    return make_signal(rule.signal, source, probe_size)


def _vectors(vectors) -> dict[str, QuantVector]:
    if isinstance(vectors, QuantVector):
        return {vectors.meta.get(META_DONOR, "vector"): vectors}
    if isinstance(vectors, Mapping):
        return dict(vectors)
    out: dict[str, QuantVector] = {}
    for i, v in enumerate(vectors):
        name = v.meta.get(META_DONOR, f"vector{i}")
        out[name if name not in out else f"{name}#{i}"] = v
    return out


def score_candidates(bench: Bench, rule: LambdaRule, signal: Signal | None, vecs: Mapping[str, QuantVector],
                     lambdas: Iterable[float], quant: QuantizerConfig | QuantSpec, calibration=None,
                     calibration_size: int = 128, on_score: Callable[[str, float, float], None] | None = None
                     ) -> dict[str, dict[float, float]]:
    """The rule's metric at every (donor, lambda) candidate; lambda = 0 is one model whatever the donor."""
    scores: dict[str, dict[float, float]] = {}
    zero = None
    for name, vec in vecs.items():
        scores[name] = {}
        for lam in rule.candidates(lambdas):
            if lam == 0.0 and zero is not None:
                scores[name][lam] = zero
                continue
            s = math.nan
            if signal is not None:
                m = bench.measure(signal, vector=vec if lam else None, lam=lam, quant=quant,
                                  calibration=calibration, calibration_size=calibration_size)[signal.name]
                s = m[rule.measure]  # type: ignore[index]
            if lam == 0.0:
                zero = s
            scores[name][lam] = s
            if on_score is not None:
                on_score(name, lam, s)
    return scores


def choose_donor(
    receiver: Checkpoint | str | Path | Bench,
    vectors: Mapping[str, QuantVector] | Sequence[QuantVector] | QuantVector,
    quant: QuantizerConfig | QuantSpec,
    *,
    rule: str | LambdaRule = "agree",
    probe: ProbeSet | str | Path | None = None,
    probe_size: int = 1000,
    lambdas: Iterable[float] = DEFAULT_LAMBDAS,
    include_mean: bool = True,
    require_choice: bool = True,
    targets: TargetFilter | bool = ALL_TARGETS,
    task: Task | None = None,
    batch_size: int = 64,
    calibration: torch.Tensor | ProbeSet | str | None = None,
    calibration_size: int = 128,
    on_score: Callable[[str, float, float], None] | None = None,
) -> LambdaChoice:
    """Score every (donor, lambda) candidate with ``rule`` under the deploy quantizer ``quant`` and return the
    best, with every score.

    The candidates are each vector, their mean (``include_mean``, when there are several) and, for label-free
    rules, lambda = 0 (no patch). ``require_choice`` refuses a single vector: there is no donor to choose.
    ``task`` is the receiver's task, needed only by ``val`` (and by ``agree-unlabeled`` when ``probe`` is None).
    ``calibration`` feeds a calibrated quantizer (GPTQ): ``receiver`` (with ``task``), ``noise``, a path or images.
    """
    rule = get_rule(rule)
    vecs = _vectors(vectors)
    if not vecs:
        raise QvecError("choosing lambda needs at least one quantization vector")
    if require_choice and len(vecs) < 2:
        raise QvecError(f"donor choice needs at least two vectors, got {len(vecs)} ({', '.join(vecs)})")
    if include_mean and len(vecs) > 1:
        vecs[MEAN_DONOR] = QuantVector.mean(vecs.values())
    bench = receiver if isinstance(receiver, Bench) else Bench(receiver, task, targets=targets,
                                                               batch_size=batch_size)
    for v in vecs.values():
        v.check_applicable(bench.ft, bench.receiver.name("the receiver"))
    t0 = time.perf_counter()
    signal = rule_signal(rule, probe, probe_size, bench.task)
    scores = score_candidates(bench, rule, signal, vecs, lambdas, quant, calibration, calibration_size, on_score)
    secs = time.perf_counter() - t0
    if rule.metric is None:
        lam, donor = float(rule.value), next(iter(vecs))  # type: ignore[arg-type]
    else:
        best = {d: rule.choose(by) for d, by in scores.items()}
        sign = -1.0 if rule.higher_is_better else 1.0
        # Best score over donors; ties to the earlier candidate (config order, the mean last).
        order = list(vecs)
        donor = min(best, key=lambda d: (sign * scores[d][best[d]], order.index(d)))
        lam = best[donor]
    probe_name = signal.source_name(bench) if isinstance(signal, ImageAgreement) else ""
    return LambdaChoice(rule.name, rule.metric, lam, donor, scores, secs, probe_name, uses_label(rule, probe_name))


def choose_lambda(
    receiver: Checkpoint | str | Path | Bench,
    vector: QuantVector,
    quant: QuantizerConfig | QuantSpec,
    *,
    rule: str | LambdaRule = "agree",
    probe: ProbeSet | str | Path | None = None,
    probe_size: int = 1000,
    lambdas: Iterable[float] = DEFAULT_LAMBDAS,
    targets: TargetFilter | bool = ALL_TARGETS,
    task: Task | None = None,
    batch_size: int = 64,
    calibration: torch.Tensor | ProbeSet | str | None = None,
    calibration_size: int = 128,
) -> LambdaChoice:
    """The lambda ``rule`` picks for one vector on ``receiver`` under the deploy quantizer ``quant``, with every
    candidate's score (lambda = 0 included for label-free rules: a vector that only hurts is refused)."""
    return choose_donor(receiver, {vector.meta.get(META_DONOR, "vector"): vector}, quant, rule=rule, probe=probe,
                        probe_size=probe_size, lambdas=lambdas, include_mean=False, require_choice=False,
                        targets=targets, task=task, batch_size=batch_size, calibration=calibration,
                        calibration_size=calibration_size)

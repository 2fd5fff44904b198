"""Choosing lambda and the donor without receiver labels: the scores of PTQ(theta_FT^R + lam * tau) at each
candidate, and :func:`choose_lambda` / :func:`choose_donor`, which apply a :mod:`qvec.rules` rule to them.

The scores compare the patched, quantized model with the receiver's own full-precision FT model, the model whose
behaviour PTQ should keep: on probe images (mean KL(FT || patched) and top-1 agreement) or, with no images, on the
weights. The grid workers (:mod:`qvec.grid.jobs`) call the same functions, so a study and ``qvec patch --lam auto``
score alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
from qvec.data.probe import ProbeSet, load_probe, noise_probe, receiver_probe
from qvec.models import load_model
from qvec.quant import QuantSpec, fake_quantize, quantize_
from qvec.quant.targets import TargetFilter
from qvec.train.evaluate import evaluate
from qvec.vectors.rules import DEFAULT_LAMBDAS, IMAGE_SIGNALS, MEAN_DONOR, LambdaRule, get_rule
from qvec.vectors.vector import QuantVector


# -------------------------------------------------------------------------------------------------- scores
@dataclass(frozen=True)
class Reference:
    """The FT model's log-probabilities on a probe's preprocessed images: what the patched model must keep."""

    inputs: torch.Tensor
    logp: torch.Tensor

    @property
    def top1(self) -> torch.Tensor:
        return self.logp.argmax(dim=-1)


def _log_probs(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                out.append(F.log_softmax(model(x[s : s + batch_size].to(device)).float(), dim=-1).cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def reference(model: nn.Module, probe: ProbeSet, config, batch_size: int = 64) -> Reference:
    """Run the (full-precision FT) model on the probe once; every candidate is scored against this."""
    x = probe.tensors(config)
    return Reference(x, _log_probs(model, x, batch_size))


def agreement(model: nn.Module, ref: Reference, batch_size: int = 64) -> dict[str, float]:
    """``kl``: mean KL(FT || model) in nats per image; ``agree``: share of images with the FT model's top-1."""
    logq = _log_probs(model, ref.inputs, batch_size)
    kl = (ref.logp.exp() * (ref.logp - logq)).sum(dim=-1).mean()
    agree = (logq.argmax(dim=-1) == ref.top1).float().mean()
    return {"kl": float(kl), "agree": float(agree)}


def weight_errors(weights: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Squared distance of each (quantized) weight to the FT weight of the same name."""
    return {k: float((w.float() - ft[k].float()).pow(2).sum()) for k, w in weights.items()}


def weight_score(errs: Mapping[str, float], errs0: Mapping[str, float]) -> float:
    """The weight rule's metric: mean over layers of log(||Q(FT + lam tau) - FT|| / ||Q(FT) - FT||); 0 at lam = 0."""
    logs = [0.5 * math.log(max(errs[k], 1e-30) / max(errs0[k], 1e-30)) for k in errs]
    return sum(logs) / len(logs) if logs else 0.0


def ptq_errors(ft: Mapping[str, torch.Tensor], keys: Iterable[str], quant: QuantSpec) -> dict[str, float]:
    """The weight errors of plain PTQ of FT (lambda = 0), the weight rule's reference."""
    return weight_errors({k: fake_quantize(ft[k], quant) for k in keys}, ft)


# ------------------------------------------------------------------------------------------------ choosing
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
        import json

        return {META_LAMBDA_RULE: self.rule, META_LAMBDA: f"{self.lam:g}", META_LAMBDA_DONOR: self.donor,
                META_LAMBDA_SCORES: json.dumps({d: {f"{lam:g}": s for lam, s in by.items()}
                                                for d, by in self.scores.items()}, sort_keys=True),
                META_LAMBDA_PROBE: self.probe}


@dataclass
class _Scorer:
    """The receiver's model with direct handles on its quantization targets; scores candidates in place."""

    model: nn.Module
    targets: list
    ft: dict[str, torch.Tensor]
    quant: QuantSpec
    config: object
    batch_size: int
    refs: dict[str, Reference] = field(default_factory=dict)
    errs0: dict[str, float] | None = None

    @torch.no_grad()
    def set_weights(self, vec: QuantVector | None, lam: float) -> None:
        live = self.model.state_dict(keep_vars=True)
        for k, v in self.ft.items():
            dst = live[k].detach()
            if vec is not None and lam and k in vec.tensors:
                torch.add(v, vec.tensors[k], alpha=lam, out=dst)
            else:
                dst.copy_(v)

    def score(self, rule: LambdaRule, vec: QuantVector | None, lam: float, task=None) -> float:
        self.set_weights(vec, lam)
        quantize_(self.model, self.quant, self.targets)
        signal, measure = rule.signal, rule.measure
        if signal == "weight":
            if self.errs0 is None:
                self.errs0 = ptq_errors(self.ft, [t.key for t in self.targets], self.quant)
            live = self.model.state_dict()
            return weight_score(weight_errors({t.key: live[t.key] for t in self.targets}, self.ft), self.errs0)
        if signal == "val":
            if task is None:
                raise QvecError(f"lambda rule {rule.name!r} needs the receiver's labelled task (task=...)")
            return evaluate(self.model, task, "val", batch_size=self.batch_size, config=self.config).accuracy
        return agreement(self.model, self.refs[signal], self.batch_size)[measure]  # type: ignore[index]


def _probe_for(rule: LambdaRule, probe, probe_size: int, task, config) -> ProbeSet | None:
    if rule.signal not in IMAGE_SIGNALS:
        return None
    if rule.signal == "noise" and probe is None:
        return noise_probe(probe_size, config.image_size)
    if rule.signal == "unlabeled" and probe is None and task is not None:
        return receiver_probe(task, probe_size)
    if probe is None:
        raise QvecError(f"lambda rule {rule.name!r} needs probe images: a folder, an .npz file or 'noise'")
    return load_probe(probe, probe_size, noise_size=config.image_size)


def _check_vector(name: str, vec: QuantVector, ft: Mapping[str, torch.Tensor], receiver: str) -> None:
    for k, t in vec.tensors.items():
        if k not in ft:
            raise QvecError(f"vector {name!r}: tensor {k!r} is not a backbone tensor of {receiver}")
        if tuple(t.shape) != tuple(ft[k].shape):
            raise QvecError(f"vector {name!r}: {k!r} has shape {tuple(t.shape)} but {receiver} has "
                            f"{tuple(ft[k].shape)}")


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


def _scorer(ck: Checkpoint, quant: QuantSpec, include_in_proj: bool, batch_size: int) -> _Scorer:
    model, adapter, spec = load_model(ck)
    for p in model.parameters():
        p.requires_grad_(False)
    keys = set(adapter.backbone_keys(ck.state))
    ft = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
    targets = TargetFilter.of(include_in_proj).find(model, adapter.head_prefixes)
    return _Scorer(model, targets, ft, quant, adapter.data_config(spec, model),
                   batch_size)


def _score_all(sc: _Scorer, rule: LambdaRule, vecs: Mapping[str, QuantVector], lambdas: Iterable[float], task,
               on_score: Callable[[str, float, float], None] | None) -> dict[str, dict[float, float]]:
    """The rule's metric at every (donor, lambda) candidate; lambda = 0 is one model whatever the donor."""
    scores: dict[str, dict[float, float]] = {}
    zero = None
    for name, vec in vecs.items():
        scores[name] = {}
        for lam in rule.candidates(lambdas):
            if lam == 0.0 and zero is not None:
                scores[name][lam] = zero
                continue
            s = sc.score(rule, vec, lam, task) if rule.metric else math.nan
            if lam == 0.0:
                zero = s
            scores[name][lam] = s
            if on_score is not None:
                on_score(name, lam, s)
    return scores


def choose_donor(
    receiver: Checkpoint | str | Path,
    vectors: Mapping[str, QuantVector] | Sequence[QuantVector] | QuantVector,
    quant: QuantSpec,
    *,
    rule: str | LambdaRule = "agree",
    probe: ProbeSet | str | Path | None = None,
    probe_size: int = 1000,
    lambdas: Iterable[float] = DEFAULT_LAMBDAS,
    include_mean: bool = True,
    require_choice: bool = True,
    include_in_proj: bool = True,
    task=None,
    batch_size: int = 64,
    on_score: Callable[[str, float, float], None] | None = None,
) -> LambdaChoice:
    """Score every (donor, lambda) candidate with ``rule`` and return the best, with every score.

    The candidates are each vector, their mean (``include_mean``, when there are several) and, for label-free
    rules, lambda = 0 (no patch). ``require_choice`` refuses a single vector: there is no donor to choose.
    ``task`` is the receiver's task, needed only by ``val`` (and by ``agree-unlabeled`` when ``probe`` is None).
    """
    rule = get_rule(rule)
    vecs = _vectors(vectors)
    if not vecs:
        raise QvecError("choosing lambda needs at least one quantization vector")
    if require_choice and len(vecs) < 2:
        raise QvecError(f"donor choice needs at least two vectors, got {len(vecs)} ({', '.join(vecs)})")
    if include_mean and len(vecs) > 1:
        vecs[MEAN_DONOR] = QuantVector.mean(vecs.values())
    ck = receiver if isinstance(receiver, Checkpoint) else Checkpoint.load(receiver)
    sc = _scorer(ck, quant, include_in_proj, batch_size)
    for name, v in vecs.items():
        _check_vector(name, v, sc.ft, ck.name())
    t0 = time.perf_counter()
    pr = _probe_for(rule, probe, probe_size, task, sc.config)
    if pr is not None:
        sc.refs[rule.signal] = reference(sc.model, pr, sc.config, batch_size)  # type: ignore[index]
    scores = _score_all(sc, rule, vecs, lambdas, task, on_score)
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
    return LambdaChoice(rule.name, rule.metric, lam, donor, scores, secs, pr.name if pr is not None else "",
                        rule.uses)


def choose_lambda(
    receiver: Checkpoint | str | Path,
    vector: QuantVector,
    quant: QuantSpec,
    *,
    rule: str | LambdaRule = "agree",
    probe: ProbeSet | str | Path | None = None,
    probe_size: int = 1000,
    lambdas: Iterable[float] = DEFAULT_LAMBDAS,
    include_in_proj: bool = True,
    task=None,
    batch_size: int = 64,
) -> LambdaChoice:
    """The lambda ``rule`` picks for one vector on ``receiver``, with every candidate's score (lambda = 0 included
    for label-free rules: a vector that only hurts is refused)."""
    return choose_donor(receiver, {vector.meta.get(META_DONOR, "vector"): vector}, quant, rule=rule, probe=probe,
                        probe_size=probe_size, lambdas=lambdas, include_mean=False, require_choice=False,
                        include_in_proj=include_in_proj, task=task, batch_size=batch_size)

"""The paper's local theory (Proposition 1) with a real metric: a diagonal Fisher of the receiver as H.

Proposition 1 predicts, for a receiver with its own quantization vector rho_R and a donor vector rho_D,

    lambda_pred = <rho_D, rho_R>_H / ||rho_D||_H^2      and a recovered share of   cos_H^2(rho_D, rho_R).

The authors checked it only with H = I, where it failed. Here H is the diagonal Fisher information of the
receiver's FT model, estimated from a few receiver examples with labels drawn from the model's own predictive
distribution (the true Fisher, not the empirical one). This needs the receiver's data and its own QAT run, so it
is a check of the theory, never a zero-shot rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qvec.core.errors import QvecError


def diagonal_fisher(model: nn.Module, inputs: torch.Tensor, keys: Sequence[str], seed: int = 0,
                    batch_size: int = 8) -> dict[str, torch.Tensor]:
    """E_x E_{y ~ p(y|x)} [grad log p(y|x)^2] for the named parameters, over ``inputs`` (preprocessed).

    Gradients are taken per small batch (``batch_size`` examples share one sampled-label gradient): exact per
    example at ``batch_size = 1``, a cheaper estimate above it.
    """
    params = dict(model.named_parameters())
    missing = [k for k in keys if k not in params]
    if missing:
        raise QvecError(f"Fisher: {missing[0]!r} is not a parameter of the model")
    chosen = [params[k] for k in keys]
    was = [p.requires_grad for p in chosen]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    fisher = {k: torch.zeros_like(params[k]) for k in keys}
    g = torch.Generator().manual_seed(seed)
    mode = model.training
    model.eval()
    n = 0
    try:
        for s in range(0, len(inputs), batch_size):
            x = inputs[s : s + batch_size]
            logp = F.log_softmax(model(x).float(), dim=-1)
            y = torch.multinomial(logp.detach().exp(), 1, generator=g).squeeze(1)
            loss = F.nll_loss(logp, y, reduction="sum") / len(x) ** 0.5
            grads = torch.autograd.grad(loss, chosen)
            for k, gr in zip(keys, grads, strict=True):
                fisher[k].add_(gr.detach().pow(2))
            n += 1
    finally:
        model.train(mode)
        for p, w in zip(chosen, was, strict=True):
            p.requires_grad_(w)
    if n == 0:
        raise QvecError("Fisher: no input examples")
    return {k: v / n for k, v in fisher.items()}


@dataclass(frozen=True)
class Prediction:
    """Proposition 1's prediction for one (donor, receiver) pair under a metric H."""

    lam: float
    cos2: float


def predict(rho_d: Mapping[str, torch.Tensor], rho_r: Mapping[str, torch.Tensor],
            h: Mapping[str, torch.Tensor] | None = None) -> Prediction:
    """lambda_pred and cos^2 in the metric ``h`` (diagonal, per tensor; None: the identity) over shared keys."""
    keys = [k for k in rho_d if k in rho_r and (h is None or k in h)]
    if not keys:
        raise QvecError("Proposition 1: the two vectors share no tensor")
    dr = dd = rr = 0.0
    for k in keys:
        a, b = rho_d[k].double(), rho_r[k].double()
        w = h[k].double() if h is not None else 1.0
        dr += float((w * a * b).sum())
        dd += float((w * a * a).sum())
        rr += float((w * b * b).sum())
    if dd <= 0 or rr <= 0:
        return Prediction(float("nan"), float("nan"))
    return Prediction(dr / dd, dr * dr / (dd * rr))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties), NaN pairs dropped; NaN under 3 pairs."""
    pts = [(a, b) for a, b in zip(x, y, strict=True) if np.isfinite(a) and np.isfinite(b)]
    if len(pts) < 3:
        return float("nan")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in np.unique(v):  # ties share their mean rank
            m = v == val
            r[m] = r[m].mean()
        return r

    a, b = ranks(np.array([p[0] for p in pts])), ranks(np.array([p[1] for p in pts]))
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])

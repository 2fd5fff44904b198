"""Quantization-aware training by parametrization: the forward pass sees fake-quantized weights.

``prepare_qat`` registers a :mod:`torch.nn.utils.parametrize` parametrization on every target, so the module
computes with ``W + (RTN(W) - W).detach()`` (a straight-through estimator) while the optimizer updates the latent
float ``W``. ``convert_qat`` removes the parametrizations and leaves the latent weights under the original keys,
so a QAT checkpoint has exactly the keys of an FT checkpoint (SPEC section 3).

Given a quantizer config rather than a grid, QAT trains on that quantizer's trainable grid
(:attr:`qvec.quant.base.QuantizerConfig.trainable_grid`), so that the donor's vector is matched to the quantizer
it will be deployed with (an asymmetric group-wise grid, say).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from qvec.quant.base import QuantizerConfig
from qvec.quant.grid import QuantSpec, fake_quantize_, finite_checks_off
from qvec.quant.targets import Target, TargetFilter, find_targets


class FakeQuantSTE(nn.Module):
    """Parametrization ``W -> W + (RTN(W) - W).detach()``: quantized forward, identity gradient."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            with finite_checks_off():
                wq = w.detach().clone()
                fake_quantize_(wq, self.spec)
        return w + (wq - w).detach()

    def extra_repr(self) -> str:
        return str(self.spec)


def qat_grid(spec: QuantSpec | QuantizerConfig) -> QuantSpec:
    """The grid QAT trains on: a grid itself, or a quantizer's trainable grid."""
    return spec.trainable_grid if isinstance(spec, QuantizerConfig) else spec


def prepare_qat(model: nn.Module, spec: QuantSpec | QuantizerConfig,
                targets: Sequence[Target] | TargetFilter | None = None) -> nn.Module:
    """Make ``model`` (in place) see fake-quantized target weights in its forward pass; returns ``model``."""
    if targets is None or isinstance(targets, TargetFilter):
        targets = find_targets(model, targets=targets if targets is not None else TargetFilter())
    grid = qat_grid(spec)
    for t in targets:
        if not parametrize.is_parametrized(t.module, t.attr):
            parametrize.register_parametrization(t.module, t.attr, FakeQuantSTE(grid), unsafe=True)
    return model


def is_qat(model: nn.Module) -> bool:
    """True when some module of ``model`` carries a fake-quantization parametrization."""
    for m in model.modules():
        params = getattr(m, "parametrizations", None)
        if params is not None and any(isinstance(p, FakeQuantSTE) for pl in params.values() for p in pl):
            return True
    return False


def convert_qat(model: nn.Module) -> nn.Module:
    """Remove fake quantization in place, keeping the latent float weights under their original keys."""
    for m in list(model.modules()):
        params = getattr(m, "parametrizations", None)
        if params is None:
            continue
        for attr in list(params.keys()):
            if any(isinstance(p, FakeQuantSTE) for p in params[attr]):
                parametrize.remove_parametrizations(m, attr, leave_parametrized=False)
    return model

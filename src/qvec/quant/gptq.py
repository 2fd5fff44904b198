"""GPTQ (Frantar et al., 2023): calibrated weight-only PTQ on the same integer grid as RTN.

Each target weight W (out x in) is quantized column by column; the rounding error of a column is spread over the
columns not yet quantized through the inverse of the layer Hessian H = 2 X^T X / N of its calibration inputs X,
as in the published algorithm: damping of H by ``damp`` x mean(diag H), columns in order of decreasing diag(H)
(``act_order``), and lazy batch updates over blocks of ``block_size`` columns. The scales and zero points are
RTN's, computed from the original weight (for groups: static groups in the original column order), so the codes
stay on RTN's grid and ``pack`` stores them in the same packed format.

Targets are processed in depth order, one forward pass per block of the model (targets that share a numbered
module such as ``blocks.3``): later blocks see the already-quantized earlier ones, as in the reference code.

Written here rather than taken from torchao: torchao's GPTQ (``Int4WeightOnlyGPTQQuantizer``) is tied to its
int4 tinygemm layout (4 bits, asymmetric groups, bf16, CUDA kernels), not to a 2-8-bit symmetric per-channel grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qvec.core.errors import QvecError
from qvec.quant.base import QParams, QuantizerConfig, register_quantizer
from qvec.quant.calibration import check_calibration
from qvec.quant.grid import QuantSpec, compute_qparams, grouped_view
from qvec.quant.targets import Target


@register_quantizer
@dataclass(frozen=True)
class GPTQConfig(QuantizerConfig):
    """GPTQ on the integer grid ``grid`` (RTN's scales, the codes chosen with the layer Hessian)."""

    method: ClassVar[str] = "gptq"
    label: ClassVar[str] = "GPTQ"
    needs_calibration: ClassVar[bool] = True

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise QvecError(f"GPTQ damp must be in (0, 1), got {self.damp!r}")
        if self.block_size < 1:
            raise QvecError(f"GPTQ block_size must be positive, got {self.block_size!r}")

    def quantize_model_(self, model: nn.Module, targets: Sequence[Target],
                        calibration: torch.Tensor | None) -> dict[str, QParams]:
        return gptq_quantize_(model, self, targets, calibration)


def _columns(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN's scales (and zeros) of ``w`` expanded to one value per weight element (out x in)."""
    scale, zero = compute_qparams(w, spec)
    g = grouped_view(w, spec)
    full = scale.expand_as(g).reshape(w.shape)
    return full, (zero.expand_as(g).reshape(w.shape) if zero is not None else None)


def _block_of(key: str) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.3``: targets of one block share a calibration pass."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return key


class _BlockDone(Exception):
    """Raised by the hook on a block once its targets have seen their inputs: the rest of the forward is not needed."""


def _stop_after(model: nn.Module, block: str):
    """A forward hook that ends the calibration pass after ``block`` (None when ``block`` names no module)."""
    try:
        module = model.get_submodule(block)
    except AttributeError:
        return None

    def stop(*_args) -> None:
        raise _BlockDone

    return module.register_forward_hook(stop)


class _Hessian:
    """Running H = 2 X^T X / N of a module's inputs (a forward pre-hook)."""

    def __init__(self, cols: int) -> None:
        self.h = torch.zeros(cols, cols, dtype=torch.float64)
        self.n = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            x = x.transpose(0, 1)
        x = x.reshape(-1, x.shape[-1]).double()
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m))
        self.n += m
        x = x.mul_((2.0 / self.n) ** 0.5)
        self.h.add_(x.T @ x)


@torch.no_grad()
def gptq_weight(w: torch.Tensor, h: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor | None]:
    """GPTQ of one 2-D weight given its Hessian; returns (quantized weight, RTN scales, zeros) on RTN's grid."""
    spec = config.grid
    w0 = w.detach().float().reshape(w.shape[0], -1)
    scale, zero = compute_qparams(w0, spec)
    s_full, z_full = _columns(w0, spec)
    W = w0.clone()
    H = h.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if config.act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    S = s_full[:, perm]
    Z = z_full[:, perm] if z_full is not None else None
    damp = config.damp * torch.diag(H).mean()
    for attempt in range(4):
        try:
            L = torch.linalg.cholesky(H + (damp * 10**attempt) * torch.eye(cols, dtype=H.dtype))
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
            break
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite; damp more
            continue
    else:
        raise QvecError("GPTQ: the layer Hessian is not positive definite even with 1000x damping")
    Q = torch.zeros_like(W)
    lo, hi = spec.qmin, spec.qmax
    B = config.block_size
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s = W1[:, i], S[:, i1 + i]
            if Z is None:
                q = torch.clamp(torch.round(col / s), lo, hi) * s
            else:
                z = Z[:, i1 + i]
                q = (torch.clamp(torch.round(col / s) + z, lo, hi) - z) * s
            Q[:, i1 + i] = q
            err = (col - q) / Hb[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hb[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return Q.reshape(w.shape).to(w.dtype), scale, zero


@torch.no_grad()
def gptq_quantize_(model: nn.Module, config: GPTQConfig, targets: Sequence[Target],
                   calibration: torch.Tensor | None = None, batch_size: int = 32) -> dict[str, tuple]:
    """GPTQ of every target in place, block by block in depth order; returns each target's (scale, zero)."""
    x = check_calibration(calibration, label=config.label)
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(_block_of(t.key), []).append(t)
    qparams: dict[str, tuple] = {}
    was = model.training
    model.eval()
    try:
        for members in groups.values():
            hooks, hess = [], {}
            for t in members:
                w = t.weight
                hess[t.key] = _Hessian(w.reshape(w.shape[0], -1).shape[1])
                hooks.append(t.module.register_forward_pre_hook(hess[t.key]))
            stop = _stop_after(model, _block_of(members[0].key))  # later blocks' outputs are not used
            if stop is not None:
                hooks.append(stop)
            try:
                for s in range(0, len(x), batch_size):
                    try:
                        model(x[s : s + batch_size])
                    except _BlockDone:
                        pass
            finally:
                for hk in hooks:
                    hk.remove()
            for t in members:
                w = t.weight
                q, scale, zero = gptq_weight(w, hess[t.key].h, config)
                w.copy_(q)
                qparams[t.key] = (scale, zero)
    finally:
        model.train(was)
    return qparams

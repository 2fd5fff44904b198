"""HQQ (Badri and Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models"): data-free
asymmetric quantization whose zero points are optimised, per row of the grid, for a sparsity-promoting l_p error
(p < 1) by a half-quadratic solver.

With the min-max scale fixed, the solver alternates (for ``iters`` rounds, or until the mean absolute error of the
tensor stops improving): quantize with the current zero; shrink the residual with the generalised soft threshold of
l_p (``beta`` the penalty, growing by ``kappa`` each round); set the zero so the shrunk residual's reconstruction
matches. This is the `hqq` package's ``optimize_weights_proximal_legacy`` written on qvec's grid (scale = 1 / hqq's
scale); tests/test_hqq.py checks it against the package where it is installed, and docs/quantizers.md compares the
two. Zero points are real-valued, so they are stored as fp16 beside the fp16 scales.

QAT cannot train through HQQ's solver; the nearest trainable grid is the same asymmetric grid with RTN's min-max
scale and integer zero point, and that is what a vector matched to HQQ is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qvec.core.errors import QvecError
from qvec.quant.base import QuantizerConfig, register_quantizer
from qvec.quant.grid import EPS, QuantSpec, grouped_view, require_finite


@register_quantizer
@dataclass(frozen=True)
class HQQ(QuantizerConfig):
    """HQQ on an asymmetric grid: min-max scales, zero points optimised by the half-quadratic solver."""

    method: ClassVar[str] = "hqq"
    label: ClassVar[str] = "HQQ"
    zero_dtype: ClassVar[str] = "float16"

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    #: stop as soon as a round does not lower the mean absolute error (as the hqq package does)
    early_stop: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid.symmetric:
            raise QvecError("HQQ optimises zero points: it needs an asymmetric grid (--asymmetric, symmetric = false)")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise QvecError(f"HQQ iters must be a non-negative integer, got {self.iters!r}")
        if not 0 < self.lp_norm <= 1:
            raise QvecError(f"HQQ lp_norm must be in (0, 1], got {self.lp_norm!r}")
        if not self.beta > 0 or not self.kappa >= 1:
            raise QvecError(f"HQQ needs beta > 0 and kappa >= 1, got {self.beta!r}, {self.kappa!r}")

    @property
    def trainable_grid(self) -> QuantSpec:
        return self.grid  # RTN on the same asymmetric grid: min-max scale, integer zero point

    def quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        g = grouped_view(w.detach().float().contiguous(), self.grid)
        q, scale, zero = hqq_rows(g, self.grid.qmax, self.iters, self.lp_norm, self.beta, self.kappa,
                                  self.early_stop)
        return ((q - zero) * scale).reshape(w.shape).to(w.dtype), scale, zero

    def __str__(self) -> str:
        return f"hqq-{self.grid}"


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft threshold of the l_p norm (p <= 1): the proximal step of the half-quadratic split."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * (x.abs() + 1e-8).pow(p - 1))


@torch.no_grad()
def hqq_rows(g: torch.Tensor, qmax: int, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
             kappa: float = 1.01, early_stop: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (float, 0..qmax), scales and real-valued zero points of rows ``g`` (rows x cols) by HQQ."""
    lo = g.amin(dim=1, keepdim=True)
    hi = g.amax(dim=1, keepdim=True)
    require_finite(lo)
    require_finite(hi)
    inv = (qmax / (hi - lo)).clamp(max=2e4)  # hqq's scale: codes = round(w * inv + zero)
    zero = -lo * inv
    best = float("inf")
    for _ in range(iters):
        q = torch.round(g * inv + zero).clamp_(0, qmax)
        r = (q - zero) / inv
        e = _shrink_lp(g - r, beta, lp_norm)
        zero = torch.mean(q - (g - e) * inv, dim=1, keepdim=True)
        beta *= kappa
        err = float((g - r).abs().mean())
        if err < best:
            best = err
        elif early_stop:
            break
    q = torch.round(g * inv + zero).clamp_(0, qmax)
    return q, (1.0 / inv).clamp_min(EPS), zero

"""Clip search: RTN whose range is shrunk per row by the ratio that minimises the row's squared error.

The min-max scale of RTN spends the grid on a row's extremes; shrinking the range (clipping the few largest
weights) makes the step finer for all the others. For each row of the grid (a channel or a group) the ratio is
searched on a coarse grid over ``[min_ratio, 1]``, then refined around the best coarse value; the codes stay on the
same integer grid (same storage as RTN). No data is used. This is the weight-only clip of AWQ's ``auto_clip`` and
llama.cpp's ``make_qx_quants``, with the weight error as objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qvec.core.errors import QvecError
from qvec.quant.base import QuantizerConfig, register_quantizer
from qvec.quant.grid import (
    QuantSpec,
    dequantize_rows,
    grouped_view,
    qparams_from_stats,
    round_rows,
    row_qparams,
    row_stats,
)

# Rows per block: the candidates of one block are tried while the block is in cache.
_BLOCK_ELEMS = 1 << 19


@register_quantizer
@dataclass(frozen=True)
class ClipSearch(QuantizerConfig):
    """RTN on the grid with a searched clip ratio per row (per channel or per group)."""

    method: ClassVar[str] = "clip"
    label: ClassVar[str] = "Clip"

    #: smallest ratio tried (the range is at least ``min_ratio`` of the row's min-max range)
    min_ratio: float = 0.3
    #: coarse candidates, evenly spaced from 1 down to ``min_ratio``
    steps: int = 5
    #: refinement rounds, each trying half the previous spacing on both sides of the best ratio
    refine: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.min_ratio <= 1:
            raise QvecError(f"clip min_ratio must be in (0, 1], got {self.min_ratio!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise QvecError(f"clip steps must be a positive integer, got {self.steps!r}")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise QvecError(f"clip refine must be a non-negative integer, got {self.refine!r}")

    def quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        g = grouped_view(w.detach().float().contiguous(), self.grid)
        ratio = search_ratios(g, self.grid, self.min_ratio, self.steps, self.refine)
        scale, zero = row_qparams(g, self.grid, ratio)
        w_hat = dequantize_rows(round_rows(g, scale, zero, self.grid), scale, zero)
        return w_hat.reshape(w.shape).to(w.dtype), scale, zero

    def __str__(self) -> str:
        return f"clip-{self.grid}"


def _scaled_errors(g: torch.Tensor, spec: QuantSpec, inv: torch.Tensor, zero: torch.Tensor | None,
                   v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Root squared error of each row of ``g`` under RTN with inverse scales ``inv``, in code units (times the
    scale it is the error in weight units); ``v`` and ``q`` are scratch of ``g``'s shape. An integer zero point
    commutes with rounding, so the codes are ``clamp(round(g * inv + zero))``: five passes over the rows."""
    torch.mul(g, inv, out=v)
    if zero is not None:
        v.add_(zero)
    torch.round(v, out=q).clamp_(spec.qmin, spec.qmax)
    return torch.linalg.vector_norm(q.sub_(v), dim=1, keepdim=True)


def search_ratios(g: torch.Tensor, spec: QuantSpec, min_ratio: float = 0.3, steps: int = 5, refine: int = 3
                  ) -> torch.Tensor:
    """Per row of ``g`` (rows x cols), the clip ratio in ``[min_ratio, 1]`` with the least squared error: the best
    of ``steps`` evenly spaced ratios, then ``refine`` rounds of half-spacing steps around it; shape (rows, 1).

    Rows are searched in cache-sized blocks; each candidate costs a handful of elementwise passes over the block
    (:func:`_scaled_errors`), and the min-max statistics are read once per row (:func:`row_stats`)."""
    g = g.float()
    stats = row_stats(g, spec)  # refuses NaN/Inf rows before the search
    coarse = torch.linspace(1.0, min_ratio, steps).tolist() if steps > 1 else [1.0]
    spacing = (1.0 - min_ratio) / max(1, steps - 1)
    rows_per_block = max(1, _BLOCK_ELEMS // max(1, g.shape[1]))
    out = torch.empty(g.shape[0], 1)
    v_buf = torch.empty(min(g.numel(), rows_per_block * g.shape[1]))
    q_buf = torch.empty_like(v_buf)
    for start in range(0, g.shape[0], rows_per_block):
        b = slice(start, start + rows_per_block)
        block = g[b]
        block_stats = tuple(x[b] if x is not None else None for x in stats)
        v, q = v_buf[: block.numel()].view(block.shape), q_buf[: block.numel()].view(block.shape)
        best_r = torch.ones(block.shape[0], 1)
        best_e = torch.full((block.shape[0], 1), float("inf"))
        tries: list = coarse
        step = spacing
        for _ in range(refine + 1):
            for r in tries:
                scale, zero = qparams_from_stats(block_stats, spec, r)
                e = _scaled_errors(block, spec, 1.0 / scale, zero, v, q).mul_(scale.abs())
                better = e < best_e
                best_e = torch.where(better, e, best_e)
                best_r = torch.where(better, r, best_r)
            step /= 2
            tries = [(best_r + d).clamp_(min_ratio, 1.0) for d in (-step, step)]
        out[b] = best_r
    return out

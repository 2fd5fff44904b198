"""HQQ (Badri and Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models"): data-free
asymmetric quantization whose zero points are optimised, per row of the grid, for a sparsity-promoting l_p error
(p < 1) by a half-quadratic solver.

With the min-max scale fixed, the solver alternates (for ``iters`` rounds, or until the mean absolute error of the
tensor stops improving): quantize with the current zero; shrink the residual with the generalised soft threshold of
l_p (``beta`` the penalty); set the zero so the shrunk residual's reconstruction matches. This is the `hqq`
package's ``optimize_weights_proximal_legacy`` (its default) on qvec's grid, scale = 1 / hqq's scale. The package
(0.2.8) keeps beta fixed although it reads a ``kappa``; ``kappa > 1`` grows beta each round as in the paper.
It is our own code rather than the package because it gives the package's codes 8x to 70x faster
(docs/quantizers.md); tests/test_quantizers.py checks it against the package where it is installed. Zero points are
real-valued, so they are stored as fp16 beside the fp16 scales.

QAT cannot train through HQQ's solver; the nearest trainable grid is the same asymmetric grid with RTN's min-max
scale and integer zero point, and that is what a vector matched to HQQ is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qvec.core.errors import QvecError
from qvec.quant.base import QuantizerConfig, register_quantizer
from qvec.quant.grid import QuantSpec, grouped_view, require_finite

#: hqq's guards on the initial scale: a row whose range is at most this gets scale 1 ...
_FLAT_RANGE = 1e-4
#: ... and 1 / scale is capped (fp16-safe)
_MAX_INV = 2e4
#: a residual this close to the shrink threshold is treated as possibly shrunk (float rounding)
_MARGIN = 1 - 1e-3
#: the first rounds are solved in blocks of about this many weights (cache) ...
_BLOCK_ELEMS = 1 << 19
#: ... and the rest on the rows left, all together (few: a round costs a fixed overhead per block)
_HEAD_ROUNDS = 6


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
    #: beta's growth per round: 1 as in the hqq package's default solver
    kappa: float = 1.0
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
        zero = zero.half().float()  # stored as fp16 (zero_dtype): the model we return is the model pack writes
        return q.sub_(zero).mul_(scale).reshape(w.shape).to(w.dtype), scale, zero

    def __str__(self) -> str:
        return f"hqq-{self.grid}"


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft threshold of the l_p norm (p <= 1): the proximal step of the half-quadratic split (the
    package's ``shrink_lp_op``)."""
    a = x.abs()
    thr = 1.0 / beta if p == 1 else (1.0 / beta) * a.pow(p - 1)
    return a.sub_(thr).clamp_min_(0.0).mul_(torch.sign(x))


def _shrink_threshold(beta: float, p: float) -> float:
    """Residuals (in weight units) at or below this are shrunk to exactly zero: ``|x| <= |x|^(p-1) / beta``."""
    return beta ** (-1.0 / (2.0 - p))


@torch.no_grad()
def hqq_rows(g: torch.Tensor, qmax: int, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
             kappa: float = 1.0, early_stop: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (float, 0..qmax), scales and real-valued zero points of rows ``g`` (rows x cols) by HQQ.

    The package's ``optimize_weights_proximal_legacy`` on ``axis=1`` rows: its initial scale (``qmax / (max -
    min)``, 1 where the range is at most 1e-4, at most 2e4), its update and its stopping rule (stop at the first
    round whose mean absolute error over the whole tensor does not fall, keeping that round's zero points). Every
    round's zero points and error are recorded, and the stopping round is chosen at the end, so that rows can be
    solved in blocks and dropped once converged (:class:`_Solver`); the result is the package's.
    """
    g = g.float()
    lo = g.amin(dim=1, keepdim=True)
    hi = g.amax(dim=1, keepdim=True)
    require_finite(lo)
    require_finite(hi)
    denom = hi - lo
    inv = torch.where(denom.abs() <= _FLAT_RANGE, 1.0, qmax / denom).clamp_(max=_MAX_INV)  # hqq's scale
    rows, cols = g.shape
    u = g * inv  # code units: the codes are round(u + zero)
    zeros = torch.empty(iters + 1, rows)  # zeros[t]: the zero points round t starts from
    zeros[0] = (-lo * inv).squeeze(1)
    last = torch.full((rows,), iters)  # the round after which a row's zero point no longer changes
    err = torch.zeros(iters, dtype=torch.float64)  # sum of |w - w_hat| over the tensor, per round
    solver = _Solver(qmax, [beta * kappa**t for t in range(iters)], lp_norm, zeros, last, err)
    # the first rounds block by block (every row still moves); then the rows left, all together
    head = min(iters, _HEAD_ROUNDS)
    per = max(1, _BLOCK_ELEMS // cols)
    left = []
    for s in range(0, rows, per):
        b = slice(s, s + per)
        rows_b = torch.arange(s, min(rows, s + per))
        state = (rows_b, torch.cat([zeros[0, b, None], inv[b], lo[b] * inv[b], hi[b] * inv[b]], dim=1), u[b])
        left.append(solver.rounds(state, 0, head))
    if head < iters:
        solver.rounds(tuple(torch.cat(parts) for parts in zip(*left, strict=True)), head, iters)
    stop = iters
    if early_stop:
        best = float("inf")
        for t in range(iters):
            if err[t] >= best:
                stop = t + 1  # the package returns the zero points updated in the round that did not improve
                break
            best = float(err[t])
    zero = zeros.view(-1).take(last.clamp_(max=stop).mul_(rows).add_(torch.arange(rows))).view(rows, 1)
    return u.add_(zero).round_().clamp_(0, qmax), 1.0 / inv, zero


class _Solver:
    """The solver's rounds on sets of rows, in code units ``u = w * inv``. A set is ``(idx, row, u)``: the rows'
    indices in the tensor, their (zero, inv, min u, max u) and their ``u``. Each round writes every row's new zero
    point into ``zeros[t + 1]`` and its absolute error into ``err[t]``.

    While no residual can reach the shrink threshold (the usual case: about 0.17 at the default beta, where half a
    step of a 2-bit group of ViT weights is ~0.05), the l_p shrink is zero and the update is ``z - mean(u + z -
    q)``. A row whose zero repeats is at its fixed point (unless a later, larger beta could shrink one of its
    residuals): it is dropped, ``last`` says since when, and its error is carried to the later rounds. Rows are
    dropped once they are a quarter of those left, so that compaction does not cost a copy every round."""

    def __init__(self, qmax: int, betas: list[float], p: float, zeros: torch.Tensor, last: torch.Tensor,
                 err: torch.Tensor) -> None:
        self.qmax, self.betas, self.p = qmax, betas, p
        self.thr = [_shrink_threshold(b, p) * _MARGIN for b in betas]
        self.zeros, self.last, self.err = zeros, last, err

    def rounds(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], start: int, end: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rounds ``start`` to ``end - 1`` on a set of rows; returns the rows still moving."""
        idx, row, u = state
        qmax, thr, thr_last = self.qmax, self.thr, self.thr[-1] if self.thr else 0.0
        n, cols = u.shape
        v_buf, q_buf = torch.empty(u.numel()), torch.empty(u.numel())
        for t in range(start, end):
            n = u.shape[0]
            if not n:
                break
            z, inv, umin, umax = row[:, 0:1], row[:, 1:2], row[:, 2:3], row[:, 3:4]
            v, q = v_buf[: n * cols].view(n, cols), q_buf[: n * cols].view(n, cols)
            torch.add(u, z, out=v)
            torch.round(v, out=q)
            # how far u + z reaches past the grid's ends: residuals of clamped codes; others are at most half a step
            past = torch.maximum(umax + z - qmax, -(umin + z)).clamp_(min=0.5)
            if float(past.max()) > 0.5:
                q.clamp_(0, qmax)
            reach = past.div_(inv)  # bound on |w - w_hat| per row, in weight units
            max_reach = float(reach.max())
            d = v.sub_(q)  # (w - w_hat) * inv
            new_z = z - d.mean(dim=1, keepdim=True)
            if max_reach >= thr[t]:  # the package's update for the rows whose residuals may be shrunk
                rs = (reach >= thr[t]).squeeze(1).nonzero().squeeze(1)
                e = _shrink_lp(d[rs] / inv[rs], self.betas[t], self.p)
                new_z[rs] += e.mul_(inv[rs]).mean(dim=1, keepdim=True)
            row_err = d.abs_().sum(dim=1, keepdim=True).div_(inv)
            self.err[t] += float(row_err.sum())
            fixed = new_z == z
            if max_reach >= thr_last:
                fixed &= reach < thr_last
            fixed = fixed.squeeze(1)
            self.zeros[t + 1].index_copy_(0, idx, new_z.squeeze(1))
            row[:, 0:1] = new_z
            n_fixed = int(fixed.sum())
            if n_fixed * 4 < n:
                continue
            self.last.index_fill_(0, idx[fixed], t + 1)
            self.err[t + 1 :] += float(row_err[fixed].sum())
            keep = (~fixed).nonzero().squeeze(1)
            idx, row, u = idx.index_select(0, keep), row.index_select(0, keep), u.index_select(0, keep)
        return idx, row, u

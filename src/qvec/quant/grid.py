"""The integer grid every quantizer's codes live on, and the row arithmetic on it.

A weight is viewed as rows that share one scale (one row per output channel, per group of ``group_size`` inputs,
or the whole tensor). A row's codes are integers in ``[qmin, qmax]``; a weight is reconstructed as
``(q - zero) * scale``. Which scale and zero a row gets is the quantizer's business (:mod:`qvec.quant.rtn`,
:mod:`qvec.quant.clip`, :mod:`qvec.quant.hqq`, :mod:`qvec.quant.gptq`); the grid only says where codes may lie.

Three families of grid:

* symmetric, restricted (the paper's, SPEC section 2): ``scale = max|w| / (2^(b-1) - 1)``, so the lowest level
  ``-2^(b-1)`` is never used (3 bits give 7 levels);
* symmetric, full range (``full_range``): the row's largest-magnitude weight is mapped onto ``-2^(b-1)`` (its sign
  goes into the scale), so all ``2^b`` levels are used and no zero point is stored;
* asymmetric: codes ``0 .. 2^b - 1`` with a zero point per row.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from qvec.core.errors import QvecError

Granularity = Literal["channel", "tensor", "group"]
GRANULARITIES: tuple[str, ...] = ("channel", "tensor", "group")
GRID_FIELDS = ("bits", "symmetric", "granularity", "group_size", "full_range")
EPS = 1e-8
# Elements processed per block: sized so that the in-place passes of one block stay in cache (docs/grid.md, "The
# evaluation fast path").
_ROW_BLOCK_ELEMS = 1 << 20


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid: bit-width, symmetric or not (and full range or not), the scales' granularity.

    It is not a quantizer: :class:`qvec.quant.rtn.RTN` (round to nearest, the paper's PTQ), clip search, HQQ and
    GPTQ are quantizers *on* a grid. Where a quantizer is expected, a bare grid means RTN on it.
    """

    bits: int = 3
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int = 128
    #: symmetric grids only: use all 2^bits levels (the row's extreme lands on qmin), not the paper's 2^bits - 1
    full_range: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QvecError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise QvecError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise QvecError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.full_range and not self.symmetric:
            raise QvecError("full_range is a symmetric grid's option (an asymmetric grid always uses every level)")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def levels(self) -> int:
        """How many codes a row can use (the paper's symmetric grid leaves one unused)."""
        return 2**self.bits - (1 if self.symmetric and not self.full_range else 0)

    def to_dict(self) -> dict:
        """The grid as a flat record (``full_range`` only when set, so records of older grids are unchanged)."""
        d = asdict(self)
        if not self.full_range:
            d.pop("full_range")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        """The grid of a flat record (other keys, such as a quantizer's own, are ignored)."""
        return cls(**{k: d[k] for k in GRID_FIELDS if k in d})

    def group_len(self, shape: Sequence[int]) -> int:
        """How many weights of a tensor of ``shape`` share one scale."""
        n = 1
        for s in shape:
            n *= int(s)
        if self.granularity == "tensor":
            return n
        cols = n // int(shape[0]) if len(shape) else n
        return cols if self.granularity == "channel" else self.group_size

    def __str__(self) -> str:
        kind = ("symfull" if self.full_range else "sym") if self.symmetric else "asym"
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"w{self.bits}-{kind}-{gran}"


def suggest_group_sizes(cols: int, limit: int = 3) -> list[int]:
    """Powers of two from 32 to 256 (then any size from 16) that divide ``cols``: what to suggest for a row."""
    good = [g for g in (32, 64, 128, 256) if cols % g == 0]
    good += [g for g in range(16, min(cols, 1024) + 1) if cols % g == 0 and g not in good]
    return good[:limit]


def check_group_size(spec: QuantSpec, shapes: Mapping[str, Sequence[int]], source: str = "") -> None:
    """Group quantization needs a group size that divides the input dimension of every target: refuse before any
    work, in one line, suggesting sizes that divide them all (not only the first weight that fails)."""
    if spec.granularity != "group":
        return
    cols = {k: math.prod(s[1:]) for k, s in shapes.items() if len(s) >= 2}
    bad = [k for k, c in cols.items() if c % spec.group_size]
    if not bad:
        return
    sizes = suggest_group_sizes(math.gcd(*cols.values()))
    hint = (f"; try --group-size {' or '.join(map(str, sizes))} (they divide every target)" if sizes
            else "; no group size of 16 or more divides every target (use --granularity channel)")
    more = f" (and {len(bad) - 1} other weight{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    where = f"{source}: " if source else ""
    raise QvecError(f"{where}group_size {spec.group_size} does not divide the input dimension {cols[bad[0]]} of "
                    f"{bad[0]} {tuple(shapes[bad[0]])}{more}{hint}")


def grouped_view(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w`` viewed as (rows, cols), each row sharing one scale (a view when ``w`` is contiguous)."""
    if w.numel() == 0:
        raise QvecError(f"cannot quantize an empty weight (shape {tuple(w.shape)})")
    if w.ndim < 2 and spec.granularity != "tensor":
        raise QvecError(f"{spec.granularity} quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    if spec.granularity == "tensor":
        return w.reshape(1, -1)
    w2 = w.reshape(w.shape[0], -1)
    if spec.granularity == "channel":
        return w2
    if w2.shape[1] % spec.group_size:
        sizes = suggest_group_sizes(w2.shape[1])
        hint = f"; try --group-size {' or '.join(map(str, sizes))}" if sizes else ""
        raise QvecError(f"group_size {spec.group_size} does not divide the input dimension {w2.shape[1]} of a "
                        f"weight of shape {tuple(w.shape)}{hint}")
    return w2.reshape(-1, spec.group_size)


class NonFiniteWeightError(QvecError):
    """A weight holds NaN or Inf: RTN would spread it over its whole row (through the row maximum), so refuse."""


def require_finite(row_stat: torch.Tensor) -> None:
    """NaN and Inf propagate into the row maxima (and minima) that RTN computes anyway: one cheap check of those."""
    if not bool(torch.isfinite(row_stat).all()):
        bad = "NaN" if bool(torch.isnan(row_stat).any()) else "Inf"
        raise NonFiniteWeightError(f"weight contains {bad}; refusing to quantize it")


def absmax_rows(g: torch.Tensor) -> torch.Tensor:
    """``max |w|`` of each row of ``g``, (rows, 1): the larger of ``max w`` and ``-min w``, two reductions that
    allocate nothing of the rows' size (``g.abs()`` would, on every call). NaN propagates as with ``abs``."""
    return torch.maximum(g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True).neg_())


def row_stats(g: torch.Tensor, spec: QuantSpec, check: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a min-max scale is made of, per row of ``g`` (rows, 1): the signed extreme (full range), ``max|w|``
    (symmetric) or ``(min(w, 0), max(w, 0))`` (asymmetric); ``check`` refuses NaN/Inf rows. Split from
    :func:`qparams_from_stats` so that a search over clip ratios reads the rows once."""
    if spec.symmetric:
        if spec.full_range:  # the signed extreme of each row lands exactly on qmin
            ext = g.gather(1, g.abs().argmax(dim=1, keepdim=True)).float()
            if check:
                require_finite(ext)
            return ext, None
        amax = absmax_rows(g).float()
        if check:
            require_finite(amax)
        return amax, None
    lo = g.amin(dim=1, keepdim=True).float().clamp(max=0.0)
    hi = g.amax(dim=1, keepdim=True).float().clamp(min=0.0)
    if check:
        require_finite(hi)
        require_finite(lo)
    return lo, hi


def qparams_from_stats(stats: tuple[torch.Tensor, torch.Tensor | None], spec: QuantSpec,
                       ratio: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales (and zero points when asymmetric) from :func:`row_stats`, the range shrunk by ``ratio`` (one
    factor, one per row, or any shape that broadcasts against the stats: (candidates, rows, 1) tries several)."""
    a, hi = stats
    if spec.symmetric:
        if spec.full_range:
            ext = a * ratio if ratio is not None else a
            ext = torch.where(ext.abs() < EPS, torch.full_like(ext, EPS), ext)
            return ext / spec.qmin, None
        amax = a * ratio if ratio is not None else a
        return amax.clamp_min(EPS) / spec.qmax, None
    lo = a
    if ratio is not None:
        lo, hi = lo * ratio, hi * ratio
    scale = ((hi - lo) / spec.qmax).clamp_min(EPS)
    zero = torch.round(-lo / scale).clamp(0, spec.qmax)
    return scale, zero


def row_qparams(g: torch.Tensor, spec: QuantSpec, ratio: torch.Tensor | float | None = None,
                check: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales (and zero points when asymmetric) of rows ``g``, shape (rows, 1), with the range shrunk by
    ``ratio`` (a clip: one factor, or one per row); ``check`` refuses NaN/Inf rows."""
    return qparams_from_stats(row_stats(g, spec, check), spec, ratio)


def _divided(g: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``g / scale`` in float32, into ``out`` (a reused buffer of ``g``'s shape) when given."""
    g = g if g.dtype == torch.float32 else g.float()
    return g / scale if out is None else torch.div(g, scale, out=out)


def round_rows(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
               out: torch.Tensor | None = None, clamp: bool = True) -> torch.Tensor:
    """The codes of rows ``g`` under (scale, zero): ``clamp(round(g / scale) + zero, qmin, qmax)`` (float), in
    ``out`` when given. ``clamp=False`` only for the rows' own min-max scales on a symmetric restricted grid,
    where ``|w| <= max|w| = qmax * s`` already keeps every code in range."""
    q = _divided(g, scale, out).round_()
    if zero is not None:
        q += zero
    return q.clamp_(spec.qmin, spec.qmax) if clamp else q


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``(q - zero) * scale``: the reconstruction of codes ``q`` (float)."""
    return (q - zero if zero is not None else q) * scale


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN's scales (and zero points when asymmetric) of ``w``, one per row of :func:`grouped_view`; (rows, 1)."""
    return row_qparams(grouped_view(w.detach(), spec), spec)


def quantize_codes(w: torch.Tensor, spec: QuantSpec, qparams: tuple | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unsigned levels ``q - qmin`` in ``[0, 2**bits - 1]`` (uint8, shape of the grouped view), scales, zeros.

    Levels rather than signed codes so that every bit-width, 8-bit asymmetric included, fits a uint8.
    ``qparams`` = (scale, zero) of a weight already on the grid (a quantizer's output): its codes are then exact.
    """
    g = grouped_view(w.detach(), spec)
    if qparams is None:
        scale, zero = compute_qparams(w, spec)
        q = round_rows(g, scale, zero, spec)
    else:
        scale, zero = qparams
        q = read_back_rows(g, scale, zero, spec)
    return q.sub_(spec.qmin).to(torch.uint8), scale, zero


def read_back_rows(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The codes (float) of rows ``g`` already on the grid: ``g = (q - zero) * scale`` up to float rounding, the
    zero possibly real-valued (HQQ), so ``q = round(g / scale + zero)``, clamped; in ``out`` when given."""
    q = _divided(g, scale, out)
    if zero is not None:
        q += zero
    return q.round_().clamp_(spec.qmin, spec.qmax)


def dequantize_codes(levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                     shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`quantize_codes`: ``(levels + qmin - zero) * scale`` reshaped to the weight's shape."""
    q = levels.float().add_(spec.qmin)
    return dequantize_rows(q, scale.float(), zero.float() if zero is not None else None).reshape(shape)


def _fake_quant_rows_(g: torch.Tensor, spec: QuantSpec, check: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """In place: each row of ``g`` becomes its own RTN reconstruction; returns the rows' (scale, zero)."""
    if spec.symmetric and not spec.full_range:
        scale = absmax_rows(g)
        if check:
            require_finite(scale)
        scale = scale.clamp_min_(EPS).div_(spec.qmax)
        g.div_(scale).round_().clamp_(spec.qmin, spec.qmax).mul_(scale)
        return scale, None
    scale, zero = row_qparams(g, spec, check=check)
    if zero is None:
        g.div_(scale).round_().clamp_(spec.qmin, spec.qmax).mul_(scale)
    else:
        g.div_(scale).round_().add_(zero).clamp_(spec.qmin, spec.qmax).sub_(zero).mul_(scale)
    return scale, zero


_CHECKS = threading.local()


@contextmanager
def finite_checks_off():
    """Within this block :func:`fake_quantize_` skips its NaN/Inf check (the QAT forward, every step)."""
    old = getattr(_CHECKS, "off", False)
    _CHECKS.off = True
    try:
        yield
    finally:
        _CHECKS.off = old


def fake_quantize_(w: torch.Tensor, spec: QuantSpec, check_finite: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Replace ``w`` in place by its RTN reconstruction ``clamp(round(w/s) + z, qmin, qmax) - z) * s``; returns the
    (scale, zero) of every row of :func:`grouped_view` (shape (rows, 1)).

    Rows are processed in cache-sized blocks, so the several elementwise passes touch main memory once. A
    non-contiguous ``w`` (a transposed view from a state dict) is quantized through a contiguous copy, since the
    grouped view of it would be a copy and the in-place result would be lost. NaN/Inf are refused
    (:class:`NonFiniteWeightError`) unless ``check_finite`` is off, as in the QAT forward, where the training
    loop's loss check reports divergence and a per-row check would cost a device sync per layer
    (:func:`finite_checks_off`; ``None`` follows it).
    """
    if check_finite is None:
        check_finite = not getattr(_CHECKS, "off", False)
    if not w.is_floating_point():
        raise QvecError(f"can only quantize floating-point tensors, got {w.dtype}")
    if not w.is_contiguous():
        tmp = w.detach().contiguous()
        qparams = fake_quantize_(tmp, spec, check_finite)
        w.detach().copy_(tmp)
        return qparams
    g = grouped_view(w.detach(), spec)
    rows_per_block = g.shape[0] if spec.granularity == "tensor" else max(1, _ROW_BLOCK_ELEMS // max(1, g.shape[1]))
    scales, zeros = [], []
    for start in range(0, g.shape[0], rows_per_block):
        block = g[start : start + rows_per_block]
        work = block if w.dtype == torch.float32 else block.float()
        s, z = _fake_quant_rows_(work, spec, check_finite)
        if work is not block:
            block.copy_(work)
        scales.append(s)
        zeros.append(z)
    scale = scales[0] if len(scales) == 1 else torch.cat(scales)
    zero = None if zeros[0] is None else (zeros[0] if len(zeros) == 1 else torch.cat(zeros))
    return scale, zero


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Out-of-place RTN reconstruction of ``w`` (differentiable only through the STE in :mod:`qvec.quant.qat`)."""
    out = w.detach().clone(memory_format=torch.contiguous_format)
    fake_quantize_(out, spec)
    return out

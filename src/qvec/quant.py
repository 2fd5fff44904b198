"""Uniform round-to-nearest weight quantization (the paper's PTQ) and the target filter.

Everything here works on plain tensors or in place on a model, needs no calibration data and keeps
activations in float. The paper default is 3-bit symmetric per-channel (one scale per output row).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Literal

import torch
from torch import nn

from .errors import QvecError

Granularity = Literal["channel", "tensor", "group"]
GRANULARITIES: tuple[str, ...] = ("channel", "tensor", "group")
_GRID_FIELDS = ("bits", "symmetric", "granularity", "group_size")
_EPS = 1e-8
# Elements processed per block: sized so that the in-place passes of one block stay in cache (docs/grid.md, "The
# evaluation fast path").
_ROW_BLOCK_ELEMS = 1 << 18


class QuantizerConfig:
    """Base of quantizer configs (torchao's ``quantize_(model, config)``): a frozen dataclass of its knobs that
    names the integer grid its codes live on. A handler registered for the type does the work
    (:func:`register_quantize_handler`), so a new quantizer is one config class and one handler.
    """

    #: the name ``--method``, grid configs and result kinds use
    method: ClassVar[str]
    #: how reports name the pipeline: ``GPTQ(FT)``
    label: ClassVar[str]
    #: whether the handler needs unlabeled calibration images
    needs_calibration: ClassVar[bool] = False

    @property
    def grid(self) -> QuantSpec:
        """The integer grid (bits, symmetric, granularity): what ``pack`` stores and reports name the width by."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict):
        """The config a :meth:`to_dict` record describes (other keys, such as ``method``, ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})  # type: ignore[arg-type]

    @classmethod
    def knobs(cls) -> list[str]:
        """The config's own fields beyond the grid's (a grid config's table accepts exactly these)."""
        return [f.name for f in fields(cls) if f.name not in _GRID_FIELDS]  # type: ignore[arg-type]

    @classmethod
    def from_grid(cls, grid: QuantSpec, **knobs):
        """This quantizer on ``grid``, with ``knobs`` (fields of :meth:`knobs`) overriding the defaults."""
        bad = [k for k in knobs if k not in cls.knobs()]
        if bad:
            raise QvecError(f"{cls.method}: unknown option {bad[0]!r}; known: {', '.join(cls.knobs()) or 'none'}")
        return cls(**{**{k: getattr(grid, k) for k in _GRID_FIELDS}, **knobs})


@dataclass(frozen=True)
class QuantSpec(QuantizerConfig):
    """RTN's config, and the integer grid of every quantizer: bit-width, symmetric or not, the scales' granularity."""

    method: ClassVar[str] = "rtn"
    label: ClassVar[str] = "RTN"

    bits: int = 3
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QvecError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise QvecError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group" and self.group_size < 1:
            raise QvecError(f"group_size must be positive, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def grid(self) -> QuantSpec:
        return self

    def to_dict(self) -> dict:
        return asdict(self)  # no "method": RTN's records predate the registry, and content keys hash them

    def __str__(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"w{self.bits}-{kind}-{gran}"


def _grouped_view(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View a weight as (rows, cols) where each row shares one scale."""
    if w.ndim < 2 and spec.granularity != "tensor":
        raise QvecError(f"{spec.granularity} quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    if spec.granularity == "tensor":
        return w.reshape(1, -1)
    w2 = w.reshape(w.shape[0], -1)
    if spec.granularity == "channel":
        return w2
    if w2.shape[1] % spec.group_size:
        raise QvecError(
            f"group_size {spec.group_size} does not divide the input dimension {w2.shape[1]} of a weight "
            f"of shape {tuple(w.shape)}"
        )
    return w2.reshape(-1, spec.group_size)


class NonFiniteWeightError(QvecError):
    """A weight holds NaN or Inf: RTN would spread it over its whole row (through the row maximum), so refuse."""


def _require_finite(row_stat: torch.Tensor) -> None:
    """NaN and Inf propagate into the row maxima (and minima) that RTN computes anyway: one cheap check of those."""
    if not bool(torch.isfinite(row_stat).all()):
        bad = "NaN" if bool(torch.isnan(row_stat).any()) else "Inf"
        raise NonFiniteWeightError(f"weight contains {bad}; refusing to quantize it")


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points when asymmetric), one per row of ``_grouped_view(w)``; shape (rows, 1)."""
    g = _grouped_view(w.detach(), spec).float()
    if spec.symmetric:
        amax = g.abs().amax(dim=1, keepdim=True)
        _require_finite(amax)
        return amax.clamp_min(_EPS) / spec.qmax, None
    lo = g.amin(dim=1, keepdim=True).clamp(max=0.0)
    hi = g.amax(dim=1, keepdim=True).clamp(min=0.0)
    _require_finite(hi)
    _require_finite(lo)
    scale = ((hi - lo) / spec.qmax).clamp_min(_EPS)
    zero = torch.round(-lo / scale).clamp(0, spec.qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, spec: QuantSpec, qparams: tuple | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unsigned levels ``q - qmin`` in ``[0, 2**bits - 1]`` (uint8, shape of the grouped view), scales, zeros.

    Levels rather than signed codes so that every bit-width, 8-bit asymmetric included, fits a uint8.
    ``qparams`` = (scale, zero) of a weight already on the grid (GPTQ's output): its codes are then exact.
    """
    scale, zero = compute_qparams(w, spec) if qparams is None else qparams
    q = torch.round(_grouped_view(w.detach(), spec).float() / scale)
    if zero is not None:
        q += zero
    return q.clamp_(spec.qmin, spec.qmax).sub_(spec.qmin).to(torch.uint8), scale, zero


def dequantize_codes(
    levels: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: QuantSpec,
    shape: Sequence[int],
) -> torch.Tensor:
    """Inverse of :func:`quantize_codes`: ``(levels + qmin - zero) * scale`` reshaped to the weight's shape."""
    q = levels.float().add_(spec.qmin)
    if zero is not None:
        q = q - zero.float()
    return (q * scale.float()).reshape(shape)


def _fake_quant_rows_(g: torch.Tensor, spec: QuantSpec, check: bool = True) -> None:
    """In place: each row of ``g`` becomes its own RTN reconstruction (``check``: refuse NaN/Inf rows)."""
    if spec.symmetric:
        scale = g.abs().amax(dim=1, keepdim=True)
        if check:
            _require_finite(scale)
        scale = scale.clamp_min_(_EPS).div_(spec.qmax)
        g.div_(scale).round_().clamp_(spec.qmin, spec.qmax).mul_(scale)
        return
    lo = g.amin(dim=1, keepdim=True).clamp_(max=0.0)
    hi = g.amax(dim=1, keepdim=True).clamp_(min=0.0)
    if check:
        _require_finite(hi)
        _require_finite(lo)
    scale = hi.sub_(lo).div_(spec.qmax).clamp_min_(_EPS)
    zero = lo.div_(scale).neg_().round_().clamp_(0, spec.qmax)
    g.div_(scale).round_().add_(zero).clamp_(spec.qmin, spec.qmax).sub_(zero).mul_(scale)


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


def fake_quantize_(w: torch.Tensor, spec: QuantSpec, check_finite: bool | None = None) -> torch.Tensor:
    """Replace ``w`` in place by its quantize-dequantize reconstruction ``clamp(round(w/s), qmin, qmax) * s``.

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
        w.detach().copy_(fake_quantize_(w.detach().contiguous(), spec, check_finite))
        return w
    if spec.granularity == "tensor":
        g = w.detach().reshape(1, -1)
        work = g if w.dtype == torch.float32 else g.float()
        _fake_quant_rows_(work, spec, check_finite)
        if work is not g:
            g.copy_(work)
        return w
    g = _grouped_view(w.detach(), spec)
    rows_per_block = max(1, _ROW_BLOCK_ELEMS // max(1, g.shape[1]))
    for start in range(0, g.shape[0], rows_per_block):
        block = g[start : start + rows_per_block]
        work = block if w.dtype == torch.float32 else block.float()
        _fake_quant_rows_(work, spec, check_finite)
        if work is not block:
            block.copy_(work)
    return w


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Out-of-place RTN reconstruction of ``w`` (differentiable only through the STE in :mod:`qvec.qat`)."""
    return fake_quantize_(w.detach().clone(memory_format=torch.contiguous_format), spec)


# ----------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One quantization target: ``getattr(module, attr)`` is a weight; ``key`` is its state-dict name."""

    key: str
    module: nn.Module
    attr: str


def find_targets(
    model: nn.Module,
    head_prefixes: Iterable[str] = ("head",),
    include_in_proj: bool = True,
    extra_exclude: Callable[[str], bool] | None = None,
) -> list[Target]:
    """The weights PTQ and QAT act on: every backbone ``nn.Linear`` weight and fused MHA projections.

    ``head_prefixes`` name the modules that are not backbone (the classification head). With
    ``include_in_proj=False`` the fused ``in_proj_weight`` of ``nn.MultiheadAttention`` stays in float, which
    reproduces the authors' PTQ for OpenCLIP (their QAT did quantize it).
    """
    heads = tuple(head_prefixes)

    def is_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    targets: list[Target] = []
    for name, module in model.named_modules():
        if is_head(name) or (extra_exclude is not None and extra_exclude(name)):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            targets.append(Target(prefix + "weight", module, "weight"))
        elif (
            isinstance(module, nn.MultiheadAttention)
            and include_in_proj
            and module.in_proj_weight is not None
        ):
            targets.append(Target(prefix + "in_proj_weight", module, "in_proj_weight"))
    return targets


def _raw_param(module: nn.Module, attr: str) -> torch.Tensor:
    """The stored tensor behind ``attr`` (the latent weight when the module is QAT-parametrized)."""
    params = getattr(module, "parametrizations", None)
    if params is not None and attr in params:
        return params[attr].original
    return getattr(module, attr)


#: Quantizer config type -> handler(model, config, targets, calibration) -> qparams (see ``register_quantizer``).
_HANDLERS: dict[type, Callable] = {}
#: ``method`` name -> quantizer config type, for the CLI's ``--method`` and the grid's ``quantizers`` list.
_QUANTIZERS: dict[str, type] = {}


def register_quantize_handler(config_type: type) -> Callable[[Callable], Callable]:
    """Register a quantizer (torchao style): ``config_type`` (a :class:`QuantizerConfig`) names it by its
    ``method``, and the decorated ``handler(model, config, targets, calibration)`` quantizes the targets in place.

    The handler returns each target's (scale, zero) on ``config.grid`` when its output is not what RTN would
    compute from the final weights (a calibrated quantizer), or None; ``pack`` stores those codes exactly.
    """

    def deco(fn: Callable) -> Callable:
        _HANDLERS[config_type] = fn
        _QUANTIZERS[config_type.method] = config_type
        return fn

    return deco


def unregister_quantizer(method: str) -> None:
    """Forget a registered quantizer (tests and plugins that register one for a while)."""
    cls = _QUANTIZERS.pop(method, None)
    _HANDLERS.pop(cls, None)


def quantizer_names() -> list[str]:
    """Registered quantizer methods, RTN first."""
    return list(_QUANTIZERS)


def get_quantizer(method: str, what: str = "quantizer") -> type:
    """The config type registered as ``method``; otherwise one line, ``{what} must be rtn or gptq, got ...``."""
    cls = _QUANTIZERS.get(method)
    if cls is None:
        names = quantizer_names()
        known = " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]
        raise QvecError(f"{what} must be {known}, got {method!r}")
    return cls


@torch.no_grad()
def quantize_(model: nn.Module, spec: QuantizerConfig, targets: Sequence[Target] | None = None,
              calibration: torch.Tensor | None = None) -> list[str]:
    """Post-training quantization in place: every target weight becomes its quantized reconstruction.

    ``spec`` is a quantizer config: a :class:`QuantSpec` (RTN, no data) or another registered config such as
    :class:`qvec.gptq.GPTQConfig`, whose handler takes ``calibration`` (preprocessed unlabeled images).
    ``targets`` defaults to :func:`find_targets` with a head named ``head``; model adapters pass their own.
    Returns the keys that were quantized.
    """
    if targets is None:
        targets = find_targets(model)
    apply_quantizer_(model, spec, targets, calibration)
    return [t.key for t in targets]


def apply_quantizer_(model: nn.Module, config: QuantizerConfig, targets: Sequence[Target],
                     calibration: torch.Tensor | None = None) -> dict[str, tuple] | None:
    """Dispatch to the handler registered for ``type(config)`` after checking every target is finite; returns
    the handler's (scale, zero) per target (None: RTN's own, recomputed from the weights by ``pack``)."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise QvecError(f"no quantizer registered for {type(config).__name__}")
    if not config.needs_calibration and calibration is not None:
        raise QvecError(f"{config.label} needs no calibration images; got some")
    return handler(model, config, list(targets), calibration)


@register_quantize_handler(QuantSpec)
def _rtn_quantize_(model: nn.Module, spec: QuantSpec, targets: Sequence[Target], calibration: None) -> None:
    """RTN: each target weight rounded to its grid from its own scales; no data."""
    for _, w in _check_targets_finite(targets):
        fake_quantize_(w, spec, check_finite=False)


def _check_targets_finite(targets: Sequence[Target]) -> list[tuple[str, torch.Tensor]]:
    """Every target is checked before any is changed, so a refusal leaves the model as it was."""
    weights = [(t.key, _raw_param(t.module, t.attr)) for t in targets]
    for key, w in weights:
        if w.is_floating_point() and w.numel() and not bool(torch.isfinite(w.sum())):
            _require_finite_tensor(key, w)
    return weights


def _require_finite_tensor(key: str, w: torch.Tensor) -> None:
    """A NaN/Inf in ``w`` is an error naming ``key`` (a finite sum that overflowed is not)."""
    if bool(torch.isnan(w).any()):
        raise NonFiniteWeightError(f"{key}: weight contains NaN; refusing to quantize it")
    if bool(torch.isinf(w).any()):
        raise NonFiniteWeightError(f"{key}: weight contains Inf; refusing to quantize it")


def quantize_state_dict_(
    state: dict[str, torch.Tensor], keys: Iterable[str], spec: QuantSpec
) -> dict[str, torch.Tensor]:
    """PTQ on a state dict: the named tensors are replaced in place by their RTN reconstruction."""
    for k in keys:
        if k not in state:
            raise QvecError(f"quantization target {k!r} is not in the checkpoint")
        try:
            fake_quantize_(state[k], spec)
        except NonFiniteWeightError as e:
            raise NonFiniteWeightError(f"{k}: {e}") from None
    return state

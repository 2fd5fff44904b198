"""The quantizer seam: a quantizer is a frozen config dataclass registered by name (torchao's
``quantize_(model, config)``), and :func:`quantize_` is the one verb that applies any of them to a model.

A config holds the integer grid its codes live on (:class:`qvec.quant.grid.QuantSpec`) and its own knobs. A
data-free quantizer implements :meth:`QuantizerConfig.quantize_weight` (one weight at a time, so it also runs on a
bare state dict); a calibrated one (GPTQ) overrides :meth:`QuantizerConfig.quantize_model_`. Either way the output
is each target's (scale, zero) on the grid, from which ``pack`` and the ONNX export read the codes exactly.

A new quantizer is one file: a subclass of :class:`QuantizerConfig` decorated with :func:`register_quantizer`
(docs/extending.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from qvec.core.errors import QvecError
from qvec.core.registry import Registry
from qvec.quant.bitpack import packed_codes
from qvec.quant.grid import NonFiniteWeightError, QuantSpec
from qvec.quant.targets import Target, TargetFilter, find_targets

#: (scale, zero) of one weight's rows on its grid; zero is None on a symmetric grid
QParams = tuple[torch.Tensor, "torch.Tensor | None"]

#: Bits of one stored scale (fp16; ``pack --scale-dtype float32`` doubles them).
SCALE_BITS = 16
_ZERO_BITS = {"uint8": 8, "float16": 16}


@dataclass(frozen=True)
class QuantizerConfig:
    """Base of quantizer configs: the grid, the quantizer's own knobs, and how it is named and stored."""

    grid: QuantSpec = QuantSpec()

    #: the name ``--method``, presets, grid configs and result kinds use
    method: ClassVar[str] = ""
    #: how reports name the pipeline: ``GPTQ(FT)``
    label: ClassVar[str] = ""
    #: whether the quantizer needs unlabeled calibration images
    needs_calibration: ClassVar[bool] = False
    #: how an asymmetric grid's zero points are stored: ``uint8`` (integer zeros) or ``float16`` (real-valued)
    zero_dtype: ClassVar[str] = "uint8"

    def __post_init__(self) -> None:
        if not isinstance(self.grid, QuantSpec):
            raise QvecError(f"{type(self).__name__}: grid must be a QuantSpec, got {self.grid!r}")

    @property
    def bits(self) -> int:
        return self.grid.bits

    @property
    def trainable_grid(self) -> QuantSpec:
        """The grid QAT fake-quantizes with (RTN on it, straight-through) to make a vector matched to this
        quantizer: the grid itself for RTN, clip search and GPTQ; see :class:`qvec.quant.hqq.HQQ`."""
        return self.grid

    # ------------------------------------------------------------------------------------------ quantizing
    def quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(reconstruction of ``w``, scales, zeros) for a data-free quantizer; one weight, no model needed."""
        raise NotImplementedError(f"{type(self).__name__} quantizes whole models (quantize_model_)")

    def quantize_model_(self, model: nn.Module, targets: Sequence[Target],
                        calibration: torch.Tensor | None) -> dict[str, QParams]:
        """Quantize ``targets`` of ``model`` in place; returns each target's (scale, zero). The default runs
        :meth:`quantize_weight` on each target."""
        out = {}
        for t in targets:
            w = t.weight
            w_hat, scale, zero = self.quantize_weight(w)
            w.data.copy_(w_hat)
            out[t.key] = (scale, zero)
        return out

    def pack_weight(self, w: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
        """(bit-packed codes of ``w``'s quantization, scales, zeros) for a data-free quantizer, what ``pack``
        stores. The default quantizes, then reads the codes back; RTN packs its codes straight from ``w``."""
        w_hat, scale, zero = self.quantize_weight(w)
        return packed_codes(w_hat, self.grid, (scale, zero))

    @property
    def weight_local(self) -> bool:
        """True when each weight is quantized on its own (no data, no model): PTQ then runs on the state dict."""
        return type(self).quantize_weight is not QuantizerConfig.quantize_weight

    # ------------------------------------------------------------------------------------------ storage
    @property
    def zero_bits(self) -> int:
        return 0 if self.grid.symmetric else _ZERO_BITS[self.zero_dtype]

    def storage_bits(self, shape: Sequence[int], scale_bits: int = SCALE_BITS) -> int:
        """Bits ``pack`` stores for one weight of ``shape``: its codes (bit-packed, padded to a byte), one scale
        and (asymmetric) one zero point per row of the grid."""
        n = math.prod(int(s) for s in shape)
        rows = n // self.grid.group_len(shape)
        return math.ceil(n * self.grid.bits / 8) * 8 + rows * (scale_bits + self.zero_bits)

    def bits_per_weight(self, shapes: Iterable[Sequence[int]], scale_bits: int = SCALE_BITS) -> float:
        """Stored bits per quantized weight over targets of these shapes: codes, scales and zero points."""
        shapes = list(shapes)
        n = sum(math.prod(int(s) for s in shape) for shape in shapes)
        return sum(self.storage_bits(s, scale_bits) for s in shapes) / n if n else float("nan")

    # ------------------------------------------------------------------------------------------ records
    def to_dict(self) -> dict:
        """A flat record: ``method``, the grid's fields and the quantizer's knobs (what headers and keys hold)."""
        return {"method": self.method, **self.grid.to_dict(), **{k: getattr(self, k) for k in self.knobs()}}

    @classmethod
    def from_dict(cls, d: dict) -> QuantizerConfig:
        """The config a :meth:`to_dict` record describes (``method`` and unknown keys ignored)."""
        return cls(QuantSpec.from_dict(d), **{k: d[k] for k in cls.knobs() if k in d})

    @classmethod
    def knobs(cls) -> list[str]:
        """The config's own fields beyond the grid (a grid config's table accepts exactly these)."""
        return [f.name for f in fields(cls) if f.name != "grid"]  # type: ignore[arg-type]

    @classmethod
    def from_grid(cls, grid: QuantSpec, **knobs) -> QuantizerConfig:
        """This quantizer on ``grid``, with ``knobs`` (fields of :meth:`knobs`) overriding the defaults."""
        bad = [k for k in knobs if k not in cls.knobs()]
        if bad:
            raise QvecError(f"{cls.method}: unknown option {bad[0]!r}; known: {', '.join(cls.knobs()) or 'none'}")
        return cls(grid, **knobs)

    def __str__(self) -> str:
        return f"{self.method}-{self.grid}"


QUANTIZERS: Registry[type[QuantizerConfig]] = Registry(
    "quantizer", builtins=("qvec.quant.rtn", "qvec.quant.clip", "qvec.quant.hqq", "qvec.quant.gptq"))


def register_quantizer(cls: type[QuantizerConfig]) -> type[QuantizerConfig]:
    """Class decorator: make a quantizer config available by its ``method`` name (CLI, presets, grids, reports)."""
    if not cls.method or not cls.label:
        raise QvecError(f"{cls.__name__}: a quantizer needs a method name and a label")
    QUANTIZERS.register(cls.method, cls)
    return cls


def unregister_quantizer(method: str) -> None:
    """Forget a registered quantizer (tests and plugins that register one for a while)."""
    QUANTIZERS.unregister(method)


def quantizer_names() -> list[str]:
    """Registered quantizer methods, RTN first."""
    return QUANTIZERS.names()


def get_quantizer(method: str, what: str = "quantizer") -> type[QuantizerConfig]:
    """The config type registered as ``method``; otherwise one line naming the known ones."""
    return QUANTIZERS.get(method, what)


def as_quantizer(config: QuantizerConfig | QuantSpec) -> QuantizerConfig:
    """A quantizer config; a bare grid means RTN on it."""
    if isinstance(config, QuantizerConfig):
        return config
    if isinstance(config, QuantSpec):
        return get_quantizer("rtn")(config)
    raise QvecError(f"expected a quantizer config or a QuantSpec grid, got {type(config).__name__}")


def quantizer_from_record(d: dict) -> QuantizerConfig:
    """The config a :meth:`QuantizerConfig.to_dict` record (a header, a job) describes; no ``method`` is RTN."""
    return get_quantizer(d.get("method", "rtn")).from_dict(d)


@torch.no_grad()
def quantize_(model: nn.Module, config: QuantizerConfig | QuantSpec,
              targets: Sequence[Target] | TargetFilter | None = None,
              calibration: torch.Tensor | None = None) -> dict[str, QParams]:
    """Post-training quantization in place, the one verb for every quantizer: each target weight becomes its
    quantized reconstruction. Returns each target's (scale, zero) on ``config.grid``, keyed by state-dict name.

    ``config`` is a registered quantizer config (a bare :class:`QuantSpec` means RTN). ``targets`` are the model's
    targets (default: :func:`qvec.quant.targets.find_targets` with a head named ``head``; model-aware callers pass
    ``TargetFilter.find(model, adapter.head_prefixes)``). ``calibration`` is a batch of preprocessed unlabeled
    images, for quantizers that need it. Every target is checked for NaN/Inf before any is changed.
    """
    config = as_quantizer(config)
    if targets is None or isinstance(targets, TargetFilter):
        targets = find_targets(model, targets=targets if targets is not None else TargetFilter())
    if not config.needs_calibration and calibration is not None:
        raise QvecError(f"{config.label} needs no calibration images; got some")
    check_targets_finite(targets)
    return config.quantize_model_(model, list(targets), calibration)


def check_targets_finite(targets: Sequence[Target]) -> None:
    """Every target is checked before any is changed, so a refusal leaves the model as it was."""
    for t in targets:
        w = t.weight
        if w.is_floating_point() and w.numel() and not bool(torch.isfinite(w.sum())):
            require_finite_tensor(t.key, w)


def require_finite_tensor(key: str, w: torch.Tensor) -> None:
    """A NaN/Inf in ``w`` is an error naming ``key`` (a finite sum that overflowed is not)."""
    if bool(torch.isnan(w).any()):
        raise NonFiniteWeightError(f"{key}: weight contains NaN; refusing to quantize it")
    if bool(torch.isinf(w).any()):
        raise NonFiniteWeightError(f"{key}: weight contains Inf; refusing to quantize it")

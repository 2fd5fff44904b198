"""A toy quantizer for the seam tests: RTN with its scales shrunk by ``clip`` (a clipped grid), symmetric only.

It is what a contributor would write: one config class and one registered handler (see docs/extending.md). Its
codes are on its own grid (the shrunk scales), so the handler returns them and ``pack`` stores them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qvec.errors import QvecError
from qvec.quant import (
    QuantizerConfig,
    QuantSpec,
    _grouped_view,
    _raw_param,
    compute_qparams,
    register_quantize_handler,
    unregister_quantizer,
)


@dataclass(frozen=True)
class ClipConfig(QuantizerConfig):
    method: ClassVar[str] = "clip"
    label: ClassVar[str] = "Clip"

    bits: int = 3
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128
    clip: float = 0.9

    def __post_init__(self) -> None:
        self.grid  # noqa: B018  (validates the grid)
        if not self.symmetric or not 0 < self.clip <= 1:
            raise QvecError(f"clip needs a symmetric grid and 0 < clip <= 1, got {self.symmetric}, {self.clip!r}")

    @property
    def grid(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.granularity, self.group_size)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"clip{self.clip:g}-{self.grid}"


@torch.no_grad()
def clip_quantize_(model, config: ClipConfig, targets, calibration) -> dict[str, tuple]:
    spec, out = config.grid, {}
    for t in targets:
        w = _raw_param(t.module, t.attr)
        scale, _ = compute_qparams(w, spec)
        scale = scale * config.clip
        g = _grouped_view(w, spec)
        g.copy_(torch.round(g.float() / scale).clamp_(spec.qmin, spec.qmax).mul_(scale).to(w.dtype))
        out[t.key] = (scale, None)
    return out


def register() -> None:
    register_quantize_handler(ClipConfig)(clip_quantize_)


def unregister() -> None:
    unregister_quantizer("clip")

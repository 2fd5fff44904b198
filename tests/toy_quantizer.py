"""A toy quantizer for the seam tests: RTN with its range shrunk by ``clip`` (a clipped grid).

It is what a contributor would write (docs/extending.md): one config class, registered, using only qvec's public
helpers. Its codes are on the grid under its own (shrunk) scales, which it returns, so ``pack`` stores them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qvec.core.errors import QvecError
from qvec.quant import (
    QuantizerConfig,
    dequantize_rows,
    grouped_view,
    register_quantizer,
    round_rows,
    row_qparams,
    unregister_quantizer,
)


@dataclass(frozen=True)
class ClipConfig(QuantizerConfig):
    method: ClassVar[str] = "toyclip"
    label: ClassVar[str] = "ToyClip"

    clip: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.clip <= 1:
            raise QvecError(f"toyclip needs 0 < clip <= 1, got {self.clip!r}")

    def quantize_weight(self, w: torch.Tensor):
        g = grouped_view(w.detach().float().contiguous(), self.grid)
        scale, zero = row_qparams(g, self.grid, self.clip)
        w_hat = dequantize_rows(round_rows(g, scale, zero, self.grid), scale, zero)
        return w_hat.reshape(w.shape).to(w.dtype), scale, zero

    def __str__(self) -> str:
        return f"toyclip{self.clip:g}-{self.grid}"


def register() -> None:
    register_quantizer(ClipConfig)


def unregister() -> None:
    unregister_quantizer("toyclip")

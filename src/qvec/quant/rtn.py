"""RTN: round to nearest on the grid's min-max scales, no data (the paper's PTQ, SPEC section 2, on the
symmetric per-channel grid). Also the state-dict path of PTQ, which needs no model at all."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from qvec.core.errors import QvecError
from qvec.quant.base import QParams, QuantizerConfig, register_quantizer
from qvec.quant.bitpack import packed_codes
from qvec.quant.grid import NonFiniteWeightError, fake_quantize_
from qvec.quant.targets import Target


@register_quantizer
@dataclass(frozen=True)
class RTN(QuantizerConfig):
    """Round to nearest with each row's min-max scale (and zero point on an asymmetric grid)."""

    method: ClassVar[str] = "rtn"
    label: ClassVar[str] = "RTN"

    def quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out = w.detach().clone(memory_format=torch.contiguous_format)
        scale, zero = fake_quantize_(out, self.grid)
        return out, scale, zero

    def pack_weight(self, w: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
        """The codes computed and packed chunk by chunk from ``w`` itself: no reconstruction is written."""
        return packed_codes(w, self.grid)

    def quantize_model_(self, model: nn.Module, targets: Sequence[Target],
                        calibration: torch.Tensor | None) -> dict[str, QParams]:
        """In place on each target (no copy): the evaluation hot path."""
        return {t.key: fake_quantize_(t.weight.detach(), self.grid, check_finite=False) for t in targets}

    def to_dict(self) -> dict:
        return self.grid.to_dict()  # no "method": RTN's records predate the registry, and content keys hash them

    def __str__(self) -> str:
        return str(self.grid)


def quantize_state_dict_(state: dict[str, torch.Tensor], keys: Iterable[str], config: QuantizerConfig
                         ) -> dict[str, QParams]:
    """PTQ of a state dict by a data-free quantizer: the named tensors are replaced in place by their
    reconstruction; returns each one's (scale, zero)."""
    if not config.weight_local:
        raise QvecError(f"{config.label} needs the model (and calibration images), not a bare state dict")
    qparams = {}
    for k in keys:
        if k not in state:
            raise QvecError(f"quantization target {k!r} is not in the checkpoint")
        try:
            if isinstance(config, RTN):
                qparams[k] = fake_quantize_(state[k], config.grid)
            else:
                w_hat, scale, zero = config.quantize_weight(state[k])
                state[k].copy_(w_hat)
                qparams[k] = (scale, zero)
        except NonFiniteWeightError as e:
            raise NonFiniteWeightError(f"{k}: {e}") from None
    return qparams

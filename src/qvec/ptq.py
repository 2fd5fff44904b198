"""PTQ of whole checkpoints: find a model's quantization targets through its adapter and quantize them."""

from __future__ import annotations

import json

import torch

from .checkpoint import META_KIND, META_QUANT, Checkpoint
from .errors import QvecError
from .models import ModelSpec, get_adapter
from .quant import NonFiniteWeightError, QuantSpec, quantize_state_dict_


def target_keys(spec: ModelSpec, include_in_proj: bool = True) -> list[str]:
    """State-dict keys of the weights PTQ quantizes for a model of ``spec`` (built on the meta device: no memory)."""
    adapter = get_adapter(spec)
    try:
        with torch.device("meta"):
            model = adapter.build(spec, pretrained=False)
    except (NotImplementedError, RuntimeError):  # a family whose init cannot run on meta tensors
        model = adapter.build(spec, pretrained=False)
    return [t.key for t in adapter.targets(model, include_in_proj=include_in_proj)]


def quantize_checkpoint(
    ckpt: Checkpoint, quant: QuantSpec, include_in_proj: bool = True, spec: ModelSpec | None = None
) -> Checkpoint:
    """A new checkpoint whose target weights are replaced by their RTN reconstruction (fake-quantized PTQ).

    The result keeps float tensors (so any PyTorch code can run it); ``qvec pack`` stores the real low-bit codes.
    """
    spec = spec or ckpt.model_spec
    keys = target_keys(spec, include_in_proj)
    missing = [k for k in keys if k not in ckpt.state]
    if missing:
        raise QvecError(f"{ckpt.name()}: quantization target {missing[0]!r} is not in the checkpoint (is it a {spec}?)")
    state = {k: v.clone() for k, v in ckpt.state.items()}
    try:
        quantize_state_dict_(state, keys, quant)
    except NonFiniteWeightError as e:
        raise NonFiniteWeightError(f"{ckpt.name()}: {e}") from None
    meta = dict(ckpt.meta)
    meta[META_QUANT] = json.dumps({**quant.to_dict(), "include_in_proj": include_in_proj})
    meta[META_KIND] = f"{meta.get(META_KIND, 'model')}+ptq"
    return Checkpoint(state, meta)

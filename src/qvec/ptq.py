"""PTQ of whole checkpoints: find a model's quantization targets through its adapter and quantize them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .checkpoint import META_KIND, META_QUANT, Checkpoint
from .errors import QvecError
from .gptq import check_calibration
from .models import ModelSpec, get_adapter, load_model
from .probe import ProbeSet, load_probe
from .quant import NonFiniteWeightError, QuantizerConfig, QuantSpec, apply_quantizer_, quantize_state_dict_


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
    ckpt: Checkpoint, quant: QuantizerConfig, include_in_proj: bool = True, spec: ModelSpec | None = None,
    calibration=None, calibration_size: int = 128,
) -> Checkpoint:
    """A new checkpoint whose target weights are replaced by their quantized reconstruction (fake-quantized PTQ).

    ``quant`` is a registered quantizer config: :class:`QuantSpec` (RTN) or a calibrated one such as
    :class:`qvec.gptq.GPTQConfig`, which takes ``calibration`` (a probe: folder, .npz or ``noise``; unlabeled).
    The result keeps float tensors (so any PyTorch code can run it); ``qvec pack`` stores the real low-bit codes.
    """
    return quantize_checkpoint_state(ckpt, quant, include_in_proj, spec, calibration, calibration_size).checkpoint


@dataclass
class Quantized:
    """A quantized checkpoint and, for quantizers whose codes RTN would not recompute from the final weights
    (calibrated ones), each target's (scale, zero) on the grid: what ``pack`` needs to store the codes exactly."""

    checkpoint: Checkpoint
    qparams: dict[str, tuple] | None = None


def quantize_checkpoint_state(ckpt: Checkpoint, quant: QuantizerConfig, include_in_proj: bool = True,
                              spec: ModelSpec | None = None, calibration=None, calibration_size: int = 128
                              ) -> Quantized:
    """:func:`quantize_checkpoint` with the quantizer's (scale, zero) per target."""
    spec = spec or ckpt.model_spec
    keys = target_keys(spec, include_in_proj)
    missing = [k for k in keys if k not in ckpt.state]
    if missing:
        raise QvecError(f"{ckpt.name()}: quantization target {missing[0]!r} is not in the checkpoint (is it a {spec}?)")
    meta = dict(ckpt.meta)
    record = {**quant.to_dict(), "include_in_proj": include_in_proj}
    if quant.needs_calibration:
        out, source = _calibrated(ckpt, quant, include_in_proj, spec, calibration, calibration_size)
        record["calibration"] = source
    elif isinstance(quant, QuantSpec):  # RTN on the state dict itself: no model is built
        state = {k: v.clone() for k, v in ckpt.state.items()}
        try:
            quantize_state_dict_(state, keys, quant)
        except NonFiniteWeightError as e:
            raise NonFiniteWeightError(f"{ckpt.name()}: {e}") from None
        out = Quantized(Checkpoint(state, meta))
    else:
        out = _on_model(ckpt, quant, include_in_proj, spec, None)
    meta[META_QUANT] = json.dumps(record)
    meta[META_KIND] = f"{meta.get(META_KIND, 'model')}+ptq"
    out.checkpoint.meta = meta
    return out


def _calibrated(ckpt: Checkpoint, quant: QuantizerConfig, include_in_proj: bool, spec: ModelSpec, calibration,
                n: int) -> tuple[Quantized, dict]:
    """Preprocess the calibration images for the model, then quantize; also returns which images were used."""
    model, adapter, spec = load_model(ckpt, spec)
    config = adapter.data_config(spec, model)
    if calibration is None:
        check_calibration(None)
    if isinstance(calibration, torch.Tensor):
        x, source = calibration, {"source": "tensor", "images": len(calibration)}
    else:
        probe = calibration if isinstance(calibration, ProbeSet) else load_probe(calibration, n,
                                                                                 noise_size=config.image_size)
        x, source = probe.tensors(config), {"source": probe.name, "images": len(probe)}
    check_calibration(x, config.image_size)
    return _on_model(ckpt, quant, include_in_proj, spec, x, (model, adapter)), source


def _on_model(ckpt: Checkpoint, quant: QuantizerConfig, include_in_proj: bool, spec: ModelSpec,
              x: torch.Tensor | None, loaded: tuple | None = None) -> Quantized:
    """Run a registered quantizer on the model built from ``ckpt``; non-target tensors are kept as they were."""
    model, adapter = loaded if loaded is not None else load_model(ckpt, spec)[:2]
    try:
        qparams = apply_quantizer_(model, quant, adapter.targets(model, include_in_proj), x)
    except NonFiniteWeightError as e:
        raise NonFiniteWeightError(f"{ckpt.name()}: {e}") from None
    live = model.state_dict()
    state = {k: live[k].detach().clone() if k in live else v.clone() for k, v in ckpt.state.items()}
    return Quantized(Checkpoint(state, dict(ckpt.meta)), qparams)

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
    ckpt: Checkpoint, quant, include_in_proj: bool = True, spec: ModelSpec | None = None,
    calibration=None, calibration_size: int = 128,
) -> Checkpoint:
    """A new checkpoint whose target weights are replaced by their quantized reconstruction (fake-quantized PTQ).

    ``quant`` is a quantizer config: :class:`QuantSpec` (RTN) or a calibrated one such as
    :class:`qvec.gptq.GPTQConfig`, which takes ``calibration`` (a probe: folder, .npz or ``noise``; unlabeled).
    The result keeps float tensors (so any PyTorch code can run it); ``qvec pack`` stores the real low-bit codes.
    """
    quantized, meta = quantize_checkpoint_state(ckpt, quant, include_in_proj, spec, calibration, calibration_size)
    return Checkpoint(quantized.state, meta)


def quantize_checkpoint_state(ckpt: Checkpoint, quant, include_in_proj: bool = True, spec: ModelSpec | None = None,
                              calibration=None, calibration_size: int = 128):
    """(quantized checkpoint, its metadata) and, for calibrated quantizers, each target's (scale, zero) in
    ``quantized.meta_qparams``: what ``pack`` needs to store the codes exactly."""
    spec = spec or ckpt.model_spec
    keys = target_keys(spec, include_in_proj)
    missing = [k for k in keys if k not in ckpt.state]
    if missing:
        raise QvecError(f"{ckpt.name()}: quantization target {missing[0]!r} is not in the checkpoint (is it a {spec}?)")
    meta = dict(ckpt.meta)
    record = {**quant.to_dict(), "include_in_proj": include_in_proj}
    if isinstance(quant, QuantSpec):
        state = {k: v.clone() for k, v in ckpt.state.items()}
        try:
            quantize_state_dict_(state, keys, quant)
        except NonFiniteWeightError as e:
            raise NonFiniteWeightError(f"{ckpt.name()}: {e}") from None
        out = Checkpoint(state, meta)
        out.qparams = None  # type: ignore[attr-defined]
    else:
        out, source = _calibrated(ckpt, quant, include_in_proj, spec, calibration, calibration_size)
        record["calibration"] = source
    meta[META_QUANT] = json.dumps(record)
    meta[META_KIND] = f"{meta.get(META_KIND, 'model')}+ptq"
    out.meta = meta
    return out, meta


def _calibrated(ckpt: Checkpoint, quant, include_in_proj: bool, spec: ModelSpec, calibration, n: int):
    from .gptq import check_calibration
    from .models import load_model
    from .probe import ProbeSet, load_probe
    from .quant import calibrated_quantize_

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
    targets = adapter.targets(model, include_in_proj)
    try:
        qparams = calibrated_quantize_(model, quant, targets, x)
    except NonFiniteWeightError as e:
        raise NonFiniteWeightError(f"{ckpt.name()}: {e}") from None
    live = model.state_dict()
    state = {k: live[k].detach().clone() if k in live else v.clone() for k, v in ckpt.state.items()}
    out = Checkpoint(state, dict(ckpt.meta))
    out.qparams = qparams  # type: ignore[attr-defined]
    return out, source

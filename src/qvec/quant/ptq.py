"""PTQ of whole checkpoints, the one entry point for a checkpoint: find a model's targets through its adapter and
quantize them with any registered quantizer."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from qvec.core.checkpoint import META_KIND, META_QUANT, Checkpoint
from qvec.core.errors import QvecError
from qvec.data.probe import ProbeSet
from qvec.models import ModelSpec, get_adapter, load_model
from qvec.quant.base import QParams, QuantizerConfig, as_quantizer, quantize_
from qvec.quant.calibration import calibration_images, check_calibration
from qvec.quant.grid import NonFiniteWeightError, QuantSpec, check_group_size
from qvec.quant.rtn import quantize_state_dict_
from qvec.quant.targets import ALL_TARGETS, TargetFilter


def meta_model(spec: ModelSpec, state: dict | None = None, source: str | None = None):
    """A model of ``spec`` built on the meta device (no memory, no weights), for its keys and shapes; its options
    and size are checked first, against ``state`` when given (:func:`qvec.models.guard.meta_build`)."""
    from qvec.models.guard import meta_build

    return meta_build(spec, state, source, match_state=False)


#: target_shapes answers by (spec, target filter, the file's tensor shapes): building the model on the meta device
#: costs a few hundred ms for a ViT-B, and every PTQ of a checkpoint asks
_TARGETS: OrderedDict[tuple, dict[str, tuple[int, ...]]] = OrderedDict()
_TARGETS_KEPT = 16


def target_shapes(spec: ModelSpec, targets: TargetFilter | bool = ALL_TARGETS, state: dict | None = None,
                  source: str | None = None) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of every weight PTQ quantizes in a model of ``spec`` (sized by ``state``, the
    tensors of the file ``source``). The checks against ``state`` depend only on its shapes, so a second file of
    the same shapes gets the remembered answer."""
    filt = TargetFilter.of(targets)
    shapes = None if state is None else tuple((k, tuple(v.shape)) for k, v in state.items())
    key = (spec.to_json(), repr(filt), shapes)
    if key not in _TARGETS:
        model = meta_model(spec, state, source)
        _TARGETS[key] = {t.key: tuple(t.weight.shape) for t in filt.find(model, get_adapter(spec).head_prefixes)}
        while len(_TARGETS) > _TARGETS_KEPT:
            _TARGETS.popitem(last=False)
    return dict(_TARGETS[key])


def target_keys(spec: ModelSpec, targets: TargetFilter | bool = ALL_TARGETS, state: dict | None = None,
                source: str | None = None) -> list[str]:
    """State-dict keys of the weights PTQ quantizes for a model of ``spec``."""
    return list(target_shapes(spec, targets, state, source))


@dataclass
class QuantizedCheckpoint(Checkpoint):
    """A fake-quantized checkpoint (float weights on the grid, runs anywhere) that also knows how it was made:
    the quantizer config and each target's (scale, zero), from which ``pack`` and the ONNX export read the codes
    exactly."""

    config: QuantizerConfig | None = None
    qparams: dict[str, QParams] = field(default_factory=dict)

    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight (codes, fp16 scales, zero points) of this model's targets."""
        assert self.config is not None
        return self.config.bits_per_weight(tuple(self.state[k].shape) for k in self.qparams)


@dataclass
class PTQPlan:
    """A PTQ of one checkpoint, checked before any weight is touched: the quantizer, its targets' keys, and the
    record the quantized checkpoint's header will carry."""

    config: QuantizerConfig
    targets: TargetFilter
    spec: ModelSpec
    keys: list[str]
    record: dict

    def meta(self, ckpt: Checkpoint) -> dict[str, str]:
        """``ckpt``'s header with the quantizer recorded and the kind marked ``+ptq``."""
        meta = dict(ckpt.meta)
        meta[META_QUANT] = json.dumps(self.record)
        meta[META_KIND] = f"{meta.get(META_KIND, 'model')}+ptq"
        return meta


def plan_ptq(ckpt: Checkpoint, quant: QuantizerConfig | QuantSpec, targets: TargetFilter | bool = ALL_TARGETS,
             spec: ModelSpec | None = None, calibration: object = None) -> PTQPlan:
    """Check a PTQ of ``ckpt`` (its targets are in it, the group size divides them, calibration images only for
    a quantizer that takes them) and say what it will record."""
    quant, targets, spec = as_quantizer(quant), TargetFilter.of(targets), spec or ckpt.model_spec
    keys = target_keys(spec, targets, ckpt.state, ckpt.name())
    missing = [k for k in keys if k not in ckpt.state]
    if missing:
        raise QvecError(f"{ckpt.name()}: quantization target {missing[0]!r} is not in the checkpoint (is it a {spec}?)")
    check_group_size(quant.grid, {k: tuple(ckpt.state[k].shape) for k in keys}, ckpt.name())
    if calibration is not None and not quant.needs_calibration:
        raise QvecError(f"{quant.label} needs no calibration images; got some")
    record = {**quant.to_dict(), "include_in_proj": targets.in_proj, **({"skip": list(targets.skip)}
                                                                        if targets.skip else {})}
    return PTQPlan(quant, targets, spec, keys, record)


def quantize_checkpoint(
    ckpt: Checkpoint, quant: QuantizerConfig | QuantSpec, targets: TargetFilter | bool = ALL_TARGETS,
    spec: ModelSpec | None = None, calibration: torch.Tensor | ProbeSet | str | None = None,
    calibration_size: int = 128,
) -> QuantizedCheckpoint:
    """A new checkpoint whose target weights are replaced by their quantized reconstruction (fake-quantized PTQ).

    ``quant`` is a registered quantizer config (a bare grid means RTN). Data-free quantizers run on the state dict
    itself (no model is built); calibrated ones (GPTQ) take ``calibration``: a tensor of preprocessed images, a
    probe set, or a folder, ``.npz`` or ``noise`` of which ``calibration_size`` images are used (unlabeled). The
    result keeps float tensors, so any PyTorch code can run it; ``qvec pack`` stores the real low-bit codes.
    """
    return run_ptq(ckpt, plan_ptq(ckpt, quant, targets, spec, calibration), calibration, calibration_size)


def run_ptq(ckpt: Checkpoint, plan: PTQPlan, calibration: torch.Tensor | ProbeSet | str | None = None,
            calibration_size: int = 128) -> QuantizedCheckpoint:
    """:func:`quantize_checkpoint` of a PTQ already checked by :func:`plan_ptq`."""
    quant, targets, spec = plan.config, plan.targets, plan.spec
    try:
        if quant.needs_calibration:
            state, qparams, plan.record["calibration"] = _calibrated(ckpt, quant, targets, spec, calibration,
                                                                     calibration_size)
        elif quant.weight_local:
            state = {k: v.clone() for k, v in ckpt.state.items()}
            qparams = quantize_state_dict_(state, plan.keys, quant)
        else:
            state, qparams = _on_model(ckpt, quant, targets, spec, None)
    except NonFiniteWeightError as e:
        raise NonFiniteWeightError(f"{ckpt.name()}: {e}") from None
    return QuantizedCheckpoint(state, plan.meta(ckpt), None, quant, qparams)


def _calibrated(ckpt: Checkpoint, quant: QuantizerConfig, targets: TargetFilter, spec: ModelSpec, calibration,
                n: int) -> tuple[dict, dict, dict]:
    """Preprocess the calibration images for the model, then quantize; also returns which images were used."""
    model, adapter, spec = load_model(ckpt, spec)
    if calibration is None:
        check_calibration(None, label=quant.label)
    x, source = calibration_images(calibration, n, adapter.data_config(spec, model), quant.label)
    return (*_on_model(ckpt, quant, targets, spec, x, model), source)


def _on_model(ckpt: Checkpoint, quant: QuantizerConfig, targets: TargetFilter, spec: ModelSpec,
              x: torch.Tensor | None, model=None) -> tuple[dict, dict]:
    """Run a quantizer on the model built from ``ckpt``; non-target tensors are kept as they were."""
    if model is None:
        model = load_model(ckpt, spec)[0]
    qparams = quantize_(model, quant, targets.find(model, get_adapter(spec).head_prefixes), x)
    live = model.state_dict()
    state = {k: live[k].detach().clone() if k in live else v.clone() for k, v in ckpt.state.items()}
    return state, qparams

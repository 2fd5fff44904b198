"""Export a quantized model to ONNX: every quantized Linear becomes an ONNX Runtime ``MatMulNBits`` node holding
qvec's own codes, scales and zero points (nothing is quantized again); the float parts (patch embedding, norms,
biases, head) stay float.

The source is a :class:`qvec.quant.ptq.QuantizedCheckpoint` (any quantizer's output, in memory), a packed file
(its code streams are used as they are, never dequantized), or a checkpoint file. A checkpoint file that PTQ wrote
(its header records the quantizer) is read on its recorded grid, its scales recovered by RTN and checked to give
back its weights exactly; any other is quantized first with ``quant``. The graph is the family's own model traced by
``torch.onnx.export`` with the targets swapped for a module that exports as ``MatMulNBits``; a family is exported
only when registered (:func:`register_onnx_family`), since its targets must be Linear layers that trace.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qvec.core.atomic import atomic_path
from qvec.core.checkpoint import META_QUANT, Checkpoint, read_safetensors
from qvec.core.errors import QvecError
from qvec.core.registry import Registry
from qvec.core.schema import (
    FORMAT_PACKED,
    META_CLASSES,
    META_FORMAT,
    META_KIND,
    META_MODEL,
    META_PACKED,
    META_TASK,
    check_header,
)
from qvec.deploy import require
from qvec.deploy.nbits import NBitsWeight, nbits_weight
from qvec.models import load_model
from qvec.quant.base import QuantizerConfig, quantizer_from_record
from qvec.quant.bitpack import packed_codes, read_levels
from qvec.quant.grid import QuantSpec, compute_qparams, dequantize_codes
from qvec.quant.pack import CODES, SCALE, ZERO
from qvec.quant.ptq import QuantizedCheckpoint, quantize_checkpoint, target_keys
from qvec.quant.targets import ALL_TARGETS, TargetFilter

#: Model families the exporter knows, each with a function from its built model to the module to trace.
ONNX_FAMILIES: Registry[Callable[[nn.Module], nn.Module]] = Registry("ONNX export family", ("qvec.deploy.onnx",),
                                                                     "ONNX export families")
#: the model's input configuration in an exported .onnx's metadata (not a safetensors header key), for ``qvec eval``
META_DATA = "qvec.data"
OPSET = 17


def register_onnx_family(family: str, prepare: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
    """Let the exporter handle ``family``: ``prepare`` turns its model into a module whose forward maps images to
    logits (as is, for families whose models already do). Its quantized weights must be Linear layers."""
    ONNX_FAMILIES.register(family, prepare)


register_onnx_family("timm")
register_onnx_family("qvec")


@dataclass
class QuantizedWeights:
    """What the export needs: the checkpoint header, its float tensors, and each target's packed level stream
    with its scales and zero points on ``grid``."""

    meta: dict[str, str]
    state: dict[str, torch.Tensor]
    streams: dict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor | None, tuple[int, ...]]]
    grid: QuantSpec
    name: str


def from_quantized(q: QuantizedCheckpoint) -> QuantizedWeights:
    """The exact codes of a quantizer's output: its weights read back under its own (scale, zero)."""
    assert q.config is not None
    grid = q.config.grid
    streams = {k: (packed_codes(q.state[k], grid, (s, z))[0], s, z, tuple(q.state[k].shape))
               for k, (s, z) in q.qparams.items()}
    return QuantizedWeights(dict(q.meta), q.state, streams, grid, q.name())


def from_packed(tensors: dict[str, torch.Tensor], meta: dict[str, str], name: str) -> QuantizedWeights:
    """A packed file's code streams as they are (never dequantized); the target weights themselves are zeros,
    only there for the model to be built."""
    try:
        info = json.loads(meta[META_PACKED])
        grid, shapes = QuantSpec.from_dict(info["quant"]), info["shapes"]
    except (KeyError, ValueError, TypeError) as e:
        raise QvecError(f"{name}: packed checkpoint header is malformed ({e})") from None
    state = {k: v for k, v in tensors.items() if not k.endswith((CODES, SCALE, ZERO))}
    streams = {}
    for k, shape in shapes.items():
        if k + CODES not in tensors or k + SCALE not in tensors:
            raise QvecError(f"{name}: packed checkpoint lacks the codes or scales of {k!r}")
        streams[k] = (tensors[k + CODES].numpy(), tensors[k + SCALE], tensors.get(k + ZERO), tuple(shape))
        state[k] = torch.zeros(shape)
    out_meta = {k: v for k, v in meta.items() if k not in (META_FORMAT, META_PACKED)}
    return QuantizedWeights(out_meta, state, streams, grid, name)


def is_quantized(ckpt: Checkpoint) -> bool:
    """Whether PTQ wrote ``ckpt`` (its kind ends in ``+ptq`` and its header records the quantizer)."""
    return META_QUANT in ckpt.meta and ckpt.meta.get(META_KIND, "").endswith("+ptq")


def recover_rtn(ckpt: Checkpoint) -> QuantizedCheckpoint:
    """A checkpoint PTQ wrote, with the (scale, zero) RTN finds on its recorded grid, checked to give back every
    target weight (to float rounding): one line when they do not (another quantizer's scales; pack it instead)."""
    record = json.loads(ckpt.meta[META_QUANT])
    config = quantizer_from_record(record)
    grid, targets = config.grid, TargetFilter.of(record.get("include_in_proj", True))
    qparams = {}
    for k in target_keys(ckpt.model_spec, targets):
        w = ckpt.state[k].float()
        scale, zero = compute_qparams(w, grid)
        back = dequantize_codes(torch.from_numpy(read_levels(w, grid, (scale, zero))).reshape(scale.shape[0], -1),
                                scale, zero, grid, w.shape)
        if not torch.allclose(back, w, rtol=1e-5, atol=1e-6 * float(w.abs().max())):
            raise QvecError(f"{ckpt.name()}: {k} is not on the {grid} grid RTN finds from its weights (made by "
                            f"{config.label}?); export the packed file of the same quantizer instead (qvec pack)")
        qparams[k] = (scale, zero)
    return QuantizedCheckpoint(ckpt.state, ckpt.meta, ckpt.path, config, qparams)


def _not_again(quant: QuantizerConfig | QuantSpec | None, name: str) -> None:
    if quant is not None:
        raise QvecError(f"{name} is already quantized: it is exported as it is, without a quantizer (--bits)")


def load_quantized(source: QuantizedCheckpoint | Checkpoint | str | os.PathLike,
                   quant: QuantizerConfig | QuantSpec | None = None, targets: TargetFilter | bool = ALL_TARGETS,
                   calibration=None, calibration_size: int = 128) -> QuantizedWeights:
    """The quantized weights of any source the exporter reads (see the module docstring): ``quant`` (and its
    calibration) quantizes a float checkpoint; a packed or PTQ-made one is taken as it is."""
    if isinstance(source, QuantizedCheckpoint):
        return from_quantized(source)
    if not isinstance(source, Checkpoint):
        tensors, meta = read_safetensors(source)
        meta = check_header(meta, source)
        if meta.get(META_FORMAT) == FORMAT_PACKED:
            _not_again(quant, Path(source).name)
            return from_packed(tensors, meta, Path(source).name)
        source = Checkpoint.load(source)
    if is_quantized(source):
        _not_again(quant, source.name())
        return from_quantized(recover_rtn(source))
    if quant is None:
        raise QvecError(f"{source.name()}: not quantized (no PTQ record in its header); give a quantizer "
                        "(--bits, --method) or export a packed or PTQ-made file")
    return from_quantized(quantize_checkpoint(source, quant, targets, calibration=calibration,
                                              calibration_size=calibration_size))


class _MatMulNBits(torch.autograd.Function):
    """``x @ w.T + bias`` in torch; a ``MatMulNBits`` node (and an ``Add`` for the bias) in the exported graph."""

    @staticmethod
    def forward(ctx, x, weight, bias, codes, scales, zeros, attrs):  # noqa: ARG004 - the inputs of the node
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def symbolic(g, x, weight, bias, codes, scales, zeros, attrs):  # noqa: ARG004
        inputs = [x, codes, scales] + ([zeros] if zeros is not None else [])
        y = g.op("com.microsoft::MatMulNBits", *inputs, **{f"{k}_i": v for k, v in attrs})
        return y if bias is None else g.op("Add", y, bias)


class NBitsLinear(nn.Module):
    """A Linear whose weight is exported as a ``MatMulNBits`` node (in torch it runs the Linear it wraps)."""

    def __init__(self, linear: nn.Linear, w: NBitsWeight, accuracy_level: int) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("codes", torch.from_numpy(w.codes))
        self.register_buffer("scales", torch.from_numpy(w.scales))
        self.register_buffer("zeros", None if w.zero_points is None else torch.from_numpy(w.zero_points))
        self.attrs = tuple({**w.attributes(), "accuracy_level": accuracy_level}.items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MatMulNBits.apply(x, self.linear.weight, self.linear.bias, self.codes, self.scales, self.zeros,
                                  self.attrs)


def _swap_targets(model: nn.Module, q: QuantizedWeights, accuracy_level: int) -> list[NBitsWeight]:
    """Every target Linear of ``model`` replaced by an :class:`NBitsLinear` holding its codes."""
    done = []
    for key, (stream, scale, zero, shape) in q.streams.items():
        name, _, leaf = key.rpartition(".")
        module = model.get_submodule(name) if name else None
        if leaf != "weight" or not isinstance(module, nn.Linear):
            raise QvecError(f"{q.name}: {key} is not a Linear weight; the ONNX exporter maps Linear layers to "
                            "MatMulNBits only")
        w = nbits_weight(stream, scale, zero, q.grid, shape, key)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, NBitsLinear(module, w, accuracy_level))
        done.append(w)
    return done


@dataclass
class ExportReport:
    """What was written: the file's size, and the quantized weights' bits (the container's and the grid's)."""

    path: Path
    file_bytes: int
    float_bytes: int
    num_quantized: int
    grid_bits: int
    container_bits: int
    #: bytes of the codes in the file, and what they take packed at the grid's own width (qvec pack)
    code_bytes: int
    real_code_bytes: int

    def __str__(self) -> str:
        text = (f"{self.num_quantized} MatMulNBits nodes, {self.file_bytes / 2**20:.2f} MiB "
                f"({self.file_bytes / self.float_bytes:.3f} of the float weights' {self.float_bytes / 2**20:.2f} MiB)")
        if self.container_bits != self.grid_bits:
            text += (f"; {self.grid_bits}-bit codes held exactly in {self.container_bits}-bit containers: codes "
                     f"{self.code_bytes / 2**20:.2f} MiB, {self.real_code_bytes / 2**20:.2f} MiB at their real width")
        return text


def trace_onnx(model: nn.Module, image_size: int):
    """``model`` traced to an ``onnx.ModelProto`` (images of ``image_size`` in, batch size free); its NBitsLinear
    modules become MatMulNBits nodes, everything else what the TorchScript exporter makes of it."""
    onnx = require("onnx")
    f = io.BytesIO()
    x = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=OPSET, input_names=["pixels"],
                          output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                          custom_opsets={"com.microsoft": 1})
    return onnx.load_from_string(f.getvalue())


def _write(proto, out: str | os.PathLike, spec, config, meta: dict[str, str], quant: dict | None) -> None:
    """``proto`` with qvec's metadata (model, input configuration, task, classes, grid) written atomically."""
    record = {META_MODEL: spec.to_json(), META_DATA: json.dumps(asdict(config))}
    record.update({k: meta[k] for k in (META_TASK, META_CLASSES) if k in meta})
    if quant is not None:
        record[META_QUANT] = json.dumps(quant)
    for k, v in record.items():
        proto.metadata_props.add(key=k, value=v)
    with atomic_path(out) as tmp:
        tmp.write_bytes(proto.SerializeToString())


def export_float_onnx(ckpt: Checkpoint, out: str | os.PathLike) -> Path:
    """The float model of ``ckpt`` as ONNX (MatMul / Gemm in float32): the baseline an export is measured against."""
    require("onnxruntime")
    prepare = ONNX_FAMILIES.get(ckpt.model_spec.family, "ONNX export family")
    model, adapter, spec = load_model(ckpt)
    config = adapter.data_config(spec, model)
    _write(trace_onnx(prepare(model.eval()), config.image_size), out, spec, config, ckpt.meta, None)
    return Path(out)


def export_onnx(source: QuantizedCheckpoint | Checkpoint | str | os.PathLike, out: str | os.PathLike,
                quant: QuantizerConfig | QuantSpec | None = None, *, accuracy_level: int = 0,
                targets: TargetFilter | bool = ALL_TARGETS, calibration=None, calibration_size: int = 128
                ) -> ExportReport:
    """Write ``source`` (see the module docstring) as an ONNX model for ONNX Runtime (CPU) to ``out``.

    ``accuracy_level`` is MatMulNBits' attribute: 0 keeps the activations float (the result of the fake-quantized
    model to float rounding); 4 lets the runtime quantize them to int8 per block, faster where it has the kernels."""
    require("onnxruntime")
    q = load_quantized(source, quant, targets, calibration, calibration_size)
    spec = Checkpoint(q.state, q.meta).model_spec
    prepare = ONNX_FAMILIES.get(spec.family, "ONNX export family")
    model, adapter, spec = load_model(Checkpoint(q.state, q.meta), spec)
    float_bytes = sum(v.numel() * 4 for v in q.state.values() if v.is_floating_point())
    weights = _swap_targets(model, q, accuracy_level)
    config = adapter.data_config(spec, model)
    quant_record = {**q.grid.to_dict(), "container_bits": weights[0].bits if weights else None}
    _write(trace_onnx(prepare(model.eval()), config.image_size), out, spec, config, q.meta, quant_record)
    return ExportReport(Path(out), Path(out).stat().st_size, float_bytes, len(weights), q.grid.bits,
                        weights[0].bits if weights else q.grid.bits, sum(w.codes.nbytes for w in weights),
                        sum(-(-w.n * w.k * w.grid_bits // 8) for w in weights))

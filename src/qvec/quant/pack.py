"""Packed low-bit checkpoints: the integer codes of every quantized weight bit-packed at the chosen bit-width.

A 3-bit weight really takes 3 bits: codes are stored as unsigned levels (``q - qmin``) packed little-endian into a
uint8 stream; scales are fp16 (one per row or group) and zero points uint8 (asymmetric only; fp16 for a quantizer
whose zero points are real-valued, HQQ). Every other tensor
is stored as is. Dequantizing gives ``(level + qmin - zero) * scale16``; with fp32 scales (``scale_dtype``) it
equals :func:`qvec.quant.fake_quantize` exactly, and with fp16 scales each weight differs from it by at most
``max|q - zero| * |scale32 - scale16| <= 2**bits * scale32 * 2**-11`` (fp16 keeps 11 significant bits). The bound
needs normal fp16 numbers, so a tensor whose scales fall outside fp16's normal range (rows of magnitude below
about 1e-4, or huge ones) keeps its scales in fp32.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qvec.core.checkpoint import Checkpoint, read_safetensors, safetensors_writer
from qvec.core.errors import QvecError
from qvec.core.schema import FORMAT_PACKED, META_FORMAT, META_MODEL, META_PACKED, PACKED_SUFFIXES, check_header
from qvec.core.threads import imap_threads
from qvec.quant.base import QuantizerConfig
from qvec.quant.bitpack import packed_codes, unpack_bits
from qvec.quant.grid import NonFiniteWeightError, QuantSpec, dequantize_codes
from qvec.quant.ptq import QuantizedCheckpoint, plan_ptq, run_ptq
from qvec.quant.targets import ALL_TARGETS, TargetFilter

CODES, SCALE, ZERO = PACKED_SUFFIXES
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class PackReport:
    """Sizes in bytes of the packed file against fp32 and fp16 checkpoints of the same model."""

    packed_bytes: int
    fp32_bytes: int
    fp16_bytes: int
    quantized_fp32_bytes: int
    quantized_packed_bytes: int
    num_quantized: int
    #: quantized weights (elements) in all
    quantized_weights: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight: codes, scales and zero points, as in the file."""
        return self.quantized_packed_bytes * 8 / max(1, self.quantized_weights)

    @property
    def quantized_ratio(self) -> float:
        """Packed bytes of the quantized tensors (codes + scales + zeros) over their fp32 bytes."""
        return self.quantized_packed_bytes / max(1, self.quantized_fp32_bytes)


_FP16 = torch.finfo(torch.float16)


def _scale_dtype_for(scale: torch.Tensor, wanted: torch.dtype) -> torch.dtype:
    """``wanted``, unless fp16 was asked for and a scale would be subnormal or infinite in it (then fp32). Scales
    of a full-range grid carry the row's sign: their magnitude is what must fit."""
    mag = scale.abs()
    if wanted == torch.float16 and (mag.min() < _FP16.smallest_normal or mag.max() > _FP16.max):
        return torch.float32
    return wanted


#: (bit-packed codes, scale, zero) of one quantized weight (:func:`qvec.quant.bitpack.packed_codes`)
Stream = tuple[np.ndarray, torch.Tensor, "torch.Tensor | None"]


def pack_state(
    state: dict[str, torch.Tensor], qparams: dict[str, tuple], grid: QuantSpec,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Tensors of a packed checkpoint, and the original shape of every packed weight. ``qparams`` holds the
    (scale, zero) of each quantized weight, whose values in ``state`` are on the grid: its codes are read back
    exactly."""
    out = dict(_kept(state, qparams))
    for k, qp in qparams.items():
        out.update(_stored(k, packed_codes(state[k], grid, qp), scale_dtype))
    return out, {k: list(state[k].shape) for k in state if k in qparams}


def _kept(state: dict[str, torch.Tensor], packed: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a packed file keeps as they are: all but the ``packed`` ones (NaN/Inf refused)."""
    packed = set(packed)
    for k, t in state.items():
        if k in packed:
            continue
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum())) and not bool(
                torch.isfinite(t).all()):
            raise NonFiniteWeightError(f"{k}: tensor contains NaN or Inf")
        yield k, t


def _stored(key: str, stream: Stream, scale_dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """A packed weight's tensors in the file: its codes, its scales (fp16 when they fit) and its zero points
    (integer ones as uint8, real-valued ones, HQQ's, as fp16)."""
    codes, scale, zero = stream
    out = [(key + CODES, torch.from_numpy(codes)), (key + SCALE, scale.to(_scale_dtype_for(scale, scale_dtype)))]
    if zero is not None:
        integral = bool(torch.equal(zero, torch.round(zero)))
        out.append((key + ZERO, zero.to(torch.uint8) if integral else zero.to(torch.float16)))
    return out


def _ptq_streams(ckpt: Checkpoint, quant: QuantizerConfig | QuantSpec, targets: TargetFilter | bool, calibration,
                 calibration_size: int
                 ) -> tuple[QuantizerConfig, dict[str, str], dict[str, torch.Tensor], list[str], Iterator]:
    """The quantizer, header, tensors and target keys of ``ckpt``'s PTQ, all checked; and the packed code stream of
    each target, made as it is asked for. A data-free quantizer packs each weight straight from ``ckpt``
    (:meth:`QuantizerConfig.pack_weight`: no fake-quantized copy of the model for RTN); otherwise the codes are
    read back from the quantized checkpoint."""
    if not isinstance(ckpt, QuantizedCheckpoint):
        plan = plan_ptq(ckpt, quant, targets, calibration=calibration)
        if plan.config.weight_local:
            config, state = plan.config, ckpt.state
            return (config, plan.meta(ckpt), state, plan.keys,
                    _streams(plan.keys, lambda k: config.pack_weight(state[k])))
        ckpt = run_ptq(ckpt, plan, calibration, calibration_size)
    assert ckpt.config is not None
    q, grid, keys = ckpt, ckpt.config.grid, list(ckpt.qparams)
    return q.config, q.meta, q.state, keys, _streams(keys, lambda k: packed_codes(q.state[k], grid, q.qparams[k]))


def _streams(keys: list[str], pack_one: Callable[[str], Stream]) -> Iterator[tuple[str, Stream]]:
    """``(key, pack_one(key))`` of every key in order, several weights packed at once while the caller writes the
    ones before (:func:`qvec.core.threads.imap_threads`: one weight's packing is a string of small operations
    that leave a core idle)."""
    def one(k: str) -> tuple[str, Stream]:
        try:
            return k, pack_one(k)
        except NonFiniteWeightError as e:
            raise NonFiniteWeightError(f"{k}: {e}") from None

    return imap_threads(one, keys)


def _check_packed_header(shapes: object, dtypes: object) -> None:
    """The header's shapes drive allocation: a mapping of key -> list of whole numbers >= 0, and dtypes a mapping,
    before anything is unpacked (a lying header is one line, not a traceback)."""
    if not isinstance(shapes, dict) or not isinstance(dtypes, dict):
        raise QvecError("packed checkpoint header is malformed (shapes and dtypes must be mappings)")
    for k, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise QvecError(f"packed checkpoint header is malformed (shape of {k!r} must be a list of whole numbers "
                            f">= 0, got {shape!r})")


def unpack_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """Dequantize a packed checkpoint's tensors back to a float state dict (original keys and shapes)."""
    try:
        info = json.loads(meta[META_PACKED])
        quant = QuantSpec.from_dict(info["quant"])
        shapes, dtypes = info["shapes"], info["dtypes"]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise QvecError(f"packed checkpoint header is malformed ({e})") from None
    _check_packed_header(shapes, dtypes)
    suffixes = (CODES, SCALE, ZERO)
    state = {k: v for k, v in tensors.items() if not k.endswith(suffixes)}
    for k, shape in shapes.items():
        for suffix in (CODES, SCALE):
            if k + suffix not in tensors:
                raise QvecError(f"packed checkpoint lacks tensor {k + suffix!r}")
        count = math.prod(shape)
        levels = torch.from_numpy(unpack_bits(tensors[k + CODES].numpy(), quant.bits, count))
        scale = tensors[k + SCALE]
        rows = scale.shape[0]
        if count % rows:
            raise QvecError(f"packed tensor {k!r}: {rows} scales do not divide {count} weights")
        if not bool(torch.isfinite(scale).all()):
            raise QvecError(f"packed tensor {k!r} has NaN or Inf scales")
        dtype = getattr(torch, str(dtypes.get(k, "")), None)
        if not isinstance(dtype, torch.dtype):
            raise QvecError(f"packed checkpoint header is malformed (no valid dtype for {k!r})")
        w = dequantize_codes(levels.reshape(rows, -1), scale, tensors.get(k + ZERO), quant, shape)
        state[k] = w.to(dtype)
    for k, v in state.items():
        if k not in shapes and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v.sum())):
            if not bool(torch.isfinite(v).all()):
                raise QvecError(f"tensor {k!r} contains NaN or Inf")
    return state


def _may_hold(state: dict[str, torch.Tensor], shapes: dict[str, list[int]]
              ) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """The (key, shape) of every tensor a packed file of ``state`` may hold, and their bytes at most: what sizes
    the room kept for its header. A packed weight's codes, scales and zero points are each at most its number of
    weights long, and take at most 7 bytes a weight together."""
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    kept = {k: t for k, t in state.items() if k not in shapes}
    planned = [(k, tuple(t.shape)) for k, t in kept.items()]
    planned += [(k + suffix, (n, 1)) for k, n in sizes.items() for suffix in (CODES, SCALE, ZERO)]
    return planned, sum(t.numel() * t.element_size() for t in kept.values()) + 7 * sum(sizes.values())


def pack_checkpoint(
    ckpt: Checkpoint,
    quant: QuantizerConfig | QuantSpec,
    out: str | os.PathLike,
    targets: TargetFilter | bool = ALL_TARGETS,
    scale_dtype: str = "float16",
    calibration=None,
    calibration_size: int = 128,
) -> PackReport:
    """Write a real low-bit checkpoint of ``ckpt`` to ``out`` and report its size against fp32/fp16.

    ``ckpt`` is quantized first with ``quant`` (any registered quantizer; a bare grid means RTN; calibrated ones
    take ``calibration``), unless it is already a :class:`QuantizedCheckpoint`; the codes it lands on are stored
    exactly, in the same format for every quantizer."""
    if scale_dtype not in SCALE_DTYPES:
        raise QvecError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
    config, meta, state, keys, streams = _ptq_streams(ckpt, quant, targets, calibration, calibration_size)
    packed = set(keys)
    shapes = {k: list(state[k].shape) for k in state if k in packed}
    meta = {k: v for k, v in meta.items() if k != META_FORMAT}
    meta[META_FORMAT] = FORMAT_PACKED
    meta[META_PACKED] = json.dumps(
        {
            "quant": config.grid.to_dict(),
            "shapes": shapes,
            "dtypes": {k: str(ckpt.state[k].dtype).removeprefix("torch.") for k in shapes},
            "scale_dtype": scale_dtype,
        }
    )
    q_packed = 0
    try:
        with safetensors_writer(out, meta, *_may_hold(state, shapes)) as writer:
            for k, t in _kept(state, packed):
                writer.add(k, t)
            for k, stream in streams:  # each weight is written while the next ones are packed
                for name, t in _stored(k, stream, SCALE_DTYPES[scale_dtype]):
                    writer.add(name, t)
                    q_packed += t.numel() * t.element_size()
    except NonFiniteWeightError as e:
        raise NonFiniteWeightError(f"{ckpt.name()}: {e}") from None
    finally:
        streams.close()  # on an error: the packing not yet started is dropped, torch's threads come back now
    n_all = sum(t.numel() for t in ckpt.state.values() if t.is_floating_point())
    q_fp32 = sum(ckpt.state[k].numel() * 4 for k in shapes)
    return PackReport(
        packed_bytes=Path(out).stat().st_size,
        fp32_bytes=n_all * 4,
        fp16_bytes=n_all * 2,
        quantized_fp32_bytes=q_fp32,
        quantized_packed_bytes=q_packed,
        num_quantized=len(shapes),
        quantized_weights=q_fp32 // 4,
    )


def load_packed(path: str | os.PathLike) -> Checkpoint:
    """Read a packed checkpoint and dequantize it to a float :class:`Checkpoint` (same keys as the original)."""
    tensors, meta = read_safetensors(path)
    meta = check_header(meta, path)
    if meta.get(META_FORMAT) != FORMAT_PACKED:
        raise QvecError(f"{path}: not a packed qvec checkpoint (format {meta.get(META_FORMAT, 'unknown')!r})")
    try:
        state = unpack_state(tensors, meta)
    except QvecError as e:
        raise QvecError(f"{path}: {e}") from None
    except (RuntimeError, ValueError, IndexError, TypeError) as e:  # tensors that contradict the header
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise QvecError(f"{path}: packed tensors do not match the header ({first})") from None
    out_meta = {k: v for k, v in meta.items() if k not in (META_FORMAT, META_PACKED)}
    if META_MODEL not in out_meta:
        raise QvecError(f"{path}: packed checkpoint has no model spec in its header")
    return Checkpoint(state, out_meta, Path(path))

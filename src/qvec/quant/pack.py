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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qvec.core.checkpoint import Checkpoint, read_safetensors, save_safetensors
from qvec.core.errors import QvecError
from qvec.core.schema import FORMAT_PACKED, META_FORMAT, META_MODEL, META_PACKED, PACKED_SUFFIXES, check_header
from qvec.quant.base import QuantizerConfig
from qvec.quant.grid import NonFiniteWeightError, QuantSpec, dequantize_codes, grouped_view, quantize_codes
from qvec.quant.ptq import QuantizedCheckpoint, quantize_checkpoint
from qvec.quant.targets import ALL_TARGETS, TargetFilter

CODES, SCALE, ZERO = PACKED_SUFFIXES
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# 8-value words processed per chunk (512 KiB of levels): every pass over a chunk stays in cache.
_WORDS_PER_CHUNK = 1 << 16
# Bit-widths whose eight values fill a whole machine word (2 -> 16 bits, 4 -> 32 bits): written as one cast.
_WORD_OF = {2: "<u2", 4: "<u4"}
# Weights per chunk when reading codes back: the several elementwise passes of one chunk stay in cache.
_CODE_CHUNK_ELEMS = 1 << 16


def _lane_masks(bits: int) -> list[tuple[int, int, int]]:
    """(low mask, high mask, shift) of the three merge steps of :func:`pack_bits` for ``bits``-bit values held one
    per byte of a little-endian uint64 word: step ``i`` joins neighbouring lanes of ``8 * 2**i`` bits, each holding
    a ``bits * 2**i``-bit value, into lanes twice as wide."""
    steps = []
    for i, lane in enumerate((8, 16, 32)):
        width = bits << i  # bits each lane holds before this step
        lo = sum(((1 << width) - 1) << (2 * lane * j) for j in range(64 // (2 * lane)))
        steps.append((lo, lo << lane, lane - width))
    return steps


def pack_bits(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit integers (uint8 array) into a dense little-endian uint8 bit stream: value ``i``
    occupies bits ``i*bits .. (i+1)*bits - 1`` (least significant bit first), the last byte padded with zeros;
    bits above ``bits`` in a level are dropped.

    Vectorised: eight levels are one little-endian uint64 word, whose byte lanes are merged pairwise in three
    shift-and-mask steps (bytes -> 16-bit -> 32-bit -> 64-bit lanes) until its low ``8 * bits`` bits hold the eight
    values in order; those ``bits`` bytes are the stream. Words are processed in cache-sized chunks."""
    flat = np.ascontiguousarray(levels, dtype=np.uint8).reshape(-1)
    count = flat.size
    nbytes = -(-count * bits // 8)
    if bits == 8:
        return flat.copy()
    full = count // 8
    out = np.empty(-(-count // 8) * bits, dtype=np.uint8)
    keep = np.uint64(sum(((1 << bits) - 1) << (8 * j) for j in range(8)))
    steps = [(np.uint64(lo), np.uint64(hi), np.uint64(shift)) for lo, hi, shift in _lane_masks(bits)]
    words = flat[: full * 8].view("<u8")
    wide = out[: full * bits].view(_WORD_OF.get(bits, "u1"))
    planes = out[: full * bits].reshape(-1, bits)
    for s in range(0, full, _WORDS_PER_CHUNK):
        e = min(s + _WORDS_PER_CHUNK, full)
        x = np.bitwise_and(words[s:e], keep)
        t = np.empty_like(x)
        for lo, hi, shift in steps:
            np.bitwise_and(x, hi, out=t)
            np.right_shift(t, shift, out=t)
            np.bitwise_and(x, lo, out=x)
            np.bitwise_or(x, t, out=x)
        if bits in _WORD_OF:  # the word's low 16 or 32 bits, as a contiguous cast
            wide[s:e] = x
        else:  # byte j of each word's stream: one strided plane per byte
            for j in range(bits):
                planes[s:e, j] = x if j == 0 else x >> np.uint64(8 * j)
    if count > full * 8:  # the last, partial word: padded with zero levels
        tail = np.zeros(8, dtype=np.uint8)
        tail[: count - full * 8] = flat[full * 8 :]
        out[full * bits :] = pack_bits(tail, bits)
    return out[:nbytes]


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` unsigned integers of ``bits`` bits each (the merge steps undone in
    reverse order, chunk by chunk)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size * 8 < count * bits:
        raise QvecError(f"packed stream holds {packed.size * 8} bits, {count * bits} needed for {count} codes")
    if bits == 8:
        return packed[:count].copy()
    full = count // 8
    out = np.empty(-(-count // 8) * 8, dtype=np.uint8)
    steps = [(np.uint64(lo), np.uint64(shift)) for lo, _, shift in reversed(_lane_masks(bits))]
    lanes = (32, 16, 8)
    src = packed[: full * bits]
    wide = src.view(_WORD_OF.get(bits, "u1"))
    planes = src.reshape(-1, bits)
    for s in range(0, full, _WORDS_PER_CHUNK):
        e = min(s + _WORDS_PER_CHUNK, full)
        if bits in _WORD_OF:
            x = wide[s:e].astype(np.uint64)
        else:
            x = planes[s:e, 0].astype(np.uint64)
            for j in range(1, bits):
                x |= planes[s:e, j].astype(np.uint64) << np.uint64(8 * j)
        t = np.empty_like(x)
        for (lo, shift), lane in zip(steps, lanes, strict=True):
            # lanes of 2*lane bits hold a value in their low bits: move its upper half to the upper lane
            np.left_shift(x, shift, out=t)
            np.bitwise_and(t, lo << np.uint64(lane), out=t)
            np.bitwise_and(x, lo, out=x)
            np.bitwise_or(x, t, out=x)
        out[s * 8 : e * 8] = x.view(np.uint8)
    if count > full * 8:
        tail = np.zeros(bits, dtype=np.uint8)
        rest = packed[full * bits : -(-count * bits // 8)]
        tail[: rest.size] = rest
        out[full * 8 :] = unpack_bits(tail, bits, 8)
    return out[:count]


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


def read_levels(w: torch.Tensor, grid: QuantSpec, qparams: tuple) -> np.ndarray:
    """The unsigned levels ``q - qmin`` of a weight already on ``grid`` under its ``qparams`` = (scale, zero), as a
    flat uint8 array in the order of the grouped view: :func:`qvec.quant.grid.quantize_codes`, run on cache-sized
    chunks of rows (of columns for a per-tensor grid) so that its elementwise passes do not each stream the whole
    weight through memory."""
    g = grouped_view(w.detach(), grid)
    scale, zero = qparams
    out = torch.empty(g.shape, dtype=torch.uint8)
    rows, cols = g.shape
    if rows == 1:  # one scale for the whole tensor: chunks of columns
        step = _CODE_CHUNK_ELEMS
        for c in range(0, cols, step):
            out[:, c : c + step] = quantize_codes(g[:, c : c + step], grid, (scale, zero))[0]
    else:
        step = max(1, _CODE_CHUNK_ELEMS // cols)
        for r in range(0, rows, step):
            part = (scale[r : r + step], zero[r : r + step] if zero is not None else None)
            out[r : r + step] = quantize_codes(g[r : r + step], grid, part)[0]
    return out.numpy().reshape(-1)


def pack_state(
    state: dict[str, torch.Tensor], qparams: dict[str, tuple], grid: QuantSpec,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Tensors of a packed checkpoint, and the original shape of every packed weight. ``qparams`` holds the
    (scale, zero) of each quantized weight, whose values in ``state`` are on the grid: its codes are read back
    exactly. Integer zero points are stored as uint8, real-valued ones (HQQ) as fp16."""
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for k, t in state.items():
        if k not in qparams:
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum())) and not bool(
                    torch.isfinite(t).all()):
                raise NonFiniteWeightError(f"{k}: tensor contains NaN or Inf")
            out[k] = t
            continue
        scale, zero = qparams[k]
        out[k + CODES] = torch.from_numpy(pack_bits(read_levels(t, grid, (scale, zero)), grid.bits))
        out[k + SCALE] = scale.to(_scale_dtype_for(scale, scale_dtype))
        if zero is not None:
            integral = bool(torch.equal(zero, torch.round(zero)))
            out[k + ZERO] = zero.to(torch.uint8) if integral else zero.to(torch.float16)
        shapes[k] = list(t.shape)
    return out, shapes


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
    q = ckpt if isinstance(ckpt, QuantizedCheckpoint) else quantize_checkpoint(
        ckpt, quant, targets, calibration=calibration, calibration_size=calibration_size)
    assert q.config is not None
    grid = q.config.grid
    for k in q.qparams:
        grouped_view(q.state[k], grid)  # validates the group size up front, before anything is written
    try:
        tensors, shapes = pack_state(q.state, q.qparams, grid, SCALE_DTYPES[scale_dtype])
    except NonFiniteWeightError as e:
        raise NonFiniteWeightError(f"{ckpt.name()}: {e}") from None
    meta = {k: v for k, v in q.meta.items() if k != META_FORMAT}
    meta[META_FORMAT] = FORMAT_PACKED
    meta[META_PACKED] = json.dumps(
        {
            "quant": grid.to_dict(),
            "shapes": shapes,
            "dtypes": {k: str(ckpt.state[k].dtype).removeprefix("torch.") for k in shapes},
            "scale_dtype": scale_dtype,
        }
    )
    save_safetensors(out, tensors, meta)
    n_all = sum(t.numel() for t in ckpt.state.values() if t.is_floating_point())
    q_fp32 = sum(ckpt.state[k].numel() * 4 for k in shapes)
    q_packed = sum(
        tensors[k + s].numel() * tensors[k + s].element_size() for k in shapes for s in (CODES, SCALE, ZERO)
        if k + s in tensors
    )
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

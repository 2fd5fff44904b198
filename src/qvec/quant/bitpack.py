"""Bit-level packing of integer codes: levels ``q - qmin`` of ``bits`` bits each, packed least significant bit
first into a dense uint8 stream (the format of :mod:`qvec.quant.pack`'s files and of ONNX Runtime's MatMulNBits),
and the codes of a weight computed and packed chunk by chunk, so that every elementwise pass over a chunk stays in
cache and the weight is read from memory once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import torch

from qvec.core.errors import QvecError
from qvec.quant.grid import (
    QuantSpec,
    grouped_view,
    quantize_codes,
    read_back_rows,
    require_finite,
    round_rows,
    row_qparams,
)

# 8-value words processed per chunk (512 KiB of levels): every pass over a chunk stays in cache.
_WORDS_PER_CHUNK = 1 << 16
# Bit-widths whose eight values fill a whole machine word (2 -> 16 bits, 4 -> 32 bits): written as one cast.
_WORD_OF = {2: "<u2", 4: "<u4"}


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


# Weights per chunk when computing codes: 4 MiB of fp32, so that the elementwise passes over one chunk stay in
# cache (the two L2 caches of 2 MiB and the shared L3) and the per-operation overhead stays small (docs/deploy.md,
# "pack at PTQ speed", compares chunk sizes).
_CODE_CHUNK_ELEMS = 1 << 20


def _rows_per_chunk(cols: int) -> int:
    return max(8, _CODE_CHUNK_ELEMS // cols // 8 * 8)


def _chunks(rows: int, cols: int) -> Iterator[tuple[slice, slice, int]]:
    """(rows, columns, first element) of the chunks of a grouped view: whole rows (sharing their scales), a
    multiple of 8 of them so that every chunk but the last starts on a byte of the packed stream; a single row
    (one scale for the tensor) is cut into runs of columns."""
    if rows == 1:
        for c in range(0, cols, _CODE_CHUNK_ELEMS):
            yield slice(0, 1), slice(c, c + _CODE_CHUNK_ELEMS), c
        return
    step = _rows_per_chunk(cols)
    for r in range(0, rows, step):
        yield slice(r, r + step), slice(None), r * cols


def _largest_chunk(rows: int, cols: int) -> int:
    """Elements in the largest chunk of :func:`_chunks`."""
    return min(cols, _CODE_CHUNK_ELEMS) if rows == 1 else min(rows, _rows_per_chunk(cols)) * cols


def _word_levels(bits: int) -> int | None:
    """How many ``bits``-bit levels :class:`_ChunkPacker` joins into one word: ``m`` levels make a whole number of
    bytes and at most 24 bits (exact in float32), and ``m`` divides 8, so that a chunk of a multiple of 8
    levels is whole words. None for 5 and 7 bits, which no such ``m`` fits."""
    return next((m for m in (8, 4, 2) if m * bits <= 24 and m * bits % 8 == 0), None)


class _ChunkPacker:
    """Codes of chunks of rows, packed into a stream, in work buffers allocated once: a fresh tensor for each
    operation on a chunk costs a page-faulting allocation, more than the operation itself.

    ``m`` consecutive levels are one word ``sum_j level_j * 2**(bits * j)``: a matrix-vector product with the
    powers of two, exact in float32 since every partial sum is a whole number below 2**24 (:func:`_word_levels`).
    The codes go into the product as they are (signed on a symmetric grid) and ``qmin * sum(powers)`` is taken
    off the integer words, so the levels ``q - qmin`` are never formed. The words' low bytes are the stream."""

    def __init__(self, grid: QuantSpec, chunk_elems: int) -> None:
        self.grid, self.bits, self.m = grid, grid.bits, _word_levels(grid.bits)
        self.codes = torch.empty(chunk_elems)
        if self.m is not None:
            self.powers = torch.tensor([float(1 << (self.bits * j)) for j in range(self.m)])
            self.offset = grid.qmin * sum(1 << (self.bits * j) for j in range(self.m))
            self.words = torch.empty(chunk_elems // self.m)
            self.ints = torch.empty(chunk_elems // self.m, dtype=torch.int32)

    def codes_of(self, part: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, direct: bool
                 ) -> torch.Tensor:
        """The codes (float) of rows ``part``, in the packer's buffer: RTN's own when ``direct``
        (:func:`qvec.quant.grid.round_rows`, with no clamp on a symmetric restricted grid, whose min-max scales
        keep the codes in range), else read back (:func:`qvec.quant.grid.read_back_rows`)."""
        q, grid = self.codes[: part.numel()].view(part.shape), self.grid
        if not direct:
            return read_back_rows(part, scale, zero, grid, out=q)
        return round_rows(part, scale, zero, grid, out=q, clamp=not grid.symmetric or grid.full_range)

    def pack(self, codes: torch.Tensor, out: np.ndarray, start: int) -> None:
        """Write the levels ``codes - qmin`` bit-packed into ``out`` from byte ``start`` on. ``out`` has a byte to
        spare after them: a 3-byte word is stored as 4, in order, each store's zero top byte overwritten by the
        next word's first byte."""
        flat, bits, m = codes.reshape(-1), self.bits, self.m
        n = flat.numel()
        full = 0 if m is None else n // m * m
        stop = start + full * bits // 8
        if full:
            k = full // m
            # torch's product, not numpy's: numpy's BLAS threads would fight torch's for the cores
            words = torch.mv(flat[:full].view(k, m), self.powers, out=self.words[:k])
            ints = self.ints[:k].copy_(words).sub_(self.offset).numpy()
            if m * bits == 16:
                out[start:stop].view("<u2")[:] = ints
            else:  # 24-bit words
                np.ndarray((k,), dtype="<i4", buffer=out[start : stop + 1], strides=(3,))[:] = ints
        if n > full:  # 5 or 7 bits, or fewer than m levels left: the byte-wise packer, padded with zeros
            tail = pack_bits(flat[full:].sub(self.grid.qmin).to(torch.uint8).numpy(), bits)
            out[stop : stop + tail.size] = tail


_PACKERS = threading.local()


def _packer(grid: QuantSpec, chunk_elems: int) -> _ChunkPacker:
    """This thread's packer for ``grid`` with room for chunks of ``chunk_elems``: kept from call to call, so that
    packing a model allocates its work buffers once, not once a tensor."""
    packers = _PACKERS.__dict__.setdefault("by_grid", {})
    p = packers.get(grid)
    if p is None or p.codes.numel() < chunk_elems:
        packers.clear()  # one grid at a time is what packing a model needs
        p = packers[grid] = _ChunkPacker(grid, max(chunk_elems, _CODE_CHUNK_ELEMS))
    return p


def packed_codes(w: torch.Tensor, grid: QuantSpec, qparams: tuple | None = None
                 ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
    """The bit-packed levels of ``w`` on ``grid`` (:func:`pack_bits` of the grouped view's levels), with the
    (scale, zero) of its rows.

    Without ``qparams`` these are RTN's codes of ``w`` itself (min-max scales found chunk by chunk; NaN/Inf
    refused), the very codes a fake-quantized copy would hold, without writing that copy. With ``qparams`` =
    (scale, zero), ``w`` is a quantizer's output already on the grid, and its codes are read back exactly."""
    g = grouped_view(w.detach(), grid)
    rows, cols = g.shape
    bits = grid.bits
    nbytes = -(-rows * cols * bits // 8)
    out = np.empty(nbytes + 1, dtype=np.uint8)  # a byte to spare for the packer's last store
    direct = qparams is None
    if direct and rows == 1:  # one scale for the whole tensor: it needs a pass of its own
        qparams = row_qparams(g, grid)
    scales, zeros = [], []
    packer = _packer(grid, _largest_chunk(rows, cols))
    for rs, cs, first in _chunks(rows, cols):
        part = g[rs, cs]
        if direct and rows > 1:  # NaN/Inf checked once, on all the scales, below
            scale, zero = row_qparams(part, grid, check=False)
            scales.append(scale)
            zeros.append(zero)
        else:
            scale, zero = qparams[0][rs], (qparams[1][rs] if qparams[1] is not None else None)
        packer.pack(packer.codes_of(part, scale, zero, direct), out, first * bits // 8)
    if direct and rows > 1:
        qparams = (torch.cat(scales), None if zeros[0] is None else torch.cat(zeros))
        for t in qparams:  # a NaN or Inf weight makes its row's min-max scale (or zero point) NaN or Inf
            if t is not None:
                require_finite(t)
    return out[:nbytes], qparams[0], qparams[1]


def read_levels(w: torch.Tensor, grid: QuantSpec, qparams: tuple) -> np.ndarray:
    """The unsigned levels ``q - qmin`` of a weight already on ``grid`` under its ``qparams`` = (scale, zero), as a
    flat uint8 array in the order of the grouped view (:func:`qvec.quant.grid.quantize_codes`, chunk by chunk)."""
    g = grouped_view(w.detach(), grid)
    out = torch.empty(g.shape, dtype=torch.uint8)
    scale, zero = qparams
    for rs, cs, _ in _chunks(*g.shape):
        out[rs, cs] = quantize_codes(g[rs, cs], grid, (scale[rs], zero[rs] if zero is not None else None))[0]
    return out.numpy().reshape(-1)

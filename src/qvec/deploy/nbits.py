"""qvec's codes, scales and zero points in the weight layout of ONNX Runtime's ``MatMulNBits`` (com.microsoft).

``MatMulNBits`` computes ``A @ W.T`` with ``W`` (N x K) stored as unsigned ``bits``-bit values, ``bits`` in {2, 4, 8},
in blocks of ``block_size`` inputs (a power of two from 16), each block with a scale and a zero point:
``W[n, k] = (stored - zero) * scale``. The stored values are packed little-endian, value ``i`` of a row at bits
``i*bits..``: the same bit order as qvec's packed streams (:func:`qvec.quant.bitpack.pack_bits`). So:

* the container is the smallest of 2, 4, 8 bits that holds the grid's codes; 3-bit codes go into 4-bit containers
  (5..7-bit into 8-bit) exactly, with the real (smaller) packed size reported beside the container's;
* a symmetric grid's code ``q`` is stored as ``q + 2**(C-1)``, which the runtime's default zero point ``2**(C-1)``
  removes (no zero-point tensor); when the grid has the container's width this is qvec's own level, so the packed
  stream is the runtime's tensor byte for byte;
* an asymmetric grid stores its levels with its integer zero points (packed like the codes), or real-valued ones
  (HQQ) as float zero points, which the runtime takes for 2- and 4-bit containers only;
* a per-channel (or per-tensor) scale is repeated for every block of its row; a group is a block, so its size must
  be one the runtime takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qvec.core.errors import QvecError
from qvec.quant.bitpack import pack_bits, unpack_bits
from qvec.quant.grid import QuantSpec

CONTAINERS = (2, 4, 8)
#: Block sizes the runtime takes, largest first: a per-channel grid uses the largest that divides its rows.
BLOCK_SIZES = (128, 64, 32, 16)


@dataclass
class NBitsWeight:
    """The inputs and attributes of one ``MatMulNBits`` node: ``codes`` (N, blocks, block bytes), ``scales``
    (N, blocks) float32, ``zero_points`` (None, packed uint8, or float32 (N, blocks))."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    n: int
    k: int
    bits: int
    block_size: int
    #: the grid's own bit-width (``bits`` is the container's)
    grid_bits: int

    def attributes(self) -> dict[str, int]:
        return {"K": self.k, "N": self.n, "bits": self.bits, "block_size": self.block_size}


def container_bits(grid: QuantSpec) -> int:
    return next(c for c in CONTAINERS if c >= grid.bits)


def block_size_for(grid: QuantSpec, k: int, key: str) -> int:
    """The runtime's block size for a weight with ``k`` inputs on ``grid``: its group, or for a per-channel or
    per-tensor grid the largest block size that divides ``k``. One line naming what does not fit otherwise."""
    if grid.granularity == "group":
        g = grid.group_size
        if g < 16 or g & (g - 1):
            raise QvecError(f"{key}: group size {grid.group_size} is not a block size ONNX Runtime's MatMulNBits "
                            "takes (a power of two from 16)")
        return g
    for b in BLOCK_SIZES:
        if k % b == 0:
            return b
    raise QvecError(f"{key}: {k} inputs is not a multiple of 16, the smallest block ONNX Runtime's MatMulNBits takes")


def _per_block(t: torch.Tensor, n: int, blocks: int) -> np.ndarray:
    """Scales or zero points of the grid's rows, one per (output, block): repeated across a per-channel row or a
    whole tensor, reshaped for groups."""
    t = t.detach().float().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n * blocks)
    elif t.numel() == n:
        t = t.reshape(n, 1).expand(n, blocks)
    return np.ascontiguousarray(t.reshape(n, blocks).numpy())


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Each row of uint8 ``values`` packed at ``bits`` into whole bytes (the runtime's zero-point layout)."""
    per_byte = 8 // bits
    rows, cols = values.shape
    padded = np.zeros((rows, -(-cols // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :cols] = values
    return pack_bits(padded, bits).reshape(rows, -1)


def _zero_points(zero: torch.Tensor | None, grid: QuantSpec, n: int, blocks: int, bits: int, key: str
                 ) -> np.ndarray | None:
    if zero is None:
        return None
    z = _per_block(zero, n, blocks)
    if np.array_equal(z, np.round(z)):
        return _pack_rows(z.astype(np.uint8), bits)
    if bits == 8:
        raise QvecError(f"{key}: real-valued zero points on a {grid.bits}-bit grid need 8-bit containers, for "
                        "which ONNX Runtime's MatMulNBits takes integer zero points only")
    return z


def nbits_weight(stream: np.ndarray, scale: torch.Tensor, zero: torch.Tensor | None, grid: QuantSpec,
                 shape: tuple[int, ...], key: str = "weight") -> NBitsWeight:
    """The ``MatMulNBits`` inputs of a weight of ``shape`` (N, K) whose levels ``q - qmin`` are the packed
    ``stream`` (:func:`qvec.quant.bitpack.pack_bits` at ``grid.bits``) with the grid's ``scale`` and ``zero``."""
    if len(shape) != 2:
        raise QvecError(f"{key}: MatMulNBits holds 2-D (Linear) weights, got shape {tuple(shape)}")
    n, k = (int(s) for s in shape)
    bits = container_bits(grid)
    block = block_size_for(grid, k, key)
    blocks = k // block
    if bits == grid.bits and (k * bits) % 8 == 0:  # the packed stream is the runtime's tensor as it is
        codes = np.ascontiguousarray(stream[: n * k * bits // 8])
    else:
        levels = unpack_bits(stream, grid.bits, n * k)
        if grid.symmetric:
            levels = levels + np.uint8(2 ** (bits - 1) - 2 ** (grid.bits - 1))
        codes = pack_bits(levels, bits)
    return NBitsWeight(codes.reshape(n, blocks, block * bits // 8), _per_block(scale, n, blocks),
                       _zero_points(zero, grid, n, blocks, bits, key), n, k, bits, block, grid.bits)

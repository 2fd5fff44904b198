"""The safetensors format, and a writer that streams it while its tensors are still being made.

A safetensors file is an 8-byte header length, a JSON header (each tensor's dtype, shape and byte offsets, and
``__metadata__``), then the raw tensors. :func:`write_safetensors_stream` writes tensors that all exist.
:class:`SafetensorsWriter` writes each tensor as soon as it is made, which lets the making of the next overlap the
disk: the header, whose dtypes and offsets are only known at the end, is written last into room kept for it at the
start, padded with spaces (as the format allows), and written bytes are flushed to disk as they pile up, so that the
final ``fsync`` has little left to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import BinaryIO

import torch

from qvec.core.errors import QvecError

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
#: Bytes written between two flushes to disk by :class:`SafetensorsWriter`.
SYNC_EVERY = 8 << 20

#: (key, dtype name, shape, first byte, end byte) of one tensor in the data section
Entry = tuple[str, str, Sequence[int], int, int]


def _entry(key: str, t: torch.Tensor, offset: int) -> Entry:
    if t.dtype not in DTYPE_NAMES:
        raise QvecError(f"tensor {key!r}: dtype {t.dtype} cannot be stored in safetensors")
    return key, DTYPE_NAMES[t.dtype], list(t.shape), offset, offset + t.numel() * t.element_size()


def header_bytes(entries: Iterable[Entry], metadata: Mapping[str, str]) -> bytes:
    """The JSON header of ``entries``, in that order, after ``__metadata__`` (its keys sorted, so that one
    checkpoint always gives the same bytes), padded with spaces to a multiple of 8 bytes."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    for key, dtype, shape, start, end in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def header_room(shapes: Iterable[tuple[str, Sequence[int]]], metadata: Mapping[str, str], max_bytes: int) -> int:
    """Bytes enough for the header of tensors of these keys and shapes, whatever their dtypes, in a file of at
    most ``max_bytes`` bytes of data: every dtype given the longest name and every offset ``max_bytes``."""
    longest = max(DTYPE_NAMES.values(), key=len)
    return len(header_bytes(((k, longest, s, max_bytes, max_bytes) for k, s in shapes), metadata))


def _raw(t: torch.Tensor):
    """A tensor's own bytes, as a buffer (no copy for a contiguous CPU tensor, even a view of a larger one)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors_stream(f: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """``tensors`` (in key order) and ``metadata`` in the safetensors format, to an open binary file."""
    order, entries, offset = sorted(tensors), [], 0
    for k in order:
        entries.append(_entry(k, tensors[k], offset))
        offset = entries[-1][4]
    raw = header_bytes(entries, metadata)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for k in order:
        if tensors[k].numel():
            f.write(_raw(tensors[k]))


class SafetensorsWriter:
    """Writes each tensor given to :meth:`add` to ``f`` at once, after ``header_room`` bytes kept for the header,
    which :meth:`finish` writes (:func:`header_room` says how much to keep)."""

    def __init__(self, f: BinaryIO, header_room: int) -> None:
        self.f, self.room = f, header_room
        self.entries: list[Entry] = []
        self.offset = self.unsynced = 0
        f.seek(8 + header_room)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.entries.append(_entry(key, tensor, self.offset))
        self.offset = self.entries[-1][4]
        if tensor.numel():
            self.f.write(_raw(tensor))
        self.unsynced += tensor.numel() * tensor.element_size()
        if self.unsynced >= SYNC_EVERY:  # to disk now, while the caller makes the next tensors
            self.f.flush()
            os.fdatasync(self.f.fileno())
            self.unsynced = 0

    def finish(self, metadata: Mapping[str, str]) -> None:
        """Write the header into its room (padded with spaces)."""
        raw = header_bytes(self.entries, metadata)
        if len(raw) > self.room:
            raise QvecError(f"safetensors header needs {len(raw)} bytes, {self.room} were kept for it")
        self.f.seek(0)
        self.f.write(self.room.to_bytes(8, "little"))
        self.f.write(raw + b" " * (self.room - len(raw)))
        self.f.flush()

"""What a file holds: a checkpoint, a quantization vector or a packed checkpoint (for ``qvec inspect``)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qvec.core.checkpoint import read_any_state_dict, read_safetensors
from qvec.core.errors import QvecError
from qvec.core.schema import META_FORMAT, META_PACKED, PACKED_SUFFIXES, header_schema


@dataclass
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str
    norm: float | None


@dataclass
class FileSummary:
    """Kind, header metadata and per-tensor shapes, dtypes and L2 norms of a qvec file. ``schema`` is the header
    schema (:mod:`qvec.schema`; 0 for a qvec file written before ``qvec.schema`` existed), None for a file without
    a qvec header or with an unreadable ``qvec.schema``."""

    path: Path
    kind: str
    meta: dict[str, str] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    size_bytes: int = 0
    schema: int | None = None
    #: a packed file's stored bits per quantized weight (codes, scales and zero points); None for other files
    bits_per_weight: float | None = None

    @property
    def num_params(self) -> int:
        return sum(int(torch.Size(t.shape).numel()) for t in self.tensors)

    def to_json(self) -> str:
        return json.dumps(
            {
                "path": str(self.path),
                "kind": self.kind,
                "schema": self.schema,
                "size_bytes": self.size_bytes,
                "num_params": self.num_params,
                "bits_per_weight": self.bits_per_weight,
                "meta": self.meta,
                "tensors": [t.__dict__ for t in self.tensors],
            },
            indent=1,
        )


def describe(path: str | os.PathLike) -> FileSummary:
    """Summarise a safetensors checkpoint/vector/packed file or a PyTorch state dict."""
    path = Path(path)
    schema = None
    if path.suffix in (".pt", ".pth", ".bin"):
        tensors, meta, kind = read_any_state_dict(path), {}, "pytorch state dict"
    else:
        tensors, meta = read_safetensors(path)  # shown as written: a viewer neither upgrades nor refuses
        kind = meta.get(META_FORMAT, "safetensors (no qvec header)")
        if META_FORMAT in meta:
            try:
                schema = header_schema(meta, path)
            except QvecError:
                schema = None
    infos = [
        TensorInfo(
            k,
            tuple(t.shape),
            str(t.dtype).removeprefix("torch."),
            float(t.double().norm()) if t.is_floating_point() else None,
        )
        for k, t in tensors.items()
    ]
    return FileSummary(path, kind, meta, infos, path.stat().st_size, schema, _packed_bits_per_weight(tensors, meta))


def _packed_bits_per_weight(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> float | None:
    """Stored bits of a packed file's quantized tensors over the weights they hold (from its header's shapes)."""
    try:
        shapes = json.loads(meta[META_PACKED])["shapes"]
        weights = sum(math.prod(int(s) for s in shape) for shape in shapes.values())
    except (KeyError, ValueError, TypeError):
        return None
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(PACKED_SUFFIXES))
    return 8 * stored / weights if weights else None

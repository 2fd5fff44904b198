"""Checkpoints: a state dict plus string metadata, stored as safetensors (no pickle) and written atomically.

The metadata header makes a checkpoint self-describing: which model family and architecture it holds
(``qvec.model``), what it was trained for (``qvec.task``, ``qvec.kind``) and which pretrained backbone it came
from (``qvec.backbone_fingerprint``), so that every command can rebuild the model without extra flags. The keys,
the formats and the header schema version are :mod:`qvec.schema`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qvec import __version__
from qvec.core.atomic import atomic_path, file_kind, note_input
from qvec.core.errors import QvecError
from qvec.core.limits import check_fits
from qvec.core.safetensors_writer import SafetensorsWriter, header_room, write_safetensors_stream
from qvec.core.schema import (  # noqa: F401  (the header keys live in qvec.schema; imported from here by other modules)
    FORMAT_CHECKPOINT,
    META_CLASSES,
    META_FINGERPRINT,
    META_FORMAT,
    META_KIND,
    META_MODEL,
    META_QUANT,
    META_TASK,
    check_header,
    stamp_header,
)
from qvec.core.spec import ModelSpec


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping) -> None:
    """Write tensors and string metadata atomically; each tensor's own bytes are written, so tensors that are
    views of a larger storage, or share one, need no copy. The header gets ``qvec.schema`` and ``qvec.version``
    (:func:`qvec.schema.stamp_header`)."""
    meta = _stamped(metadata, path)
    # safetensors' save_file renames a temporary file of its own (mode 0600, left behind when killed), so the file
    # is streamed here, tensor by tensor, into qvec's atomic writer: no second copy of the model in memory.
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            write_safetensors_stream(f, tensors, meta)
            f.flush()
            os.fsync(f.fileno())


def _stamped(metadata: Mapping, path: str | os.PathLike) -> dict[str, str]:
    meta = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    return stamp_header(meta, __version__, path)  # qvec.schema, qvec.version and the format's required keys


@contextmanager
def safetensors_writer(path: str | os.PathLike, metadata: Mapping, shapes: Iterable[tuple[str, Sequence[int]]],
                       max_bytes: int) -> Iterator[SafetensorsWriter]:
    """A safetensors file at ``path`` written tensor by tensor while the caller makes them
    (:class:`SafetensorsWriter`), atomically, its header stamped like :func:`save_safetensors`'. ``shapes``, the
    (key, shape) of every tensor that may be added, and ``max_bytes``, their bytes in all at most, size the
    header's room."""
    meta = _stamped(metadata, path)
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        writer = SafetensorsWriter(f, header_room(shapes, meta, max_bytes))
        yield writer
        writer.finish(meta)
        os.fsync(f.fileno())


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """A readable regular file at ``path`` (recorded as an input of the running command: no output may replace
    it), or a one-line QvecError saying what is there instead (``is a directory, not a config file``)."""
    path = Path(path)
    kind = file_kind(path)
    if kind is not None:
        raise QvecError(f"{path}: is {kind}, not a {what}")
    if not path.is_file():
        raise QvecError(f"{path}: no such {what}")
    note_input(path)
    return path


def check_file_fits(path: Path, factor: float = 1.0) -> None:
    """Loading a file whole takes about its size (times ``factor``) in memory: refuse one the machine cannot hold."""
    check_fits(path.stat().st_size * factor, f"{path}: loading this {path.stat().st_size:,}-byte file")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a missing, truncated or corrupt file is a QvecError."""
    path = require_file(path)
    check_file_fits(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QvecError(f"{path}: not a readable safetensors file ({first})") from None


def read_any_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a PyTorch file (``weights_only``)."""
    if Path(path).suffix in (".pt", ".pth", ".bin"):
        return read_torch_state_dict(path)
    return read_safetensors(path)[0]


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A PyTorch ``.pt``/``.bin`` state dict, loaded with ``weights_only=True`` (no arbitrary pickle code)."""
    check_file_fits(require_file(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text:
            # torch's advice (load with weights_only=False) would run arbitrary code from the file: not repeated
            raise QvecError(f"{path}: holds pickled Python objects beyond tensors; qvec loads only plain state "
                            "dicts (convert it to safetensors where you trust its source)") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise QvecError(f"{path}: not a loadable PyTorch state dict ({first})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise QvecError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return dict(obj)


@dataclass
class Checkpoint:
    """A model's weights (``state``) with the metadata that says what they are."""

    state: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        path = Path(path)
        if path.suffix in (".pt", ".pth", ".bin"):
            return cls(read_torch_state_dict(path), {}, path)
        state, meta = read_safetensors(path)
        meta = check_header(meta, path)
        fmt = meta.get(META_FORMAT, FORMAT_CHECKPOINT)  # a plain safetensors file (no qvec header) is a checkpoint
        if fmt != FORMAT_CHECKPOINT:
            raise QvecError(f"{path}: holds a qvec {fmt}, not a model checkpoint")
        return cls(state, meta, path)

    def save(self, path: str | os.PathLike) -> Path:
        meta = dict(self.meta)
        meta[META_FORMAT] = FORMAT_CHECKPOINT
        save_safetensors(path, self.state, meta)
        self.path = Path(path)
        return self.path

    def name(self, default: str = "the checkpoint") -> str:
        """How error messages refer to this checkpoint: its file, else ``default``."""
        return str(self.path) if self.path is not None else default

    @property
    def model_spec(self):
        """The :class:`qvec.models.ModelSpec` recorded in the header, or a QvecError if absent."""
        raw = self.meta.get(META_MODEL)
        if raw is None:
            raise QvecError(
                f"{self.name()}: no '{META_MODEL}' in the metadata; pass --model to say which architecture it is"
            )
        try:
            return ModelSpec.from_json(raw)
        except QvecError as e:
            raise QvecError(f"{self.name()}: {e}") from None

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get(META_FINGERPRINT)


def fingerprint_tensors(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """A short sha256 over the named tensors (name, dtype, shape, bytes): identifies a pretrained backbone."""
    h = hashlib.sha256()
    for k in sorted(keys):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]

"""Checkpoints: a state dict plus string metadata, stored as safetensors (no pickle) and written atomically.

The metadata header makes a checkpoint self-describing: which model family and architecture it holds
(``qvec.model``), what it was trained for (``qvec.task``, ``qvec.kind``) and which pretrained backbone it came
from (``qvec.backbone_fingerprint``), so that every command can rebuild the model without extra flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import QvecError

META_FORMAT = "qvec.format"
META_MODEL = "qvec.model"
META_TASK = "qvec.task"
META_KIND = "qvec.kind"
META_QUANT = "qvec.quant"
META_FINGERPRINT = "qvec.backbone_fingerprint"
META_VERSION = "qvec.version"
META_CLASSES = "qvec.classes"


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; artifacts get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping) -> None:
    """Write tensors and string metadata atomically (tensors are made contiguous and unshared)."""
    meta = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    meta.setdefault(META_VERSION, __version__)
    clean = {k: v.detach().contiguous().clone() if _shares_storage(v) else v.detach().contiguous()
             for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=meta)


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a missing, truncated or corrupt file is a QvecError."""
    path = Path(path)
    if not path.is_file():
        raise QvecError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QvecError(f"{path}: not a readable safetensors file ({first})") from None


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A PyTorch ``.pt``/``.bin`` state dict, loaded with ``weights_only=True`` (no arbitrary pickle code)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
            if not path.is_file():
                raise QvecError(f"{path}: no such file")
            return cls(read_torch_state_dict(path), {}, path)
        state, meta = read_safetensors(path)
        fmt = meta.get(META_FORMAT, "checkpoint")
        if fmt != "checkpoint":
            raise QvecError(f"{path}: holds a qvec {fmt}, not a model checkpoint")
        return cls(state, meta, path)

    def save(self, path: str | os.PathLike) -> Path:
        meta = dict(self.meta)
        meta[META_FORMAT] = "checkpoint"
        save_safetensors(path, self.state, meta)
        self.path = Path(path)
        return self.path

    def name(self, default: str = "the checkpoint") -> str:
        """How error messages refer to this checkpoint: its file, else ``default``."""
        return str(self.path) if self.path is not None else default

    @property
    def model_spec(self):
        """The :class:`qvec.models.ModelSpec` recorded in the header, or a QvecError if absent."""
        from .models import ModelSpec

        raw = self.meta.get(META_MODEL)
        if raw is None:
            raise QvecError(
                f"{self.name()}: no '{META_MODEL}' in the metadata; pass --model to say which architecture it is"
            )
        return ModelSpec.from_json(raw)

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

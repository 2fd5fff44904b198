"""Zero-shot classification heads for CLIP models (SPEC section 4), built once per (model, task) and cached.

A CLIP model classifies by comparing an L2-normalised image embedding with one embedding per class. The class
embedding is built from the text encoder: every prompt template is filled with the class name and encoded, each
embedding is L2-normalised, they are averaged, the average is L2-normalised again and multiplied by
``exp(logit_scale)``. The head is frozen: FT, QAT and every patched model of a task share it, it is never
quantized and never part of a quantization vector (it lives under the ``head`` prefix of the model).

Encoding hundreds of prompts through a large text tower costs minutes, so heads are cached as safetensors under
``$QVEC_HEAD_CACHE`` (default ``$XDG_CACHE_HOME/qvec/heads``, i.e. ``~/.cache/qvec/heads``), keyed by a hash of the
text tower's weights, the class names and the templates: any change to those gives a new entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qvec.core.checkpoint import read_safetensors, save_safetensors
from qvec.core.errors import QvecError
from qvec.core.schema import (
    FORMAT_HEAD,
    META_CLASSNAMES,
    META_FORMAT,
    META_LOGIT_SCALE,
    META_TASK,
    META_TEMPLATES,
    META_TEXT_FINGERPRINT,
    check_header,
)
from qvec.models.templates import fill, get_templates

HEAD_CACHE_ENV = "QVEC_HEAD_CACHE"
_ALGO_VERSION = "1"  # bump when the head construction changes, so old cache entries are not reused


def default_cache_dir() -> Path:
    """Where heads are cached: ``$QVEC_HEAD_CACHE``, else ``$XDG_CACHE_HOME/qvec/heads`` (``~/.cache/...``)."""
    env = os.environ.get(HEAD_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "qvec" / "heads"


def default_device() -> torch.device:
    """Text towers are large: encode prompts on the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------ text towers


class TextTower(ABC):
    """A CLIP text encoder with its tokenizer and logit scale: what a zero-shot head is computed from.

    Kept outside the image model's modules (so it is not in its state dict, its checkpoints or its vectors),
    and on the CPU except while encoding.
    """

    @abstractmethod
    def modules(self) -> list[nn.Module]:
        """The modules to move between devices."""

    @abstractmethod
    def encode(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """Unnormalised text embeddings, one row per text (float32, on ``device``)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor the embeddings depend on (for the cache key)."""

    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """The model's learned temperature, as stored (logits are multiplied by its exponential)."""

    def tokenizer_id(self) -> str:
        """What identifies the tokenizer (it changes the embeddings as much as the weights do)."""
        return type(self).__name__

    def fingerprint(self) -> str:
        """A sha256 of the text tower's weights and tokenizer (computed once)."""
        cached = getattr(self, "_fingerprint", None)
        if cached:
            return cached
        h = hashlib.sha256(self.tokenizer_id().encode())
        for k, t in sorted(self.state().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def to(self, device: torch.device | str) -> TextTower:
        for m in self.modules():
            m.to(device)
        return self


@torch.no_grad()
def zeroshot_weights(
    tower: TextTower,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """The head's weight, ``(num_classes, dim)`` on the CPU in float32 (SPEC section 4).

    Row c is ``exp(logit_scale) * normalize(mean_t normalize(encode(template_t(class_c))))``; logits are then
    ``normalize(image_features) @ weight.T``.
    """
    if not classnames:
        raise QvecError("a zero-shot head needs at least one class name")
    if not templates:
        raise QvecError("a zero-shot head needs at least one prompt template")
    device = torch.device(device) if device is not None else default_device()
    prompts = [fill(t, c) for c in classnames for t in templates]
    tower.to(device)
    try:
        chunks = [tower.encode(prompts[i : i + batch_size], device).float() for i in range(0, len(prompts), batch_size)]
    finally:
        tower.to("cpu")
    emb = F.normalize(torch.cat(chunks).cpu(), dim=-1).reshape(len(classnames), len(templates), -1)
    weight = F.normalize(emb.mean(dim=1), dim=-1)
    return weight * math.exp(tower.logit_scale)


# ------------------------------------------------------------------------------------------------ cache


def head_cache_key(fingerprint: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
    """A hash of everything the head depends on."""
    payload = json.dumps([_ALGO_VERSION, fingerprint, list(classnames), list(templates)], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "head"


def head_cache_path(
    tower: TextTower, classnames: Sequence[str], templates: Sequence[str], task: str | None, cache_dir: Path
) -> Path:
    key = head_cache_key(tower.fingerprint(), classnames, templates)
    return cache_dir / f"{_slug(task or 'head')}-{key}.safetensors"


def load_head(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """A zero-shot head file's weight (classes x dim) and its header (checked and upgraded, see
    :mod:`qvec.schema`); anything else is a one-line QvecError."""
    tensors, meta = read_safetensors(path)
    meta = check_header(meta, path)
    if meta.get(META_FORMAT) != FORMAT_HEAD:
        raise QvecError(f"{path}: not a qvec zero-shot head (format {meta.get(META_FORMAT, 'unknown')!r})")
    weight = tensors.get("weight")
    if weight is None or weight.ndim != 2:
        raise QvecError(f"{path}: a zero-shot head holds one 2-d tensor 'weight' (classes x dim)")
    return weight, meta


def _read_cached(path: Path, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor | None:
    """The cached weight, or None when absent or unusable (a corrupt entry is recomputed, not fatal)."""
    if not path.is_file():
        return None
    try:
        weight, meta = load_head(path)
    except QvecError as e:
        warnings.warn(f"ignoring unreadable cached zero-shot head ({e})", stacklevel=3)
        return None
    ok = (
        weight.shape[0] == len(classnames)
        and json.loads(meta.get(META_CLASSNAMES, "null")) == list(classnames)
        and json.loads(meta.get(META_TEMPLATES, "null")) == list(templates)
        and bool(torch.isfinite(weight).all())
    )
    if not ok:
        warnings.warn(f"ignoring mismatched cached zero-shot head {path}", stacklevel=3)
        return None
    return weight.float()


def build_head(
    tower: TextTower,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    task: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The zero-shot head weight for ``task`` (templates default to the task's), from the cache when possible."""
    classnames = [str(c) for c in classnames]
    templates = list(templates) if templates is not None else list(get_templates(task))
    if not use_cache:
        return zeroshot_weights(tower, classnames, templates, device)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = head_cache_path(tower, classnames, templates, task, root)
    weight = _read_cached(path, classnames, templates)
    if weight is not None:
        return weight
    weight = zeroshot_weights(tower, classnames, templates, device)
    meta = {
        META_FORMAT: FORMAT_HEAD,
        META_TASK: task or "",
        META_CLASSNAMES: json.dumps(classnames, ensure_ascii=False),
        META_TEMPLATES: json.dumps(templates, ensure_ascii=False),
        META_TEXT_FINGERPRINT: tower.fingerprint(),
        META_LOGIT_SCALE: repr(tower.logit_scale),
    }
    try:
        save_safetensors(path, {"weight": weight}, meta)
    except OSError as e:  # a read-only cache must not stop training
        warnings.warn(f"could not cache the zero-shot head at {path}: {e}", stacklevel=2)
    return weight


# ------------------------------------------------------------------------------------------------ model


class ZeroShotHead(nn.Module):
    """A frozen linear head without bias: the class embeddings, already scaled by exp(logit_scale).

    Stored as a buffer, not a parameter, so no optimizer can ever train it.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, dim))

    def set_weight(self, weight: torch.Tensor) -> None:
        if weight.ndim != 2 or weight.shape[1] != self.weight.shape[1]:
            raise QvecError(
                f"zero-shot head of shape {tuple(weight.shape)} does not fit image features of size "
                f"{self.weight.shape[1]}"
            )
        self.weight = weight.detach().to(device=self.weight.device, dtype=self.weight.dtype).clone()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight.to(features.dtype))

    def extra_repr(self) -> str:
        return f"num_classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, frozen"


class ZeroShotClassifier(nn.Module):
    """Images -> logits for a CLIP image encoder: ``normalize(features) @ head.weight.T``.

    The state dict holds only the image encoder and ``head.weight``; the text tower that builds heads is kept
    beside the module (:attr:`text_tower`), so checkpoints stay small and vectors never see it.
    """

    head: ZeroShotHead  # set by each family after its image encoder, so state dicts list the encoder first

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_text_tower", None)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image embedding (before normalisation); each family implements it."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.image_features(images), dim=-1))

    @property
    def text_tower(self) -> TextTower | None:
        return self.__dict__.get("_text_tower")

    def attach_text_tower(self, tower: TextTower | None) -> None:
        object.__setattr__(self, "_text_tower", tower)


def init_zeroshot_head(
    model: nn.Module,
    classnames: Sequence[str],
    task: str | None,
    templates: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build (or fetch from the cache) the head for ``task`` and install it in ``model``; returns the weight."""
    if not isinstance(model, ZeroShotClassifier):
        raise QvecError(f"{type(model).__name__} is not a CLIP zero-shot classifier")
    tower = model.text_tower
    if tower is None:
        raise QvecError(
            "this CLIP model was built without its text encoder (from a checkpoint, or randomly initialised "
            "without a CLIP file), so it cannot build a zero-shot head; build it with its pretrained weights "
            "(--pretrained TAG or --weights FILE holding both towers)"
        )
    weight = build_head(tower, classnames, templates, task, cache_dir, device=device)
    model.head.set_weight(weight)
    return weight

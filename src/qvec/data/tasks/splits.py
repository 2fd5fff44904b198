"""Tasks and their splits: :class:`Task` (classes, train / val / test) and the :class:`TaskSplit` kinds behind it.

Why a module: this is what training and evaluation consume, whatever file the data came from. A split never yields
model-specific tensors by itself: :meth:`TaskSplit.load` gives float images in ``[0, 1]`` (3 channels) at a
requested size, and :meth:`TaskSplit.tensors` applies a model's :class:`~qvec.models.DataConfig` to the whole split
once and keeps it in memory, because evaluation runs thousands of times on the same test and validation splits.

Validation split (SPEC section 5): 10% of the training set (rounded up), at most 5,000 examples, drawn with
``numpy.random.default_rng(0)``; the ``train`` split is the rest, so training never sees validation examples.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from qvec.core.errors import QvecError
from qvec.data.tasks.catalogue import PaperTask
from qvec.data.tasks.transforms import normalize, resize_batch

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
VAL_FRACTION = 0.1
VAL_MAX = 5000
VAL_SEED = 0


def validation_indices(n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) index arrays of the SPEC rule: 10% rounded up, at most 5,000, ``default_rng(0)``; sorted."""
    n_val = min(VAL_MAX, math.ceil(VAL_FRACTION * n_train)) if n_train > 1 else 0
    perm = np.random.default_rng(VAL_SEED).permutation(n_train)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class TaskSplit(Dataset):
    """One split of a task. Indexing yields ``(float CHW image in [0, 1] at native size, int label)``.

    Training and evaluation use the batched :meth:`load` and the cached :meth:`tensors` instead of per-item
    indexing, which is the slow path kept for interoperability with ``torch.utils.data``.
    """

    def __init__(self, task: str, which: str, labels: torch.Tensor) -> None:
        self.task = task
        self.which = which
        self.labels = labels
        self._cache: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load([i])[0], int(self.labels[i])

    def load(self, indices: Sequence[int] | torch.Tensor, size: int | None = None,
             interpolation: str = "bilinear") -> torch.Tensor:
        """Float images (B, 3, size, size) in [0, 1] (native size when ``size`` is None)."""
        raise NotImplementedError

    @property
    def native_size(self) -> int | None:
        """Side of every image when all share one square size (local npz), else None."""
        return None

    def tensors(self, config, *, max_bytes: int = 2 << 30) -> torch.Tensor | None:
        """The whole split preprocessed for a model (resized, normalised), computed once and cached.

        ``config`` is a :class:`qvec.models.DataConfig`. Returns None when it would take more than ``max_bytes``
        (the caller then streams batches through :meth:`load`).
        """
        key = (config.image_size, tuple(config.mean), tuple(config.std), config.interpolation)
        if len(self) * 3 * config.image_size**2 * 4 > max_bytes:
            return None
        with self._lock:
            if key not in self._cache:
                out = torch.empty(len(self), 3, config.image_size, config.image_size)
                for s in range(0, len(self), 1024):
                    idx = list(range(s, min(s + 1024, len(self))))
                    out[s : s + len(idx)] = normalize(
                        self.load(idx, config.image_size, config.interpolation), config.mean, config.std)
                self._cache[key] = out
            return self._cache[key]


class ArraySplit(TaskSplit):
    """A split held in memory as one uint8 tensor (N, 3, H, W)."""

    def __init__(self, task: str, which: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(task, which, labels)
        self.images = images

    @property
    def native_size(self) -> int | None:
        h, w = self.images.shape[-2:]
        return int(h) if h == w else None

    def load(self, indices: Sequence[int] | torch.Tensor, size: int | None = None,
             interpolation: str = "bilinear") -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images.index_select(0, idx).float().div_(255.0)
        return x if size is None else resize_batch(x, size, interpolation)


class HFSplit(TaskSplit):
    """A split of a Hugging Face dataset, decoded lazily (images can be large and of mixed sizes)."""

    def __init__(self, task: str, which: str, ds, image_column: str, labels: torch.Tensor) -> None:
        super().__init__(task, which, labels)
        self.ds = ds
        self.image_column = image_column

    def load(self, indices: Sequence[int] | torch.Tensor, size: int | None = None,
             interpolation: str = "bilinear") -> torch.Tensor:
        from qvec.data.files import decode_rgb, max_image_pixels

        out = []
        for i in torch.as_tensor(indices, dtype=torch.long).tolist():
            img = self.ds[int(i)][self.image_column]
            where = f"{self.task}/{self.which} image {int(i)}"
            if isinstance(img, dict) and img.get("bytes") is not None:
                arr = decode_rgb(img["bytes"], where)
            elif isinstance(img, bytes | bytearray):
                arr = decode_rgb(bytes(img), where)
            else:  # already decoded by datasets
                if img.size[0] * img.size[1] > max_image_pixels():
                    raise QvecError(f"{where}: image of {img.size[0]}x{img.size[1]} pixels is over the limit of "
                                    f"{max_image_pixels():,} (QVEC_MAX_IMAGE_PIXELS raises it)")
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
            x = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
            out.append(x if size is None else resize_batch(x, size, interpolation))
        if size is None and len({tuple(t.shape) for t in out}) > 1:
            raise QvecError(f"{self.task}/{self.which}: images have different sizes; pass a size to load()")
        return torch.cat(out) if out else torch.empty(0, 3, size or 0, size or 0)


class SubsetSplit(TaskSplit):
    """A view of another split through an index array (used for the train/val partition)."""

    def __init__(self, base: TaskSplit, which: str, indices: np.ndarray) -> None:
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        super().__init__(base.task, which, base.labels.index_select(0, self.indices))

    @property
    def native_size(self) -> int | None:
        return self.base.native_size

    def load(self, indices: Sequence[int] | torch.Tensor, size: int | None = None,
             interpolation: str = "bilinear") -> torch.Tensor:
        idx = self.indices.index_select(0, torch.as_tensor(indices, dtype=torch.long))
        return self.base.load(idx, size, interpolation)


@dataclass
class Task:
    """A classification task: name, class names, and its train / val / test splits.

    ``split("train")`` is the training set minus the validation examples; ``split("val")`` follows the SPEC rule
    (see :func:`validation_indices`); ``split("test")`` is the official test split.
    """

    name: str
    classes: list[str]
    source: str
    full_train: TaskSplit
    test: TaskSplit | None
    paper: PaperTask | None = None
    _parts: dict[str, TaskSplit] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def epochs(self) -> int | None:
        """Paper fine-tuning epochs (SPEC section 5) when the task stands for a paper task."""
        return self.paper.epochs if self.paper else None

    def split(self, which: SplitName) -> TaskSplit:
        """The ``train``, ``val`` or ``test`` split (train and val are disjoint parts of the training set)."""
        if which not in SPLITS:
            raise QvecError(f"unknown split {which!r}; known: {', '.join(SPLITS)}")
        if which == "test":
            if self.test is None:
                raise QvecError(f"task {self.name!r} ({self.source}) has no test split")
            return self.test
        if which not in self._parts:
            tr, va = validation_indices(len(self.full_train))
            self._parts["train"] = SubsetSplit(self.full_train, "train", tr)
            self._parts["val"] = SubsetSplit(self.full_train, "val", va)
        return self._parts[which]

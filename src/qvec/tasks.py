"""Tasks: named image-classification datasets with train / validation / test splits.

Two sources:

* a local folder of ``<name>.npz`` files (format of the data README: ``x_train``/``y_train``/``x_test``/``y_test``
  uint8 HWC images and int64 labels, ``classes``). The folder is configuration: the ``data_dir`` argument,
  ``--data DIR`` on the command line, or the ``QVEC_DATA`` environment variable;
* the 22 paper tasks (SPEC section 5) through Hugging Face ``datasets``, by paper name (``MNIST``, ``hf:GTSRB``) or
  by dataset id (``hf:ylecun/mnist``). ``hf_root`` (or ``QVEC_HF_ROOT``) points at a local mirror where dataset
  ``owner/name`` was saved with ``DatasetDict.save_to_disk`` under ``<root>/owner/name``.

Splits never yield model-specific tensors by themselves: :meth:`TaskSplit.load` gives float images in ``[0, 1]``
(3 channels, grayscale expanded) at a requested size, and :func:`normalize`/:meth:`TaskSplit.tensors` apply a
model's :class:`~qvec.models.DataConfig`. ``TaskSplit.tensors(config)`` preprocesses a whole split once and keeps
it in memory, because evaluation runs thousands of times on the same test and validation splits.

Validation split (SPEC section 5): 10% of the training set (rounded up), at most 5,000 examples, drawn with
``numpy.random.default_rng(0)``; the ``train`` split is the rest, so training never sees validation examples.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import QvecError

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
VAL_FRACTION = 0.1
VAL_MAX = 5000
VAL_SEED = 0
DATA_ENV = "QVEC_DATA"
HF_ROOT_ENV = "QVEC_HF_ROOT"
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "classes")


@dataclass(frozen=True)
class PaperTask:
    """One of the paper's 22 tasks (SPEC section 5): where Hugging Face keeps it and how long to fine-tune."""

    name: str
    hf_id: str
    num_classes: int
    epochs: int
    hf_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str | None = None  # None: the first Image feature
    label_column: str | None = None  # None: the first ClassLabel feature, else "label"
    classes: tuple[str, ...] = ()  # used when the dataset does not name its classes


_FER = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

PAPER_TASKS: dict[str, PaperTask] = {
    t.name: t
    for t in [
        PaperTask("Cars", "tanganke/stanford_cars", 196, 35),
        PaperTask("DTD", "tanganke/dtd", 47, 76),
        PaperTask("EuroSAT", "tanganke/eurosat", 10, 12),
        PaperTask("GTSRB", "tanganke/gtsrb", 43, 11),
        PaperTask("MNIST", "ylecun/mnist", 10, 5),
        PaperTask("RESISC45", "tanganke/resisc45", 45, 15),
        PaperTask("SUN397", "tanganke/sun397", 397, 14),
        PaperTask("SVHN", "ufldl-stanford/svhn", 10, 4, hf_config="cropped_digits"),
        PaperTask("CIFAR10", "uoft-cs/cifar10", 10, 6, image_column="img", label_column="label"),
        PaperTask("CIFAR100", "uoft-cs/cifar100", 100, 6, image_column="img", label_column="fine_label"),
        PaperTask("STL10", "tanganke/stl10", 10, 60),
        PaperTask("Food101", "ethz/food101", 101, 4, test_split="validation"),
        PaperTask("Flowers102", "dpdl-benchmark/oxford_flowers102", 102, 147),
        PaperTask("FER2013", "clip-benchmark/wds_fer2013", 7, 10, image_column="jpg", label_column="cls",
                  classes=_FER),
        PaperTask("PCAM", "1aurent/PatchCamelyon", 2, 1,
                  classes=("lymph node", "lymph node containing metastatic tumor tissue")),
        PaperTask("OxfordIIITPet", "timm/oxford-iiit-pet", 37, 82),
        PaperTask("RenderedSST2", "nateraw/rendered-sst2", 2, 39, classes=("negative", "positive")),
        PaperTask("EMNIST", "tanganke/emnist_letters", 26, 2),
        PaperTask("FashionMNIST", "zalando-datasets/fashion_mnist", 10, 5),
        PaperTask("KMNIST", "tanganke/kmnist", 10, 5),
        PaperTask("TinyImageNet", "zh-plus/tiny-imagenet", 200, 4, test_split="valid"),
        PaperTask("ImageNet", "ILSVRC/imagenet-1k", 1000, 1, test_split="validation"),
    ]
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_PAPER_BY_NORM = {_norm(k): v for k, v in PAPER_TASKS.items()}
# Local task files that stand for a paper task (their epochs come from the paper table).
_LOCAL_ALIASES = {"dtd10": "DTD", "emnistletters": "EMNIST", "stanfordcars": "Cars", "oxfordpets": "OxfordIIITPet"}


def paper_task(name: str) -> PaperTask | None:
    """The paper task a (local or paper) name stands for, if any: ``fashion_mnist`` -> FashionMNIST."""
    n = _norm(name.removeprefix("hf:"))
    if n in _PAPER_BY_NORM:
        return _PAPER_BY_NORM[n]
    alias = _LOCAL_ALIASES.get(n)
    return PAPER_TASKS[alias] if alias else None


# ---------------------------------------------------------------------------------------------- splits


def validation_indices(n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) index arrays of the SPEC rule: 10% rounded up, at most 5,000, ``default_rng(0)``; sorted."""
    n_val = min(VAL_MAX, math.ceil(VAL_FRACTION * n_train)) if n_train > 1 else 0
    perm = np.random.default_rng(VAL_SEED).permutation(n_train)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place: ``(x - mean) / std`` per channel of a (B, 3, H, W) float batch."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def resize_batch(x: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize a float batch so the shorter side is ``size``, then centre-crop to ``size`` x ``size``."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    kw = {} if mode == "nearest" else {"align_corners": False, "antialias": scale < 1}
    x = F.interpolate(x, size=(nh, nw), mode=mode, **kw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].clamp_(0.0, 1.0)


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
        from PIL import Image

        out = []
        for i in torch.as_tensor(indices, dtype=torch.long).tolist():
            img = self.ds[int(i)][self.image_column]
            if isinstance(img, dict) and img.get("bytes") is not None:
                img = Image.open(io.BytesIO(img["bytes"]))
            elif isinstance(img, bytes | bytearray):
                img = Image.open(io.BytesIO(img))
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


# ----------------------------------------------------------------------------------------------- tasks


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


def _check_labels(y: np.ndarray, k: int, where: str) -> None:
    if y.ndim != 1:
        raise QvecError(f"{where}: labels must be 1-D, got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= k):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise QvecError(f"{where}: label {bad} is out of range for {k} classes (0..{k - 1})")


def _images_from_npz(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise QvecError(f"{where}: expected uint8 images of shape (N, H, W, 1|3), got {x.dtype} {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.contiguous()


def load_npz_task(path: str | Path, name: str | None = None) -> Task:
    """A task from one ``.npz`` file of the data README's format (grayscale expanded to 3 channels)."""
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise QvecError(f"{path}: no such task file")
    try:
        d = np.load(path, allow_pickle=False)
        files = set(d.files)
    except (OSError, ValueError) as e:
        raise QvecError(f"{path}: not a readable .npz file ({str(e).splitlines()[0] if str(e) else e!r})") from None
    for a in NPZ_ARRAYS:
        if a not in files:
            raise QvecError(f"{path}: missing array {a!r} (a task file needs {', '.join(NPZ_ARRAYS)})")
    classes = [str(c) for c in d["classes"].tolist()]
    splits = {}
    for which in ("train", "test"):
        x, y = d[f"x_{which}"], d[f"y_{which}"]
        if len(x) != len(y):
            raise QvecError(f"{path}: x_{which} has {len(x)} images but y_{which} has {len(y)} labels")
        _check_labels(y, len(classes), f"{path}: y_{which}")
        splits[which] = ArraySplit(name, which, _images_from_npz(x, f"{path}: x_{which}"),
                                   torch.from_numpy(y.astype(np.int64)))
    return Task(name, classes, str(path), splits["train"], splits["test"], paper_task(name))


def _hf_label_column(features, spec: PaperTask | None) -> str:
    from datasets import ClassLabel

    if spec and spec.label_column:
        return spec.label_column
    for k, f in features.items():
        if isinstance(f, ClassLabel):
            return k
    for k in ("label", "labels", "fine_label", "cls"):
        if k in features:
            return k
    raise QvecError(f"cannot find a label column among {', '.join(features)}")


def _hf_image_column(features, spec: PaperTask | None) -> str:
    from datasets import Image

    if spec and spec.image_column:
        return spec.image_column
    for k, f in features.items():
        if isinstance(f, Image):
            return k
    for k in ("image", "img", "jpg", "png"):
        if k in features:
            return k
    raise QvecError(f"cannot find an image column among {', '.join(features)}")


def _hf_open(hf_id: str, config: str | None, hf_root: str | Path | None):
    """A ``DatasetDict``: from ``<hf_root>/<hf_id>`` or a local ``save_to_disk`` folder, else the Hub."""
    import datasets

    for cand in ([Path(hf_root) / hf_id] if hf_root else []) + [Path(hf_id)]:
        if (cand / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(cand)), str(cand)
    if hf_root and not Path(hf_id).is_absolute():
        raise QvecError(f"{Path(hf_root) / hf_id}: no saved dataset (DatasetDict.save_to_disk) in the local mirror")
    try:
        return datasets.load_dataset(hf_id, config), f"hf:{hf_id}" + (f"/{config}" if config else "")
    except Exception as e:  # network, auth, missing dataset: many exception types
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise QvecError(f"could not load Hugging Face dataset {hf_id!r} ({msg})") from None


def load_hf_task(name: str, hf_root: str | Path | None = None) -> Task:
    """A task from Hugging Face ``datasets``: a paper task name (``GTSRB``) or a dataset id/local folder."""
    spec = paper_task(name)
    hf_id = spec.hf_id if spec else name
    dd, source = _hf_open(hf_id, spec.hf_config if spec else None, hf_root)
    train_name = spec.train_split if spec else "train"
    test_name = spec.test_split if spec else next((s for s in ("test", "validation", "valid") if s in dd), None)
    if train_name not in dd:
        raise QvecError(f"{source}: no {train_name!r} split (has {', '.join(dd)})")
    if test_name is not None and test_name not in dd:
        raise QvecError(f"{source}: no {test_name!r} split (has {', '.join(dd)})")
    features = dd[train_name].features
    img_col, lab_col = _hf_image_column(features, spec), _hf_label_column(features, spec)
    for col in (img_col, lab_col):
        if col not in features:
            raise QvecError(f"{source}: no column {col!r} (has {', '.join(features)})")
    feat = features[lab_col]
    names = list(getattr(feat, "names", None) or (spec.classes if spec else ()))
    k = spec.num_classes if spec else (len(names) or None)
    task_name = spec.name if spec else name
    splits = {}
    for which, split_name in (("train", train_name), ("test", test_name)):
        if split_name is None:
            splits[which] = None
            continue
        ds = dd[split_name]
        y = np.asarray(ds[lab_col]).astype(np.int64)
        splits[which] = (ds, y)
    if k is None:
        k = int(splits["train"][1].max()) + 1
    if spec and names and len(names) != k:
        raise QvecError(f"{source}: {len(names)} class names for {spec.name}, the paper task has {k} classes")
    names = names or [str(i) for i in range(k)]
    out = {}
    for which, v in splits.items():
        if v is None:
            out[which] = None
            continue
        ds, y = v
        _check_labels(y, k, f"{source}: {which} labels")
        out[which] = HFSplit(task_name, which, ds, img_col, torch.from_numpy(y))
    return Task(task_name, names, source, out["train"], out["test"], spec)


# ------------------------------------------------------------------------------------------- registry

_TASK_CACHE: dict[tuple, Task] = {}
_CACHE_LOCK = threading.Lock()


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The configured data folder: the argument, else ``$QVEC_DATA``, else None."""
    d = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    return Path(d) if d is not None else None


def local_task_files(data_dir: str | Path | None) -> dict[str, Path]:
    """Task name -> ``.npz`` file for every task file (one with ``x_train``) in the data folder."""
    d = resolve_data_dir(data_dir)
    if d is None:
        return {}
    if not d.is_dir():
        raise QvecError(f"{d}: data folder does not exist (set --data or ${DATA_ENV})")
    out = {}
    for p in sorted(d.glob("*.npz")):
        try:
            with np.load(p, allow_pickle=False) as z:
                if "x_train" in z.files or "x_test" in z.files:
                    out[p.stem] = p
        except (OSError, ValueError):
            out[p.stem] = p  # unreadable: reported when the task is loaded
    return out


def list_tasks(data_dir: str | Path | None = None) -> list[str]:
    """Local task names (from the data folder) followed by the paper tasks not available locally."""
    local = local_task_files(data_dir)
    covered = {paper_task(n).name for n in local if paper_task(n)}
    return list(local) + [n for n in PAPER_TASKS if n not in covered]


@dataclass(frozen=True)
class TaskInfo:
    """What ``qvec tasks`` lists, read without decoding any image."""

    name: str
    num_classes: int
    epochs: int | None
    source: str
    n_train: int | None = None
    n_test: int | None = None


def task_summaries(data_dir: str | Path | None = None) -> list[TaskInfo]:
    """One row per task of :func:`list_tasks`: local files (class and example counts read from the npz), then
    the paper's Hugging Face tasks (counts from SPEC, nothing downloaded)."""
    local = local_task_files(data_dir)
    rows = []
    for name in list_tasks(data_dir):
        pt = paper_task(name)
        if name in local:
            try:
                with np.load(local[name], allow_pickle=False) as z:
                    k, ntr, nte = len(z["classes"]), len(z["y_train"]), len(z["y_test"])
            except (OSError, ValueError, KeyError) as e:
                raise QvecError(f"{local[name]}: not a valid task file ({e})") from None
            rows.append(TaskInfo(name, k, pt.epochs if pt else None, str(local[name]), ntr, nte))
        else:
            pt = PAPER_TASKS[name]
            src = f"hf:{pt.hf_id}" + (f" ({pt.hf_config})" if pt.hf_config else "")
            rows.append(TaskInfo(name, pt.num_classes, pt.epochs, src))
    return rows


def locate_task(name: str, data_dir: Path | None, local: dict[str, Path]) -> Path | str | None:
    """Where :func:`get_task` finds ``name``: its ``.npz`` file in ``local`` (the data folder's task files),
    ``"hf"`` for Hugging Face, or None when it cannot. The one rule, shared with the grid's config check.

    A paper task by its SPEC name (``MNIST``, ``Cars``) is the local file when the folder has it, else Hugging
    Face; any other name the folder lacks is unknown, so a lower-case local name never turns into a download.
    """
    if name.startswith("hf:"):
        return "hf"
    match = local.get(name) or next((p for n, p in local.items() if _norm(n) == _norm(name)), None)
    pt = paper_task(name)
    if match is None and pt is not None:
        match = next((p for n, p in local.items() if paper_task(n) is pt), None)
    if match is not None:
        return match
    return "hf" if pt is not None and (data_dir is None or name in PAPER_TASKS) else None


def get_task(name: str, data_dir: str | Path | None = None, *, hf_root: str | Path | None = None) -> Task:
    """A task by name, loaded once per process.

    ``name`` is a local file stem (``mnist``), a paper task by its SPEC name (``MNIST``, ``Cars``: the local file
    when the data folder has it, else Hugging Face), or ``hf:<paper task | dataset id | saved folder>`` to force
    Hugging Face (see :func:`locate_task`). An unknown name is an error with the ``hf:`` spelling as a hint.
    """
    hf_root = hf_root if hf_root is not None else os.environ.get(HF_ROOT_ENV) or None
    if name.startswith("hf:"):
        key = ("hf", name[3:], str(hf_root))
        loader = lambda: load_hf_task(name[3:], hf_root)  # noqa: E731
    else:
        d = resolve_data_dir(data_dir)
        local = local_task_files(d)
        where = locate_task(name, d, local)
        if isinstance(where, Path):
            stat = where.stat()
            key = ("npz", str(where.resolve()), stat.st_mtime_ns, stat.st_size)
            loader = lambda: load_npz_task(where)  # noqa: E731
        elif where == "hf":
            key = ("hf", paper_task(name).name, str(hf_root))
            loader = lambda: load_hf_task(name, hf_root)  # noqa: E731
        elif d is not None:
            hint = f"; use hf:{paper_task(name).name} to load it from Hugging Face" if paper_task(name) else ""
            raise QvecError(f"{d}: no task {name!r} (has: {', '.join(local) or 'none'}){hint}")
        else:
            raise QvecError(f"unknown task {name!r}; known: {', '.join(PAPER_TASKS)} (or set --data / ${DATA_ENV})")
    with _CACHE_LOCK:
        if key not in _TASK_CACHE:
            _TASK_CACHE[key] = loader()
        return _TASK_CACHE[key]


# ------------------------------------------------------------------------------------ pretraining corpus


def load_jpeg_corpus(path: str | Path, name: str = "pretrain") -> Task:
    """The pretraining corpus (``jpeg``/``offsets``/``y``/``classes``) decoded in memory, as a task without test.

    Decoded once per process (a few seconds for 40,000 images); never written back to disk.
    """
    path = Path(path)
    if not path.is_file():
        raise QvecError(f"{path}: no such pretraining file")
    stat = path.stat()
    key = ("jpeg", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        if key in _TASK_CACHE:
            return _TASK_CACHE[key]
    from PIL import Image

    try:
        d = np.load(path, allow_pickle=False)
        files = set(d.files)
    except (OSError, ValueError) as e:
        raise QvecError(f"{path}: not a readable .npz file ({e})") from None
    for a in ("jpeg", "offsets", "y", "classes"):
        if a not in files:
            raise QvecError(f"{path}: missing array {a!r} (a pretraining file needs jpeg, offsets, y, classes)")
    jpeg, off, y = d["jpeg"], d["offsets"], d["y"].astype(np.int64)
    classes = [str(c) for c in d["classes"].tolist()]
    if len(off) != len(y) + 1:
        raise QvecError(f"{path}: offsets has {len(off)} entries, expected len(y) + 1 = {len(y) + 1}")
    _check_labels(y, len(classes), f"{path}: y")
    imgs = []
    for i in range(len(y)):
        try:
            im = Image.open(io.BytesIO(jpeg[off[i] : off[i + 1]].tobytes())).convert("RGB")
        except OSError as e:
            raise QvecError(f"{path}: image {i} is not a decodable JPEG ({e})") from None
        imgs.append(np.asarray(im, dtype=np.uint8))
    if len({a.shape for a in imgs}) > 1:
        raise QvecError(f"{path}: images have different sizes")
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    task = Task(name, classes, str(path), ArraySplit(name, "train", x, torch.from_numpy(y)), None)
    with _CACHE_LOCK:
        _TASK_CACHE[key] = task
    return task

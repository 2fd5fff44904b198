"""Readers that turn files into :class:`~qvec.tasks.splits.Task` objects, with their input checks.

Three formats: a task ``.npz`` of the data README (``x_train``/``y_train``/``x_test``/``y_test`` uint8 HWC images
and int64 labels, ``classes``), a Hugging Face ``datasets`` dataset (the Hub, or a ``DatasetDict.save_to_disk``
folder under ``hf_root``), and the JPEG pretraining corpus (``jpeg``/``offsets``/``y``/``classes``). Separate
from the catalogue because these are the only functions that read image bytes (and import ``datasets`` or PIL),
and every problem with a file is reported here as a :class:`~qvec.errors.QvecError` naming it. Loaded tasks are
kept in one per-process cache (:func:`cached`), shared with :func:`qvec.tasks.get_task`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qvec.core.checkpoint import require_file
from qvec.core.errors import QvecError
from qvec.data.files import decode_rgb, npz_array, open_npz
from qvec.data.tasks.catalogue import paper_task
from qvec.data.tasks.splits import ArraySplit, HFSplit, Task, TaskSplit

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "classes")
_HF_IMAGE_NAMES = ("image", "img", "jpg", "png")
_HF_LABEL_NAMES = ("label", "labels", "fine_label", "cls")

_TASK_CACHE: dict[tuple, Task] = {}
_CACHE_LOCK = threading.Lock()


def cached(key: tuple, load: Callable[[], Task]) -> Task:
    """The task cached under ``key``, loaded by ``load()`` (under the lock) the first time."""
    with _CACHE_LOCK:
        if key not in _TASK_CACHE:
            _TASK_CACHE[key] = load()
        return _TASK_CACHE[key]


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
    d = open_npz(path, "task file")
    files = set(d.files)
    for a in NPZ_ARRAYS:
        if a not in files:
            raise QvecError(f"{path}: missing array {a!r} (a task file needs {', '.join(NPZ_ARRAYS)})")
    classes = [str(c) for c in npz_array(d, "classes", path).tolist()]
    splits = {}
    for which in ("train", "test"):
        x, y = npz_array(d, f"x_{which}", path), npz_array(d, f"y_{which}", path)
        if y.dtype.kind not in "iu":
            raise QvecError(f"{path}: y_{which} must hold integer class labels, got dtype {y.dtype}")
        if len(x) != len(y):
            raise QvecError(f"{path}: x_{which} has {len(x)} images but y_{which} has {len(y)} labels")
        _check_labels(y, len(classes), f"{path}: y_{which}")
        splits[which] = ArraySplit(name, which, _images_from_npz(x, f"{path}: x_{which}"),
                                   torch.from_numpy(y.astype(np.int64)))
    return Task(name, classes, str(path), splits["train"], splits["test"], paper_task(name))


def _hf_column(features, chosen: str | None, feature_type: type, fallbacks: tuple[str, ...], kind: str) -> str:
    """The column ``chosen`` by the paper table, else the first feature of ``feature_type``, else the first of the
    usual ``fallbacks`` names present."""
    if chosen:
        return chosen
    for k, f in features.items():
        if isinstance(f, feature_type):
            return k
    for k in fallbacks:
        if k in features:
            return k
    raise QvecError(f"cannot find {kind} column among {', '.join(features)}")


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
    from datasets import ClassLabel
    from datasets import Image as HFImage

    features = dd[train_name].features
    img_col = _hf_column(features, spec.image_column if spec else None, HFImage, _HF_IMAGE_NAMES, "an image")
    lab_col = _hf_column(features, spec.label_column if spec else None, ClassLabel, _HF_LABEL_NAMES, "a label")
    for col in (img_col, lab_col):
        if col not in features:
            raise QvecError(f"{source}: no column {col!r} (has {', '.join(features)})")
    names = list(getattr(features[lab_col], "names", None) or (spec.classes if spec else ()))
    task_name = spec.name if spec else name
    parts = {"train": train_name, "test": test_name}
    labels = {which: np.asarray(dd[s][lab_col]).astype(np.int64) for which, s in parts.items() if s is not None}
    k = spec.num_classes if spec else (len(names) or int(labels["train"].max()) + 1)
    if spec and names and len(names) != k:
        raise QvecError(f"{source}: {len(names)} class names for {spec.name}, the paper task has {k} classes")
    names = names or [str(i) for i in range(k)]
    out: dict[str, TaskSplit] = {}
    for which, y in labels.items():
        _check_labels(y, k, f"{source}: {which} labels")
        out[which] = HFSplit(task_name, which, dd[parts[which]], img_col, torch.from_numpy(y))
    return Task(task_name, names, source, out["train"], out.get("test"), spec)


def load_jpeg_corpus(path: str | Path, name: str = "pretrain") -> Task:
    """The pretraining corpus (``jpeg``/``offsets``/``y``/``classes``) decoded in memory, as a task without test.

    Decoded once per process (a few seconds for 40,000 images); never written back to disk.
    """
    path = require_file(path, "pretraining file")
    stat = path.stat()
    key = ("jpeg", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        if key in _TASK_CACHE:
            return _TASK_CACHE[key]
    d = open_npz(path, "pretraining file")
    files = set(d.files)
    for a in ("jpeg", "offsets", "y", "classes"):
        if a not in files:
            raise QvecError(f"{path}: missing array {a!r} (a pretraining file needs jpeg, offsets, y, classes)")
    jpeg, off = npz_array(d, "jpeg", path), npz_array(d, "offsets", path)
    y = npz_array(d, "y", path)
    if y.dtype.kind not in "iu" or off.dtype.kind not in "iu":
        raise QvecError(f"{path}: y and offsets must be integer arrays, got {y.dtype} and {off.dtype}")
    y = y.astype(np.int64)
    classes = [str(c) for c in npz_array(d, "classes", path).tolist()]
    if len(off) != len(y) + 1:
        raise QvecError(f"{path}: offsets has {len(off)} entries, expected len(y) + 1 = {len(y) + 1}")
    _check_labels(y, len(classes), f"{path}: y")
    if len(off) and (int(off.min()) < 0 or int(off.max()) > len(jpeg) or bool((np.diff(off) < 0).any())):
        raise QvecError(f"{path}: offsets must rise from 0 to at most {len(jpeg)} (the jpeg byte count)")
    imgs = []
    for i in range(len(y)):
        imgs.append(decode_rgb(jpeg[off[i] : off[i + 1]].tobytes(), f"{path}: image {i}"))
    if len({a.shape for a in imgs}) > 1:
        raise QvecError(f"{path}: images have different sizes")
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    task = Task(name, classes, str(path), ArraySplit(name, "train", x, torch.from_numpy(y)), None)
    with _CACHE_LOCK:
        _TASK_CACHE[key] = task
    return task

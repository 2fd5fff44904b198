"""Which tasks exist and where their data lives, read without decoding any image.

The paper's 22 tasks (SPEC section 5: Hugging Face ids, class counts, epochs, split and column overrides), the
names that stand for them (``fashion_mnist`` -> FashionMNIST), the configured data folder (``--data`` /
``$QVEC_DATA``) and its ``.npz`` task files, and :func:`locate_task`, the one rule that says where a name is loaded
from. Kept apart from the loaders so that listing tasks (``qvec tasks``) and checking a grid config need neither
``datasets`` nor any decoding, and so that :mod:`qvec.tasks.loaders` and :mod:`qvec.tasks.registry` can share
the rule.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qvec.core.errors import QvecError

DATA_ENV = "QVEC_DATA"
HF_ROOT_ENV = "QVEC_HF_ROOT"


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


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The configured data folder: the argument, else ``$QVEC_DATA``, else None."""
    d = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    return Path(d) if d is not None else None


def check_data_dir(d: str | Path) -> Path:
    """A data folder that is one, or a line saying what is there instead and where the name came from."""
    d = Path(d)
    if d.is_dir():
        return d
    came = f"${DATA_ENV}" if os.environ.get(DATA_ENV) and Path(os.environ[DATA_ENV]) == d else "--data"
    if d.exists() or d.is_symlink():
        from qvec.core.atomic import file_kind

        raise QvecError(f"{d}: is {file_kind(d) or 'a file'}, not a data folder (set {came} to the folder of "
                        "task .npz files)")
    raise QvecError(f"{d}: data folder does not exist (set {came} to the folder of task .npz files)")


def local_task_files(data_dir: str | Path | None) -> dict[str, Path]:
    """Task name -> ``.npz`` file for every task file (one with ``x_train``) in the data folder."""
    d = resolve_data_dir(data_dir)
    if d is None:
        return {}
    check_data_dir(d)
    out = {}
    for p in sorted(d.glob("*.npz")):
        try:
            with zipfile.ZipFile(p) as z:
                names = set(z.namelist())
            if "x_train.npy" in names or "x_test.npy" in names:
                out[p.stem] = p
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
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
            from qvec.data.files import npz_array, open_npz

            with open_npz(local[name], "task file") as z:
                if not {"classes", "y_train", "y_test"} <= set(z.files):
                    raise QvecError(f"{local[name]}: not a valid task file (it needs classes, y_train, y_test)")
                k, ntr, nte = (len(npz_array(z, a, local[name])) for a in ("classes", "y_train", "y_test"))
            rows.append(TaskInfo(name, k, pt.epochs if pt else None, str(local[name]), ntr, nte))
        else:
            pt = PAPER_TASKS[name]
            src = f"hf:{pt.hf_id}" + (f" ({pt.hf_config})" if pt.hf_config else "")
            rows.append(TaskInfo(name, pt.num_classes, pt.epochs, src))
    return rows


def locate_task(name: str, data_dir: Path | None, local: dict[str, Path]) -> Path | str | None:
    """Where :func:`~qvec.tasks.get_task` finds ``name``: its ``.npz`` file in ``local`` (the data folder's task
    files), ``"hf"`` for Hugging Face, or None when it cannot. The one rule, shared with the grid's config check.

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

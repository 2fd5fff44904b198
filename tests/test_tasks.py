"""Task registry: local .npz tasks, the SPEC validation rule, Hugging Face datasets (offline), bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qvec.core.errors import QvecError
from qvec.data.tasks import (
    PAPER_TASKS,
    get_task,
    list_tasks,
    load_hf_task,
    load_jpeg_corpus,
    load_npz_task,
    paper_task,
    task_summaries,
    validation_indices,
)
from qvec.models import DataConfig

from .tinytask import CLASSES, write_jpeg_corpus, write_task

LOCAL = ["mnist", "fashion_mnist", "cifar10", "gtsrb", "fer2013", "dtd10", "sign_digits"]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models run fastest on one thread


def shared_data() -> Path | None:
    env = os.environ.get("QVEC_DATA")
    cand = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return cand if (cand / "mnist.npz").is_file() else None


needs_shared = pytest.mark.skipif(
    shared_data() is None, reason="shared task data not found ($QVEC_DATA or ../shared/data beside the repo)"
)


# ------------------------------------------------------------------------------------------ SPEC tables


def test_paper_table_has_22_tasks_with_spec_counts():
    assert len(PAPER_TASKS) == 22
    assert PAPER_TASKS["Cars"].num_classes == 196 and PAPER_TASKS["Cars"].epochs == 35
    assert PAPER_TASKS["Flowers102"].epochs == 147 and PAPER_TASKS["PCAM"].num_classes == 2
    assert PAPER_TASKS["Food101"].test_split == "validation" and PAPER_TASKS["ImageNet"].test_split == "validation"
    assert PAPER_TASKS["CIFAR100"].label_column == "fine_label"
    assert paper_task("fashion_mnist").name == "FashionMNIST"
    assert paper_task("dtd10").name == "DTD" and paper_task("sign_digits") is None


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("n, n_val", [(10, 1), (1651, 166), (10000, 1000), (60000, 5000), (1, 0)])
def test_validation_rule(n, n_val):
    tr, va = validation_indices(n)
    assert len(va) == n_val and len(tr) == n - n_val
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(n))
    expected = np.sort(np.random.default_rng(0).permutation(n)[:n_val])
    assert np.array_equal(va, expected)


def test_train_split_excludes_validation(tmp_path):
    task = load_npz_task(write_task(tmp_path))
    tr, va = task.split("train"), task.split("val")
    assert len(tr) == 180 and len(va) == 20 and len(task.split("test")) == 80
    tr_imgs = {bytes(tr.load([i]).numpy()) for i in range(len(tr))}
    assert all(bytes(va.load([i]).numpy()) not in tr_imgs for i in range(len(va)))


# ------------------------------------------------------------------------------------------ npz source


def test_npz_task_grayscale_expanded_and_preprocessed(tmp_path):
    task = load_npz_task(write_task(tmp_path, channels=1))
    assert task.classes == CLASSES and task.num_classes == 4
    x = task.split("test").load([0, 1])
    assert x.shape == (2, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    cfg = DataConfig(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    t1 = task.split("test").tensors(cfg)
    assert t1.shape == (80, 3, 48, 48) and float(t1.min()) >= -1.0 and float(t1.max()) <= 1.0
    assert task.split("test").tensors(cfg) is t1  # preprocessed once, then cached
    img, label = task.split("test")[3]
    assert img.shape == (3, 32, 32) and label == int(task.split("test").labels[3])


def test_get_task_names_and_cache(tmp_path):
    write_task(tmp_path, "fashion_mnist")
    t1 = get_task("fashion_mnist", tmp_path)
    assert get_task("FashionMNIST", tmp_path) is t1  # paper name resolves to the local file, loaded once
    assert t1.epochs == 5
    assert list_tasks(tmp_path)[0] == "fashion_mnist" and "FashionMNIST" not in list_tasks(tmp_path)
    assert "GTSRB" in list_tasks(tmp_path)


def test_task_summaries_read_counts_without_decoding(tmp_path):
    write_task(tmp_path, "mnist", n_train=50, n_test=20, channels=1)
    rows = {r.name: r for r in task_summaries(tmp_path)}
    assert (rows["mnist"].num_classes, rows["mnist"].n_train, rows["mnist"].n_test, rows["mnist"].epochs) == (
        4, 50, 20, 5)
    assert "MNIST" not in rows and rows["SUN397"].num_classes == 397 and rows["SUN397"].source.startswith("hf:")


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_task(tmp_path, "envtask")
    monkeypatch.setenv("QVEC_DATA", str(tmp_path))
    assert get_task("envtask").num_classes == 4


@needs_shared
def test_shared_tasks_load():
    d = shared_data()
    assert set(LOCAL) <= set(list_tasks(d))
    counts = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "gtsrb": 43, "fer2013": 7, "dtd10": 10,
              "sign_digits": 10}
    for name in LOCAL:
        task = get_task(name, d)
        assert task.num_classes == counts[name], name
        tr, va, te = task.split("train"), task.split("val"), task.split("test")
        n = len(tr) + len(va)
        assert len(va) == min(5000, -(-n // 10)), name
        assert te.load([0]).shape == (1, 3, 32, 32)
        assert int(te.labels.max()) < task.num_classes
    assert "pretrain_cifar10" not in list_tasks(d)


@needs_shared
def test_shared_pretraining_corpus_decodes():
    task = load_jpeg_corpus(shared_data() / "pretrain_cifar10.npz")
    assert task.num_classes == 10 and len(task.split("train")) + len(task.split("val")) == 40000
    assert len(task.split("val")) == 4000
    with pytest.raises(QvecError, match="no test split"):
        task.split("test")


def test_jpeg_corpus(tmp_path):
    task = load_jpeg_corpus(write_jpeg_corpus(tmp_path / "c.npz", n=20))
    x = task.split("train").load([0])
    assert x.shape == (1, 3, 32, 32) and len(task.split("val")) == 2


# ------------------------------------------------------------------------------------------ Hugging Face


def _save_hf(root: Path, hf_id: str, n_classes: int, image_column: str = "image", label_column: str = "label",
             test_split: str = "test") -> Path:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(n_classes)]

    def split(n: int, size: int):
        imgs = [Image.fromarray(rng.integers(0, 255, (size, size + 6), dtype=np.uint8)) for _ in range(n)]
        labels = [int(i % n_classes) for i in range(n)]
        feats = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict({image_column: imgs, label_column: labels}, features=feats)

    dd = datasets.DatasetDict({"train": split(30, 28), test_split: split(12, 40)})
    path = root / hf_id
    dd.save_to_disk(str(path))
    return path


def test_hf_paper_task_from_local_mirror(tmp_path):
    _save_hf(tmp_path, "ylecun/mnist", 10)
    task = get_task("hf:MNIST", hf_root=tmp_path)
    assert task.name == "MNIST" and task.classes[:2] == ["class0", "class1"] and task.epochs == 5
    assert len(task.split("train")) == 27 and len(task.split("val")) == 3 and len(task.split("test")) == 12
    x = task.split("test").load([0, 1], 32)  # grayscale, non-square 40x46 -> resized + centre-cropped RGB
    assert x.shape == (2, 3, 32, 32)
    cfg = DataConfig(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    assert task.split("val").tensors(cfg).shape == (3, 3, 32, 32)


def test_paper_name_missing_from_data_folder_loads_from_hf(tmp_path):
    """A SPEC task name the data folder lacks is the paper's Hugging Face task (as the paper configs expect)."""
    data = tmp_path / "data"
    write_task(data, "fashion_mnist")
    _save_hf(tmp_path / "hf", "ylecun/mnist", 10)
    task = get_task("MNIST", data, hf_root=tmp_path / "hf")
    assert task.name == "MNIST" and len(task.split("test")) == 12


def test_hf_test_split_and_columns_follow_spec(tmp_path):
    _save_hf(tmp_path, "ethz/food101", 101, test_split="validation")
    assert len(load_hf_task("Food101", tmp_path).split("test")) == 12
    _save_hf(tmp_path, "uoft-cs/cifar100", 100, image_column="img", label_column="fine_label")
    assert load_hf_task("CIFAR100", tmp_path).num_classes == 100


def test_hf_webdataset_columns_and_names_from_table(tmp_path):
    """FER2013 on the Hub is a webdataset: image in ``jpg``, integer label in ``cls``, no class names."""
    import datasets
    from PIL import Image

    imgs = [Image.fromarray(np.full((48, 48), 10 * i, np.uint8)) for i in range(14)]
    feats = datasets.Features({"jpg": datasets.Image(), "cls": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"jpg": imgs, "cls": [i % 7 for i in range(14)]}, features=feats)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "clip-benchmark/wds_fer2013"))
    task = load_hf_task("FER2013", tmp_path)
    assert task.classes[0] == "angry" and task.num_classes == 7 and task.epochs == 10
    assert task.split("test").load([3], 32).shape == (1, 3, 32, 32)


def test_hf_dataset_by_local_folder(tmp_path):
    path = _save_hf(tmp_path, "someone/tiny", 3)
    task = get_task(f"hf:{path}")
    assert task.num_classes == 3 and len(task.split("test")) == 12


def test_hf_class_count_mismatch(tmp_path):
    _save_hf(tmp_path, "tanganke/gtsrb", 5)
    with pytest.raises(QvecError, match="5 class names for GTSRB, the paper task has 43"):
        load_hf_task("GTSRB", tmp_path)


def test_hf_mirror_without_dataset(tmp_path):
    with pytest.raises(QvecError, match="no saved dataset"):
        load_hf_task("KMNIST", tmp_path)


# ------------------------------------------------------------------------------------------ bad input


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_array(tmp_path):
    path = write_task(tmp_path, y_test=None)
    with pytest.raises(QvecError) as e:
        load_npz_task(path)
    assert "missing array 'y_test'" in _one_line(e) and str(path) in str(e.value)


def test_labels_out_of_range(tmp_path):
    path = write_task(tmp_path, y_train=np.full(200, 7, np.int64))
    with pytest.raises(QvecError) as e:
        load_npz_task(path)
    assert "label 7 is out of range for 4 classes" in _one_line(e) and "y_train" in str(e.value)


def test_wrong_image_layout_and_length(tmp_path):
    with pytest.raises(QvecError, match="expected uint8 images"):
        load_npz_task(write_task(tmp_path, "a", x_test=np.zeros((80, 32, 32, 3), np.float32)))
    with pytest.raises(QvecError, match="80 images but y_test has 5 labels"):
        load_npz_task(write_task(tmp_path, "b", y_test=np.zeros(5, np.int64)))


def test_not_an_npz(tmp_path):
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(QvecError, match="not a readable .npz"):
        get_task("junk", tmp_path)


def test_data_folder_lacks_task(tmp_path):
    write_task(tmp_path, "mnist")
    with pytest.raises(QvecError) as e:
        get_task("gtsrb", tmp_path)
    msg = _one_line(e)
    assert "no task 'gtsrb'" in msg and "has: mnist" in msg and "hf:GTSRB" in msg


def test_unknown_task_lists_known(monkeypatch):
    monkeypatch.delenv("QVEC_DATA", raising=False)
    with pytest.raises(QvecError) as e:
        get_task("nosuchtask")
    assert "unknown task 'nosuchtask'" in _one_line(e) and "GTSRB" in str(e.value)


def test_missing_data_folder(tmp_path):
    with pytest.raises(QvecError, match="data folder does not exist"):
        get_task("mnist", tmp_path / "nope")


def test_unknown_split(tmp_path):
    task = load_npz_task(write_task(tmp_path))
    with pytest.raises(QvecError, match="unknown split 'dev'"):
        task.split("dev")  # type: ignore[arg-type]

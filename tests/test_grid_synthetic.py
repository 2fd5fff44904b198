"""The generated task suite: the real suite's file format, deterministic, cached, and learnable."""

from __future__ import annotations

import numpy as np
import pytest

from qvec.core.errors import QvecError
from qvec.data.synthetic import PRETRAIN_FILE, SYNTHETIC_TASKS, generate_task, write_suite
from qvec.data.tasks import get_task, list_tasks, load_jpeg_corpus


def test_suite_has_the_real_format_and_loads_as_tasks(tmp_path):
    root = write_suite(tmp_path, n_train=40, n_test=12, n_pretrain=30)
    assert set(SYNTHETIC_TASKS) <= set(list_tasks(root))
    for name in SYNTHETIC_TASKS:
        with np.load(root / f"{name}.npz", allow_pickle=False) as d:
            assert set(d.files) == {"x_train", "y_train", "x_test", "y_test", "classes"}
            x, y = d["x_train"], d["y_train"]
            assert x.dtype == np.uint8 and x.shape[1:3] == (32, 32) and x.shape[3] in (1, 3)
            assert y.dtype == np.int64 and y.max() < len(d["classes"]) and len(d["x_test"]) == 12
        task = get_task(name, root)
        assert len(task.split("val")) == 4 and len(task.split("test")) == 12
    corpus = load_jpeg_corpus(root / PRETRAIN_FILE)
    assert len(corpus.full_train) == 30
    assert corpus.num_classes == sum(len(c) for _, c in SYNTHETIC_TASKS.values())


def test_generation_is_deterministic_and_cached(tmp_path):
    a = generate_task("syn_shapes", 20, 5)
    b = generate_task("syn_shapes", 20, 5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["x_train"][:5], a["x_test"])  # train and test are different draws
    root = write_suite(tmp_path, tasks=["syn_blobs"], n_train=10, n_test=5, n_pretrain=10)
    mtime = (root / "syn_blobs.npz").stat().st_mtime_ns
    write_suite(tmp_path, tasks=["syn_blobs"], n_train=10, n_test=5, n_pretrain=10)
    assert (root / "syn_blobs.npz").stat().st_mtime_ns == mtime  # reused
    write_suite(tmp_path, tasks=["syn_blobs"], n_train=12, n_test=5, n_pretrain=10)
    with np.load(root / "syn_blobs.npz") as d:
        assert len(d["x_train"]) == 12  # other parameters: regenerated


def test_classes_are_balanced_enough_and_errors(tmp_path):
    d = generate_task("syn_gratings", 400, 10)
    counts = np.bincount(d["y_train"], minlength=8)
    assert counts.min() > 25
    with pytest.raises(QvecError, match="unknown synthetic task"):
        write_suite(tmp_path, tasks=["nope"])

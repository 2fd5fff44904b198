"""Evaluation: exact Top-1 counts, cached preprocessing, PTQ before evaluation, head mismatch errors."""

from __future__ import annotations

import pytest
import torch

from qvec.core.checkpoint import META_CLASSES, Checkpoint
from qvec.core.errors import QvecError
from qvec.data.tasks import load_npz_task, normalize
from qvec.models import ModelSpec, build_model, checkpoint_from_model, get_adapter, load_model
from qvec.quant import QuantSpec, find_targets, quantize_
from qvec.train.evaluate import EvalResult, evaluate, evaluate_checkpoint, infer_data_config

from .tinytask import write_task

SPEC = ModelSpec("qvec", "vit-nano", 4)


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models run fastest on one thread


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return load_npz_task(write_task(tmp_path_factory.mktemp("d"), "stripes", n_train=60, n_test=50))


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    torch.manual_seed(0)
    ck = checkpoint_from_model(build_model(SPEC), SPEC, **{META_CLASSES: '["0deg", "45deg", "90deg", "135deg"]'})
    return ck.save(tmp_path_factory.mktemp("c") / "m.safetensors")


def _manual_top1(model, task, split="test"):
    ds = task.split(split)
    cfg = infer_data_config(model)
    x = normalize(ds.load(range(len(ds)), cfg.image_size), cfg.mean, cfg.std)
    with torch.no_grad():
        return int((model.eval()(x).argmax(-1) == ds.labels).sum())


def test_evaluate_counts_match_manual(task, ckpt_path):
    model, _, _ = load_model(Checkpoint.load(ckpt_path))
    res = evaluate(model, task, "test", batch_size=7)  # batches that do not divide the split
    assert isinstance(res, EvalResult) and res.n == 50
    assert res.correct == _manual_top1(model, task) and res.accuracy == pytest.approx(res.correct / 50)
    assert res.images_per_s > 0 and res.seconds > 0
    limited = evaluate(model, task, "test", limit=10, progress=True)
    assert limited.n == 10
    assert evaluate(model, task, "val").n == len(task.split("val")) == 6


def test_split_preprocessed_once(task, ckpt_path):
    model, _, _ = load_model(Checkpoint.load(ckpt_path))
    ds = task.split("test")
    evaluate(model, task)
    cached = dict(ds._cache)
    evaluate(model, task)
    assert len(ds._cache) == 1 and all(ds._cache[k] is v for k, v in cached.items())


def test_streaming_equals_cached(task, ckpt_path):
    model, _, _ = load_model(Checkpoint.load(ckpt_path))
    a = evaluate(model, task, batch_size=16)
    b = evaluate(model, task, batch_size=16, cache_max_bytes=0)  # too big to cache: streamed batches
    assert a.correct == b.correct


def test_mode_restored(task, ckpt_path):
    model, _, _ = load_model(Checkpoint.load(ckpt_path))
    model.train()
    evaluate(model, task, limit=4)
    assert model.training


def test_evaluate_checkpoint_with_ptq(task, ckpt_path):
    q = QuantSpec(2)
    res = evaluate_checkpoint(ckpt_path, task, "test", q)
    model, adapter, _ = load_model(Checkpoint.load(ckpt_path))
    quantize_(model, q, find_targets(model, adapter.head_prefixes))
    assert res.correct == _manual_top1(model, task)
    plain = evaluate_checkpoint(Checkpoint.load(ckpt_path), task)
    model, _, _ = load_model(Checkpoint.load(ckpt_path))
    assert plain.correct == _manual_top1(model, task)


def test_head_mismatch(tmp_path, task):
    spec = ModelSpec("qvec", "vit-nano", 10)
    torch.manual_seed(0)
    path = checkpoint_from_model(build_model(spec), spec).save(tmp_path / "ten.safetensors")
    with pytest.raises(QvecError) as e:
        evaluate_checkpoint(path, task)
    assert "head has 10 classes but task 'stripes' has 4" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(QvecError, match="model has a head for 10 classes"):
        evaluate(build_model(spec), task)


def test_other_tasks_head(tmp_path, task):
    torch.manual_seed(0)
    ck = checkpoint_from_model(build_model(SPEC), SPEC, **{META_CLASSES: '["a", "b", "c", "d"]'})
    with pytest.raises(QvecError, match="another task's head"):
        evaluate_checkpoint(ck, task)
    assert evaluate_checkpoint(ck, task, check_classes=False).n == 50


def test_config_from_spec(task):
    torch.manual_seed(0)
    model = build_model(SPEC)
    cfg = get_adapter(SPEC).data_config(SPEC, model)
    assert infer_data_config(model) == cfg
    assert evaluate(model, task, config=SPEC).correct == evaluate(model, task, config=cfg).correct

"""Training: determinism, resumability, FT vs QAT differing only in fake quantization, pretraining, CLI, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from qvec.cli import main
from qvec.core.checkpoint import META_CLASSES, META_FINGERPRINT, META_KIND, META_QUANT, Checkpoint, fingerprint_tensors
from qvec.core.errors import QvecError
from qvec.data.tasks import load_npz_task
from qvec.models import ModelSpec, get_adapter
from qvec.quant import QuantSpec
from qvec.train.recipe import QUALITY_FINETUNE, QUALITY_PRETRAIN, SMALL_FINETUNE, SMALL_PRETRAIN, Recipe
from qvec.train.trainer import finetune, log_path_for, lr_at, pretrain, state_path

from .tinytask import write_jpeg_corpus, write_task

NANO = ModelSpec("qvec", "vit-nano", 0)
TINY = Recipe(lr=2e-3, warmup_steps=2, batch_size=32, epochs=2, train_limit=96)
Q3 = QuantSpec(3)


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models run fastest on one thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_task(d, "stripes")
    return d


@pytest.fixture(scope="module")
def task(data):
    return load_npz_task(data / "stripes.npz")


@pytest.fixture(scope="module")
def theta0(tmp_path_factory):
    d = tmp_path_factory.mktemp("theta0")
    corpus = write_jpeg_corpus(d / "corpus.npz", n=96)
    r = Recipe(lr=2e-3, warmup_steps=2, batch_size=32, epochs=1, augment=True, hflip=True)
    pretrain(NANO, corpus, r, d / "theta0.safetensors", progress=False)
    return d / "theta0.safetensors"


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory, task, theta0):
    """The reference, uninterrupted FT run."""
    out = tmp_path_factory.mktemp("ft") / "ft.safetensors"
    return finetune(NANO, task, TINY, out, init=theta0, progress=False), out


def _same(a: Checkpoint, b: Checkpoint) -> bool:
    return a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_pretrain_checkpoint(theta0):
    ck = Checkpoint.load(theta0)
    assert ck.meta[META_KIND] == "pretrained" and ck.model_spec.num_classes == 4
    keys = get_adapter(ck.model_spec).backbone_keys(ck.state)
    assert ck.meta[META_FINGERPRINT] == fingerprint_tensors(ck.state, keys)
    log = json.loads(log_path_for(theta0).read_text())
    assert len(log["epochs"]) == 1 and 0 <= log["epochs"][0]["val_acc"] <= 1


def test_ft_checkpoint_and_log(ft_run, theta0):
    ck, out = ft_run
    assert ck.meta[META_KIND] == "ft" and META_QUANT not in ck.meta
    assert ck.meta[META_FINGERPRINT] == Checkpoint.load(theta0).meta[META_FINGERPRINT]  # propagated from theta_0
    assert json.loads(ck.meta[META_CLASSES]) == ["0deg", "45deg", "90deg", "135deg"]
    assert Recipe.from_json(ck.meta["qvec.recipe"]) == TINY and float(ck.meta["qvec.train_seconds"]) > 0
    log = json.loads(log_path_for(out).read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert all("train_loss" in e and "val_acc" in e for e in log["epochs"])
    assert not state_path(out).exists()  # removed once the checkpoint is written
    # the head is new for the task, the backbone starts from theta_0 and moves
    th = Checkpoint.load(theta0).state
    assert not torch.equal(th["blocks.0.mlp.fc1.weight"], ck.state["blocks.0.mlp.fc1.weight"])


def test_deterministic(ft_run, task, theta0, tmp_path):
    again = finetune(NANO, task, TINY, tmp_path / "again.safetensors", init=theta0, progress=False)
    assert _same(ft_run[0], again)


def test_resume_after_kill_gives_same_weights(ft_run, task, theta0, tmp_path):
    out = tmp_path / "killed.safetensors"

    def kill(epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(NANO, task, TINY, out, init=theta0, progress=False, on_epoch=kill)
    assert state_path(out).is_file() and not out.exists()
    resumed = finetune(NANO, task, TINY, out, init=theta0, progress=False)
    assert _same(ft_run[0], resumed)
    log = json.loads(log_path_for(out).read_text())
    ref = json.loads(log_path_for(ft_run[1]).read_text())
    assert [e["train_loss"] for e in log["epochs"]] == [e["train_loss"] for e in ref["epochs"]]


def test_resume_refuses_other_config(task, theta0, tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(KeyboardInterrupt):
        finetune(NANO, task, TINY, out, init=theta0, progress=False,
                 on_epoch=lambda e: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(QvecError, match="resume state of a different run"):
        finetune(NANO, task, TINY.override(lr=1e-3), out, init=theta0, progress=False)


def test_qat_differs_from_ft_only_by_fake_quantization(ft_run, task, theta0, tmp_path, monkeypatch):
    """With the quantizer replaced by the identity, QAT must reproduce FT bit for bit."""
    import qvec.quant.qat

    real = finetune(NANO, task, TINY, tmp_path / "qat.safetensors", init=theta0, qat=Q3, progress=False)
    monkeypatch.setattr(qvec.quant.qat, "fake_quantize_", lambda w, spec: w)
    ident = finetune(NANO, task, TINY, tmp_path / "ident.safetensors", init=theta0, qat=Q3, progress=False)
    assert _same(ft_run[0], ident)
    assert not _same(ft_run[0], real)
    assert real.state.keys() == ft_run[0].state.keys()  # plain latent weights under the FT keys
    assert real.meta[META_KIND] == "qat" and QuantSpec.from_dict(json.loads(real.meta[META_QUANT])) == Q3
    assert real.meta[META_FINGERPRINT] == ft_run[0].meta[META_FINGERPRINT]
    ft_log = json.loads(log_path_for(ft_run[1]).read_text())
    qat_log = json.loads(log_path_for(tmp_path / "qat.safetensors").read_text())
    assert [e["data_digest"] for e in ft_log["epochs"]] == [e["data_digest"] for e in qat_log["epochs"]]
    assert all("val_acc_ptq" in e for e in qat_log["epochs"])


def test_lr_schedule():
    r = Recipe(lr=1.0, warmup_steps=10, epochs=1)
    assert lr_at(0, 100, r) == pytest.approx(0.1) and lr_at(9, 100, r) == pytest.approx(1.0)
    assert lr_at(99, 100, r) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(10, 100, r) > lr_at(50, 100, r) > lr_at(90, 100, r)


def test_recipe_defaults_and_errors():
    assert Recipe.for_task("GTSRB").epochs == 11 and Recipe.for_task("GTSRB").lr == 1e-5
    mini = ModelSpec("qvec", "vit-mini", 10)
    assert Recipe.for_task("mnist", mini) == QUALITY_FINETUNE == Recipe.for_task("mnist", mini, "quality")
    assert Recipe.for_task("mnist", mini, "fast") == SMALL_FINETUNE
    assert Recipe.for_pretraining(mini) == QUALITY_PRETRAIN and Recipe.for_pretraining(mini, "fast") == SMALL_PRETRAIN
    assert Recipe.for_task("unknown").epochs == 1
    r = Recipe(epochs=3, min_examples=27_000)
    assert r.epochs_for(9000) == 3 and r.epochs_for(864) == 31 and r.epochs_for(100_000) == 3
    assert SMALL_FINETUNE.min_examples and SMALL_FINETUNE.epochs_for(10) > SMALL_FINETUNE.epochs
    assert Recipe(epochs=3).epochs_for(10) == 3
    with pytest.raises(QvecError, match="unknown recipe profile 'best'; known: quality, fast"):
        Recipe.for_task("mnist", mini, "best")
    timm = ModelSpec.parse("timm:vit_base_patch16_224")
    for call in (lambda: Recipe.for_task("GTSRB", timm, "fast"), lambda: Recipe.for_pretraining(timm, "fast")):
        with pytest.raises(QvecError, match="built-in ViTs; model timm:vit_base_patch16_224 uses the paper"):
            call()
    with pytest.raises(QvecError, match="batch_size must be a multiple of grad_accum"):
        Recipe(batch_size=10, grad_accum=3)
    with pytest.raises(QvecError, match="unknown recipe field 'lrr'"):
        Recipe().override(lrr=1.0)


def test_profiles_share_the_schedule_and_differ_in_length_and_augmentation():
    """FT and QAT recipes of both profiles share lr, batch, warm-up and seed (so the fast results and the quality
    results differ only by what docs/training.md measured): quality adds crops (never flips: digits and signs are
    not mirror-symmetric) and 8 epochs' worth of a 9k-image task instead of 3."""
    assert (QUALITY_FINETUNE.lr, QUALITY_FINETUNE.batch_size, QUALITY_FINETUNE.seed) == (1e-3, 32, 2038)
    assert QUALITY_FINETUNE.override(augment=False, min_examples=27_000) == SMALL_FINETUNE
    assert QUALITY_FINETUNE.augment and not QUALITY_FINETUNE.hflip
    assert (QUALITY_FINETUNE.epochs_for(9000), SMALL_FINETUNE.epochs_for(9000)) == (8, 3)
    assert QUALITY_PRETRAIN.epochs_for(36_000) == 60 and QUALITY_PRETRAIN.hflip


def test_init_of_another_architecture(task, tmp_path, theta0):
    with pytest.raises(QvecError) as e:
        finetune(ModelSpec("qvec", "vit-mini", 0), task, TINY, tmp_path / "m.safetensors", init=theta0,
                 progress=False)
    assert "\n" not in str(e.value) and str(theta0) in str(e.value)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_finetune_eval_and_errors(data, theta0, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    rc = main(["finetune", "--model", "vit-nano", "--task", "stripes", "--data", str(data), "--init", str(theta0),
               "--epochs", "1", "--train-limit", "64", "--batch-size", "32", "--lr", "1e-3", "--quiet",
               "-o", str(out)])
    assert rc == 0 and out.is_file()
    assert Recipe.from_json(Checkpoint.load(out).meta["qvec.recipe"]).augment  # the default profile is quality
    fast = tmp_path / "fast.safetensors"
    assert main(["finetune", "--model", "vit-nano", "--task", "stripes", "--data", str(data), "--init", str(theta0),
                 "--profile", "fast", "--epochs", "1", "--train-limit", "32", "--quiet", "-o", str(fast)]) == 0
    assert Recipe.from_json(Checkpoint.load(fast).meta["qvec.recipe"]) == replace(
        SMALL_FINETUNE, epochs=1, train_limit=32, min_examples=None)
    assert main(["eval", "--model", str(out), "--task", "stripes", "--data", str(data), "--bits", "3"]) == 0
    assert "Top-1" in capsys.readouterr().out
    assert main(["tasks", "--data", str(data)]) == 0
    assert "stripes" in capsys.readouterr().out

    write_task(data, "four43", y_train=None)  # a task file without y_train
    write_task(data, "bad_labels", y_test=torch.full((80,), 9).numpy())
    cases = [
        (["eval", "--model", str(out), "--task", "nosuch", "--data", str(data)], "no task 'nosuch'"),
        (["finetune", "--model", "vit-huge32", "--task", "stripes", "--data", str(data), "-o", str(out)],
         "unknown model 'vit-huge32'"),
        (["eval", "--model", str(out), "--task", "four43", "--data", str(data)], "missing array 'y_train'"),
        (["eval", "--model", str(out), "--task", "bad_labels", "--data", str(data)], "label 9 is out of range"),
        (["eval", "--model", str(theta0), "--task", "stripes", "--data", str(tmp_path / "none")],
         "data folder does not exist"),
        (["eval", "--model", str(tmp_path / "missing.safetensors"), "--task", "stripes", "--data", str(data)],
         "no such file"),
        (["finetune", "--model", "vit-nano", "--task", "stripes", "--data", str(data), "--profile", "best",
          "-o", str(out)], "unknown recipe profile 'best'; known: quality, fast"),
        (["pretrain", "--data-file", str(data / "stripes.npz"), "--profile", "slow", "-o", str(out)],
         "unknown recipe profile 'slow'"),
        (["finetune", "--model", "vit-nano", "--task", "stripes", "--data", str(data), "--profile", "fast",
          "--recipe", str(tmp_path / "r.json"), "-o", str(out)], "give --recipe or --profile, not both"),
        (["finetune", "--model", "vit-nano", "--task", "stripes", "--data", str(data), "--device", "gpu0",
          "-o", str(out)], "unknown device 'gpu0'"),
    ]
    for argv, msg in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.strip().count("\n") == 0, (argv, err)


def test_cli_head_mismatch(data, ft_run, capsys):
    import numpy as np

    from .tinytask import stripes

    x, y = stripes(40, 5)
    np.savez(data / "six.npz", x_train=x, y_train=y, x_test=x, y_test=y, classes=np.array(list("abcdef")))
    assert main(["eval", "--model", str(ft_run[1]), "--task", "six", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "head has 4 classes but task 'six' has 6" in err


def test_cli_qat_on_the_deploy_quantizers_trainable_grid(data, theta0, tmp_path, capsys):
    """``qvec finetune --qat`` trains on the grid of the quantizer to deploy: HQQ in groups of 32 trains on
    asymmetric RTN groups of 32 (its trainable grid), recorded in the header; a preset whose groups do not divide
    the rows is one line."""
    out = tmp_path / "qat.safetensors"
    common = ["finetune", "--model", "vit-nano", "--task", "stripes", "--data", str(data), "--init", str(theta0),
              "--epochs", "1", "--train-limit", "32", "--batch-size", "32", "--quiet", "--qat"]
    assert main([*common, "--method", "hqq", "--asymmetric", "--bits", "2", "-g", "group", "--group-size", "32",
                 "-o", str(out)]) == 0
    quant = json.loads(Checkpoint.load(out).meta["qvec.quant"])
    assert (quant["bits"], quant["symmetric"], quant["granularity"], quant["group_size"]) == (2, False, "group", 32)
    capsys.readouterr()
    assert main([*common, "--preset", "g64", "-o", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "group_size 64 does not divide" in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "bad.safetensors").exists()

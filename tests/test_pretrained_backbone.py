"""Real pretrained timm backbones from a weights file: loaded at any input size through timm's checkpoint filter
(position embedding resampled, a new head), then the whole FT -> QAT -> vector -> patch -> PTQ path on the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from qvec.cli import main
from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.grid.config import load_config
from qvec.grid.plan import build_plan
from qvec.models import ModelSpec, build_model, get_adapter

from .tinytask import write_task

pytestmark = pytest.mark.usefixtures("one_thread_module")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: A tiny patch-14 timm ViT of DINOv2's layout (layer scale, 14-px patches), saved the way timm files are: no head.
TINY = "timm:vit_small_patch14_dinov2"
TINY_OPTIONS = dict(embed_dim=48, depth=2, num_heads=2)


def _tiny_backbone_file(path: Path, img_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(ModelSpec.parse(TINY, 0, img_size=img_size, **TINY_OPTIONS))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def _opts(**extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY_OPTIONS, **extra}.items()]


def test_weights_saved_at_one_size_load_at_another(tmp_path):
    """The 518-px-style file loads at 28 and 56 px: pos_embed resampled bicubically as timm does, the rest equal,
    a fresh head for the task; the data config follows the built size with timm's ImageNet mean/std."""
    src = tmp_path / "backbone.safetensors"
    state = _tiny_backbone_file(src, img_size=70)
    assert "head.weight" not in state
    for size in (28, 56):
        spec = ModelSpec.parse(TINY, 7, img_size=size, **TINY_OPTIONS)
        model = build_model(spec, weights=str(src))
        got = model.state_dict()
        grid = size // 14
        assert got["pos_embed"].shape == (1, grid * grid + 1, 48)
        want = resample_abs_pos_embed(state["pos_embed"], (grid, grid), num_prefix_tokens=1)
        torch.testing.assert_close(got["pos_embed"], want)
        for k, v in state.items():
            if k != "pos_embed":
                assert torch.equal(got[k], v), k
        assert got["head.weight"].shape == (7, 48)
        cfg = get_adapter(spec).data_config(spec, model)
        assert cfg.image_size == size and cfg.interpolation == "bicubic"
        assert cfg.mean == pytest.approx((0.485, 0.456, 0.406))
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    _tiny_backbone_file(good, img_size=28)
    other = tmp_path / "other.safetensors"  # another architecture: 32-wide, patch 16
    other_model = build_model(ModelSpec.parse("timm:vit_tiny_patch16_224", 0, embed_dim=32, depth=2, num_heads=2))
    save_file({k: v.contiguous() for k, v in other_model.state_dict().items()}, str(other))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"good": good, "other": other, "truncated": truncated, "missing": tmp_path / "missing.safetensors"}


def test_bad_weight_files_are_one_line_errors(tmp_path):
    files = _bad_files(tmp_path)
    cases = [
        ("other", 28, f"{files['other']}: key 'cls_token' has shape (1, 1, 32), the model expects (1, 1, 48)"),
        ("truncated", 28, f"{files['truncated']}: not a readable safetensors file"),
        ("good", 30, "input size 30 px is not a multiple of the patch size 14 (try 28 or 42)"),
        ("missing", 28, f"{files['missing']}: weights file not found"),
    ]
    for which, size, message in cases:
        with pytest.raises(QvecError) as e:
            build_model(ModelSpec.parse(TINY, 4, img_size=size, **TINY_OPTIONS), weights=str(files[which]))
        assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_weights_exit_2_without_output(tmp_path):
    """Through the real entry point, with the real DINOv2-S architecture: exit 2, one line, no output file."""
    data = tmp_path / "data"
    write_task(data, n_train=40, n_test=16)
    files = _bad_files(tmp_path)
    cases = [
        ("other", "28", f"{files['other']}: key 'cls_token' has shape (1, 1, 32), the model expects (1, 1, 384)"),
        ("truncated", "28", f"{files['truncated']}: not a readable safetensors file"),
        ("good", "100", "input size 100 px is not a multiple of the patch size 14 (try 98 or 112)"),
    ]
    for which, size, message in cases:
        out = tmp_path / "ft.safetensors"
        r = subprocess.run([sys.executable, "-m", "qvec", "finetune", "-m", TINY, "-t", "stripes", "-d",
                            str(data), "--epochs", "1", "-q", "--weights", str(files[which]), "--img-size", size,
                            "-o", str(out)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], r.stderr
        assert not out.exists() and not list(tmp_path.glob(".ft*"))


def test_tiny_timm_vit_from_a_weights_file(tmp_path):
    """FT -> QAT -> extract -> patch -> quantize -> eval from a headerless timm file made at 42 px, used at 28 px:
    training through the library (the tiny architecture's options), the rest through the CLI."""
    from qvec.data.tasks import get_task
    from qvec.quant import QuantSpec
    from qvec.train.recipe import Recipe
    from qvec.train.trainer import finetune

    data = tmp_path / "data"
    write_task(data, "stripes", n_train=64, n_test=24)
    write_task(data, "stripes2", n_train=64, n_test=24)
    weights = tmp_path / "backbone.safetensors"
    _tiny_backbone_file(weights, img_size=42)
    spec = ModelSpec.parse(TINY, 0, img_size=28, **TINY_OPTIONS)
    recipe = Recipe(lr=1e-3, warmup_steps=1, batch_size=16, epochs=1)
    runs = {"ft": ("stripes", None), "qat": ("stripes", QuantSpec(bits=3)), "recv": ("stripes2", None)}
    for name, (task, qat) in runs.items():
        finetune(spec, get_task(task, data), recipe, tmp_path / f"{name}.safetensors", init=weights, qat=qat,
                 progress=False)
    ft = Checkpoint.load(tmp_path / "ft.safetensors")
    assert ft.model_spec.options["img_size"] == 28 and ft.state["pos_embed"].shape == (1, 5, 48)
    vec, patched, w3 = (tmp_path / n for n in ("vec.safetensors", "patched.safetensors", "w3.safetensors"))
    assert main(["extract", "--ft", str(tmp_path / "ft.safetensors"), "--qat", str(tmp_path / "qat.safetensors"),
                 "-o", str(vec)]) == 0
    assert main(["patch", "--receiver", str(tmp_path / "recv.safetensors"), "--vector", str(vec), "--lam", "1",
                 "-o", str(patched)]) == 0
    assert main(["quantize", str(patched), "--bits", "3", "-o", str(w3)]) == 0
    assert main(["eval", "-m", str(w3), "-t", "stripes2", "-d", str(data)]) == 0
    q = Checkpoint.load(w3)
    assert q.fingerprint == ft.fingerprint  # all three trace back to the same weights file
    assert max(len(torch.unique(r)) for r in q.state["blocks.0.mlp.fc1.weight"]) <= 8


@pytest.mark.parametrize("name", ["dinov2-s.toml", "dinov2-s-gpu.toml"])
def test_dinov2_configs_load_and_plan(name, tmp_path, monkeypatch):
    """The shipped DINOv2 studies validate and plan (weights file and data from ../shared when present)."""
    shared = Path(__file__).resolve().parents[2] / "shared"
    weights = shared / "models" / "vit_small_patch14_dinov2.safetensors"
    if not weights.is_file():
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(b"")  # validation only checks that the file exists
    data = tmp_path / "data"
    for t in ("mnist", "fashion_mnist", "cifar10", "gtsrb", "fer2013", "dtd10", "sign_digits"):
        write_task(data, t, n_train=20, n_test=8)
    np.savez(data / "pretrain_cifar10.npz", x=np.zeros((4, 32, 32, 3), np.uint8))  # the rules' generic probe
    cfg = load_config(CONFIGS / name, {"data_dir": str(data), "backbone": str(weights)})
    assert cfg.model_spec().name == "vit_small_patch14_dinov2" and cfg.profile == "small-task"
    assert len(cfg.tasks) >= 5 and {2, 3} <= set(cfg.bits)
    plan = build_plan(cfg, tmp_path / "art")
    kinds = {j.kind for j in plan.jobs}
    assert {"finetune", "vector", "cells", "baseline"} <= kinds and "pretrain" not in kinds

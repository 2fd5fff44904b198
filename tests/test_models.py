"""Model adapters: specs, the timm and built-in families, targets, backbone keys, weight loading, offline errors."""

from __future__ import annotations

import pytest
import torch

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.models import ModelSpec, build_model, get_adapter, load_model, with_model
from qvec.quant.ptq import target_keys


def test_spec_parse_and_json_roundtrip():
    assert ModelSpec.parse("vit-mini").family == "qvec"
    assert ModelSpec.parse("vit_tiny_patch16_224").family == "timm"
    s = ModelSpec.parse("timm:vit_small_patch16_224", num_classes=7, img_size=64)
    assert ModelSpec.from_json(s.to_json()) == s and str(s) == "timm:vit_small_patch16_224"
    with pytest.raises(QvecError, match="unknown model family 'foo'; known: .*qvec.*timm"):
        ModelSpec.parse("foo:bar")
    with pytest.raises(QvecError, match="malformed model spec"):
        ModelSpec.from_json("{not json")


def test_timm_vit_targets_are_the_48_block_linears():
    spec = ModelSpec("timm", "vit_tiny_patch16_224", 10)  # ViT-B/16 layout at tiny width: 12 blocks
    keys = target_keys(spec)
    assert len(keys) == 48
    assert {k.split(".")[-2] for k in keys} == {"qkv", "proj", "fc1", "fc2"}
    assert not any(k.startswith("head") or "patch_embed" in k for k in keys)
    model = build_model(spec)
    backbone = get_adapter(spec).backbone_keys(model.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= set(backbone)
    assert not any(k.startswith("head") for k in backbone)


def test_builtin_small_vits_build_and_run():
    for name in ("vit-nano", "vit-mini"):
        spec = ModelSpec("qvec", name, 7)
        model = build_model(spec).eval()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        assert get_adapter(spec).data_config(spec).image_size == 32
    with pytest.raises(QvecError, match="unknown built-in model 'vit-huge'; known: vit-nano"):
        build_model(ModelSpec("qvec", "vit-huge", 10))


def test_unknown_timm_model():
    with pytest.raises(QvecError, match="unknown timm model 'vit_nonexistent'"):
        build_model(ModelSpec("timm", "vit_nonexistent", 10))


def test_local_weights_file_loads_backbone_and_drops_foreign_head(tmp_path):
    src_spec = ModelSpec("timm", "vit_tiny_patch16_224", 1000)
    torch.manual_seed(0)
    src = build_model(src_spec)
    torch.save(src.state_dict(), tmp_path / "pretrained.pth")
    model = build_model(ModelSpec("timm", "vit_tiny_patch16_224", 10), weights=str(tmp_path / "pretrained.pth"))
    assert torch.equal(model.pos_embed, src.pos_embed)
    assert model.head.weight.shape == (10, 192)
    with pytest.raises(QvecError, match="weights file not found"):
        build_model(ModelSpec("timm", "vit_tiny_patch16_224", 10), weights=str(tmp_path / "missing.pth"))
    bad = {k: v for k, v in src.state_dict().items() if k != "blocks.3.norm1.weight"}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(QvecError, match="missing key 'blocks.3.norm1.weight'"):
        build_model(ModelSpec("timm", "vit_tiny_patch16_224", 10), weights=str(tmp_path / "bad.pth"))


def test_pretrained_offline_gives_one_line_instruction(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # the env var is read once, at import
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(QvecError) as e:
        build_model(ModelSpec("timm", "vit_tiny_patch16_224.augreg_in21k", 10), pretrained=True)
    msg = str(e.value)
    assert "could not load pretrained weights for timm:vit_tiny_patch16_224.augreg_in21k" in msg
    assert "--weights" in msg and "\n" not in msg


def test_builtin_has_no_hub_weights():
    with pytest.raises(QvecError, match="has no hub weights"):
        build_model(ModelSpec("qvec", "vit-nano", 10), pretrained=True)


def test_load_model_strict_errors(nano_spec):
    torch.manual_seed(0)
    model = build_model(nano_spec)
    state = dict(model.state_dict())
    state["head.weight"] = torch.zeros(3, 96)
    ckpt = with_model(Checkpoint(state), "qvec:vit-nano")
    assert ckpt.model_spec.num_classes == 3  # read off the head
    state["head.weight"] = torch.zeros(10, 96)
    ckpt = Checkpoint(state, {"qvec.model": nano_spec.to_json()})
    ckpt.state["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    with pytest.raises(
        QvecError, match=r"'blocks.0.attn.qkv.weight' has shape \(5, 5\), the model expects \(288, 96\)"
    ):
        load_model(ckpt)


def test_finetune_from_local_hub_weights_file(tmp_path):
    """Offline users pass the family's pretrained file with --weights; its backbone is what training starts from."""
    from qvec.cli import main
    from qvec.train.evaluate import resolve_device

    from .conftest import shared_data_dir

    data = shared_data_dir()
    if data is None:
        pytest.skip("the shared task suite (../shared/data or $QVEC_DATA) is absent")
    torch.manual_seed(0)
    src = build_model(ModelSpec("timm", "vit_tiny_patch16_224", 1000))
    torch.save(src.state_dict(), tmp_path / "hub.pth")
    out = tmp_path / "ft.safetensors"
    args = ["finetune", "--model", "timm:vit_tiny_patch16_224", "--weights", str(tmp_path / "hub.pth"), "--task",
            "sign_digits", "--data", str(data), "-o", str(out), "--epochs", "1", "--train-limit", "16",
            "--batch-size", "16", "--lr", "1e-12", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    ft = Checkpoint.load(out)
    torch.testing.assert_close(ft.state["pos_embed"], src.state_dict()["pos_embed"], atol=1e-6, rtol=0)
    assert ft.state["head.weight"].shape == (10, 192)
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(QvecError, match="no CUDA GPU") if not torch.cuda.is_available() else _nothing():
        resolve_device("cuda")


def _nothing():
    import contextlib

    return contextlib.nullcontext()

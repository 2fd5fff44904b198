"""Quantization vectors: extraction, arithmetic, patching, I/O, analysis, and strictness on bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.models import ModelSpec
from qvec.vectors.vector import QuantVector

from .conftest import make_ckpt


def test_extract_is_backbone_difference(ckpts):
    ft, qat = Checkpoint.load(ckpts["ft"]), Checkpoint.load(ckpts["qat"])
    v = QuantVector.from_checkpoints(ft, qat)
    assert not any(k.startswith("head") for k in v.tensors)
    assert "cls_token" in v.tensors and "pos_embed" in v.tensors and "patch_embed.proj.weight" in v.tensors
    assert "norm.weight" in v.tensors and "blocks.0.attn.qkv.bias" in v.tensors
    for k, t in v.tensors.items():
        torch.testing.assert_close(t, qat.state[k] - ft.state[k])
    assert set(v.tensors) == {k for k in ft.state if not k.startswith("head")}


def test_self_patch_equals_qat(ckpts):
    ft, qat = Checkpoint.load(ckpts["ft"]), Checkpoint.load(ckpts["qat"])
    patched = QuantVector.from_checkpoints(ft, qat).apply(ft, 1.0)
    for k in ft.state:
        if k.startswith("head"):
            assert torch.equal(patched.state[k], ft.state[k])
        else:
            torch.testing.assert_close(patched.state[k], qat.state[k], atol=1e-6, rtol=0)


def test_receiver_keeps_its_head_and_lambda_scales(ckpts):
    v = QuantVector.from_checkpoints(Checkpoint.load(ckpts["ft"]), Checkpoint.load(ckpts["qat"]))
    recv = Checkpoint.load(ckpts["recv"])
    p = v.apply(recv, 0.5)
    assert torch.equal(p.state["head.weight"], recv.state["head.weight"])
    torch.testing.assert_close(p.state["pos_embed"], recv.state["pos_embed"] + 0.5 * v.tensors["pos_embed"])
    assert p.meta["qvec.kind"] == "patched" and p.meta["qvec.task"] == "receiver"
    p0 = v.apply(recv, 0.0)
    assert all(torch.equal(p0.state[k], recv.state[k]) for k in recv.state)


def test_arithmetic(ckpts):
    v = QuantVector.from_checkpoints(Checkpoint.load(ckpts["ft"]), Checkpoint.load(ckpts["qat"]))
    k = "blocks.0.mlp.fc1.weight"
    torch.testing.assert_close((v + v).tensors[k], 2 * v.tensors[k])
    torch.testing.assert_close((v - v).tensors[k], torch.zeros_like(v.tensors[k]))
    torch.testing.assert_close((-v).tensors[k], -v.tensors[k])
    torch.testing.assert_close((3 * v).tensors[k], (v * 3).tensors[k])
    torch.testing.assert_close((v / 2).tensors[k], 0.5 * v.tensors[k])
    torch.testing.assert_close(sum([v, v, v]).tensors[k], 3 * v.tensors[k])
    m = QuantVector.mean([v, 3 * v])
    torch.testing.assert_close(m.tensors[k], 2 * v.tensors[k])
    assert m.meta["qvec.donor"].startswith("mean(")
    assert math.isclose((2 * v).norm(), 2 * v.norm(), rel_tol=1e-9)
    assert math.isclose(v.cosine(2 * v), 1.0, rel_tol=1e-9) and math.isclose(v.cosine(-v), -1.0, rel_tol=1e-9)
    assert all(math.isclose(c, 1.0, rel_tol=1e-6) for c in v.cosine_per_tensor(v).values() if c)
    assert set(v.norms()) == set(v.tensors)
    with pytest.raises(QvecError, match="mean of zero vectors"):
        QuantVector.mean([])


def test_combining_vectors_of_different_quantizers_says_so(ckpts):
    v = QuantVector.from_checkpoints(Checkpoint.load(ckpts["ft"]), Checkpoint.load(ckpts["qat"]))
    assert (v + v).meta["qvec.quant"] == v.meta["qvec.quant"]
    other = QuantVector(v.tensors, {**v.meta, "qvec.quant": json.dumps({"bits": 2})})
    mixed = json.loads((v + other).meta["qvec.quant"])["mixed"]
    assert mixed == [v.meta["qvec.quant"], json.dumps({"bits": 2})]


def test_save_load_roundtrip_with_metadata(ckpts, tmp_path):
    v = QuantVector.from_checkpoints(Checkpoint.load(ckpts["ft"]), Checkpoint.load(ckpts["qat"]))
    path = v.save(tmp_path / "v.safetensors")
    w = QuantVector.load(path)
    assert w.meta["qvec.donor"] == "donor" and w.meta["qvec.backbone_fingerprint"] == "abc123"
    assert w.meta["qvec.num_params"] == str(v.num_params) and "qvec.version" in w.meta
    assert ModelSpec.from_json(w.meta["qvec.model"]).name == "vit-nano"
    assert all(torch.equal(w.tensors[k], v.tensors[k]) for k in v.tensors)
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------- strictness


def test_mismatched_architecture(nano_spec):
    ft = make_ckpt(nano_spec, 0)
    other = make_ckpt(ModelSpec("qvec", "vit-mini", 10), 0)
    with pytest.raises(QvecError, match="architectures differ"):
        QuantVector.from_checkpoints(ft, other)


def test_missing_extra_shape_dtype_keys(nano_spec):
    ft = make_ckpt(nano_spec, 0)
    qat = make_ckpt(nano_spec, 0)
    del qat.state["blocks.1.norm1.weight"]
    with pytest.raises(QvecError, match="'blocks.1.norm1.weight' is missing from the QAT checkpoint"):
        QuantVector.from_checkpoints(ft, qat)
    qat = make_ckpt(nano_spec, 0)
    qat.state["extra.weight"] = torch.zeros(2)
    with pytest.raises(QvecError, match="'extra.weight' is in the QAT checkpoint"):
        QuantVector.from_checkpoints(ft, qat)
    qat = make_ckpt(nano_spec, 0)
    qat.state["pos_embed"] = torch.zeros(1, 3, 96)
    with pytest.raises(QvecError, match=r"'pos_embed': shape \(1, 65, 96\) in .* but \(1, 3, 96\)"):
        QuantVector.from_checkpoints(ft, qat)
    qat = make_ckpt(nano_spec, 0)
    qat.state["pos_embed"] = qat.state["pos_embed"].half()
    with pytest.raises(QvecError, match="dtype torch.float32 .* but torch.float16"):
        QuantVector.from_checkpoints(ft, qat)


def test_nan_inf_rejected(nano_spec):
    ft, qat = make_ckpt(nano_spec, 0), make_ckpt(nano_spec, 0)
    qat.state["cls_token"][0, 0, 0] = float("nan")
    with pytest.raises(QvecError, match="'cls_token' contains NaN"):
        QuantVector.from_checkpoints(ft, qat)
    qat.state["cls_token"][0, 0, 0] = float("inf")
    with pytest.raises(QvecError, match="contains Inf"):
        QuantVector.from_checkpoints(ft, qat)
    v = QuantVector.from_checkpoints(ft, make_ckpt(nano_spec, 1))
    recv = make_ckpt(nano_spec, 2)
    recv.state["norm.bias"][0] = float("nan")
    with pytest.raises(QvecError, match="'norm.bias' contains NaN"):
        v.apply(recv)
    with pytest.raises(QvecError, match="lambda must be finite"):
        v.apply(make_ckpt(nano_spec, 2), float("inf"))


def test_apply_to_other_architecture_or_shape(nano_spec):
    v = QuantVector.from_checkpoints(make_ckpt(nano_spec, 0), make_ckpt(nano_spec, 1))
    with pytest.raises(QvecError, match="vit-mini, but the vector was made for qvec:vit-nano"):
        v.apply(make_ckpt(ModelSpec("qvec", "vit-mini", 10), 0))
    recv = make_ckpt(nano_spec, 2)
    del recv.meta["qvec.model"]
    recv.state["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(QvecError, match="'blocks.0.mlp.fc1.weight': shape \\(3, 3\\)"):
        v.apply(recv)


def test_fingerprint_mismatch_and_override(nano_spec):
    ft = make_ckpt(nano_spec, 0, **{"qvec.backbone_fingerprint": "aaaa"})
    qat = make_ckpt(nano_spec, 1, **{"qvec.backbone_fingerprint": "aaaa"})
    v = QuantVector.from_checkpoints(ft, qat)
    recv = make_ckpt(nano_spec, 2, **{"qvec.backbone_fingerprint": "bbbb"})
    with pytest.raises(QvecError, match="fingerprint bbbb differs from the vector's aaaa"):
        v.apply(recv)
    v.apply(recv, allow_fingerprint_mismatch=True)
    qat_other = make_ckpt(nano_spec, 1, **{"qvec.backbone_fingerprint": "cccc"})
    with pytest.raises(QvecError, match="fingerprint"):
        QuantVector.from_checkpoints(ft, qat_other)


def test_corrupt_and_wrong_files(ckpts, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(ckpts["ft"].read_bytes()[:500])
    with pytest.raises(QvecError, match="not a readable safetensors file"):
        QuantVector.load(bad)
    with pytest.raises(QvecError, match="not a qvec quantization vector"):
        QuantVector.load(ckpts["ft"])
    with pytest.raises(QvecError, match="no such file"):
        QuantVector.load(tmp_path / "missing.safetensors")
    trunc = tmp_path / "trunc.safetensors"
    data = ckpts["ft"].read_bytes()
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(QvecError, match="not a readable safetensors file"):
        Checkpoint.load(trunc)


def test_integer_buffers_are_skipped(nano_spec):
    ft, qat = make_ckpt(nano_spec, 0), make_ckpt(nano_spec, 1)
    for c in (ft, qat):
        c.state["blocks.0.counter"] = torch.tensor([3], dtype=torch.int64)
    v = QuantVector.from_checkpoints(ft, qat)
    assert "blocks.0.counter" not in v.tensors


def test_fingerprint_is_stable_and_content_sensitive():
    from qvec.core.checkpoint import fingerprint_tensors

    state = {"a": torch.tensor(3.0), "b": torch.randn(3, 4).bfloat16(), "c": torch.randn(2, 3)[:, :2]}
    fp = fingerprint_tensors(state, ["c", "a", "b"])
    assert fp == fingerprint_tensors(dict(state), ["a", "b", "c"]) and len(fp) == 16
    state["a"] = torch.tensor(3.5)
    assert fingerprint_tensors(state, ["a", "b", "c"]) != fp


def test_coverage_quantized_holds_only_the_ptq_targets(ckpts, tmp_path, capsys):
    """``coverage="quantized"``: the vector covers the weights PTQ quantizes, nothing else; it is recorded in the
    header, patching leaves every other tensor of the receiver as it was, and a bad value is one line."""
    from qvec.core.schema import META_COVERAGE
    from qvec.quant.ptq import target_keys

    from .cli_helpers import one_line_error, run

    ft, qat = Checkpoint.load(ckpts["ft"]), Checkpoint.load(ckpts["qat"])
    full = QuantVector.from_checkpoints(ft, qat)
    part = QuantVector.from_checkpoints(ft, qat, coverage="quantized")
    targets = set(target_keys(ft.model_spec))
    assert set(part.tensors) == targets and targets < set(full.tensors)
    assert all(torch.equal(part.tensors[k], full.tensors[k]) for k in targets)
    assert part.meta[META_COVERAGE] == "quantized" and full.meta[META_COVERAGE] == "all"
    recv = Checkpoint.load(ckpts["recv"])
    patched = part.apply(recv, 0.7)
    for k, t in recv.state.items():
        if k in targets:
            torch.testing.assert_close(patched.state[k], t + 0.7 * part.tensors[k])
        else:
            assert torch.equal(patched.state[k], t), k
    part.save(tmp_path / "p.safetensors")
    assert QuantVector.load(tmp_path / "p.safetensors").coverage == "quantized"
    with pytest.raises(QvecError, match="coverage must be one of all, quantized, got 'some'"):
        QuantVector.from_checkpoints(ft, qat, coverage="some")
    out = tmp_path / "cli.safetensors"
    assert run(capsys, "extract", "--ft", ckpts["ft"], "--qat", ckpts["qat"], "--coverage", "quantized",
               "-o", out)[0] == 0
    assert QuantVector.load(out).coverage == "quantized"
    one_line_error(capsys, "coverage must be one of all, quantized, got 'some'", "extract", "--ft", ckpts["ft"],
                   "--qat", ckpts["qat"], "--coverage", "some", "-o", tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()

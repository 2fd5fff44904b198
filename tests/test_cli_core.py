"""The core CLI end to end: extract -> patch -> quantize -> pack -> unpack -> inspect, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qvec.cli import main
from qvec.core.checkpoint import Checkpoint
from qvec.quant.pack import load_packed
from qvec.vectors.vector import QuantVector


def run(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_full_flow(ckpts, tmp_path, capsys):
    v, p, q, pk, up = (tmp_path / f"{n}.safetensors" for n in ("v", "p", "q", "pk", "up"))
    assert run(capsys, "extract", "--ft", ckpts["ft"], "--qat", ckpts["qat"], "-o", v)[0] == 0
    assert run(capsys, "patch", "-r", ckpts["recv"], "-v", v, "--lam", "0.75", "-o", p)[0] == 0
    code, text = run(capsys, "quantize", p, "--bits", "3", "-o", q)
    assert code == 0 and "w3-sym-channel" in text
    code, text = run(capsys, "pack", p, "--bits", "3", "-o", pk)
    assert code == 0 and "fp32" in text and "fp16" in text
    assert run(capsys, "unpack", pk, "-o", up)[0] == 0
    vec = QuantVector.load(v)
    patched = Checkpoint.load(p)
    recv = Checkpoint.load(ckpts["recv"])
    torch.testing.assert_close(patched.state["pos_embed"], recv.state["pos_embed"] + 0.75 * vec.tensors["pos_embed"])
    assert json.loads(patched.meta["qvec.patch"])["lambda"] == 0.75
    quantized, unpacked = Checkpoint.load(q), Checkpoint.load(up)
    k = "blocks.0.mlp.fc1.weight"
    assert len(torch.unique(quantized.state[k][0])) <= 8
    torch.testing.assert_close(unpacked.state[k], quantized.state[k], atol=1e-3, rtol=0)
    assert set(load_packed(pk).state) == set(recv.state)
    code, text = run(capsys, "inspect", v, "--limit", "2")
    assert code == 0 and "vector" in text and "qvec.donor" in text and "more" in text
    code, text = run(capsys, "inspect", pk, "--json")
    assert code == 0 and json.loads(text)["kind"] == "packed"


def test_patch_with_several_vectors_averages(ckpts, tmp_path, capsys):
    v = tmp_path / "v.safetensors"
    run(capsys, "extract", "--ft", ckpts["ft"], "--qat", ckpts["qat"], "-o", v)
    p1, p2 = tmp_path / "p1.safetensors", tmp_path / "p2.safetensors"
    assert run(capsys, "patch", "-r", ckpts["recv"], "-v", v, "-v", v, "-o", p1)[0] == 0
    run(capsys, "patch", "-r", ckpts["recv"], "-v", v, "-o", p2)
    a, b = Checkpoint.load(p1), Checkpoint.load(p2)
    assert all(torch.allclose(a.state[k], b.state[k]) for k in a.state)


def test_plain_pytorch_state_dict_needs_and_takes_model(ckpts, tmp_path, capsys):
    pt = tmp_path / "plain.pt"
    torch.save(Checkpoint.load(ckpts["recv"]).state, pt)
    code, text = run(capsys, "quantize", pt, "-o", tmp_path / "q.safetensors")
    assert code == 2 and "pass --model" in text and "Traceback" not in text
    code, _ = run(capsys, "quantize", pt, "--model", "qvec:vit-nano", "-o", tmp_path / "q.safetensors")
    assert code == 0
    assert Checkpoint.load(tmp_path / "q.safetensors").model_spec.num_classes == 10


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize", "{recv}", "--bits", "9", "-o", "{out}"], "bits must be an integer in 2..8, got 9"),
        (["quantize", "{recv}", "-g", "row", "-o", "{out}"], "granularity must be one of"),
        (["quantize", "{missing}", "-o", "{out}"], "no such file"),
        (["patch", "-r", "{recv}", "-v", "{corrupt}", "-o", "{out}"], "not a readable safetensors file"),
        (["patch", "-r", "{recv}", "-v", "{recv}", "-o", "{out}"], "not a qvec quantization vector"),
        (["extract", "--ft", "{recv}", "--qat", "{mini}", "-o", "{out}"], "architectures differ"),
        (["quantize", "{recv}", "--model", "nope:vit", "-o", "{out}"], "unknown model family 'nope'"),
        (["pack", "{recv}", "-g", "group", "--group-size", "7", "-o", "{out}"], "group_size 7 does not divide"),
        (["pack", "{recv}", "--group-size", "7", "-o", "{out}"], "group_size 7 does not divide"),  # groups implied
        (["pack", "{recv}", "-g", "channel", "--group-size", "32", "-o", "{out}"],
         "--group-size is for --granularity group; got --granularity channel"),
    ],
)
def test_bad_input_one_line_error_exit_2(args, message, ckpts, tmp_path, capsys):
    from qvec.models import ModelSpec

    from .conftest import make_ckpt

    mini = tmp_path / "mini.safetensors"
    make_ckpt(ModelSpec("qvec", "vit-mini", 10), 0).save(mini)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(ckpts["recv"].read_bytes()[:300])
    out = tmp_path / "out.safetensors"
    fmt = dict(recv=ckpts["recv"], missing=tmp_path / "missing.safetensors", corrupt=corrupt, mini=mini, out=out)
    code, text = run(capsys, *[a.format(**fmt) for a in args])
    assert code == 2
    assert message in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_console_script_exit_code(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "qvec", "inspect", str(tmp_path / "nope.safetensors")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no such file" in r.stderr


def test_models_listing(capsys):
    code, text = run(capsys, "models")
    assert code == 0 and "qvec" in text and "timm" in text
    code, text = run(capsys, "models", "qvec")
    assert "vit-nano" in text

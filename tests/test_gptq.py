"""GPTQ (qvec.gptq): better reconstruction than RTN on the same grid, codes that pack exactly, calibration errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from qvec import GPTQConfig, QuantSpec, quantize_
from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.models import load_model
from qvec.quant import dequantize_codes, find_targets, quantize_codes
from qvec.quant.calibration import check_calibration
from qvec.quant.gptq import _Hessian, gptq_weight
from qvec.quant.pack import load_packed, pack_checkpoint
from qvec.quant.ptq import quantize_checkpoint

from .cli_helpers import one_line_error, run


@pytest.mark.parametrize("spec", [QuantSpec(3), QuantSpec(2), QuantSpec(4, symmetric=False),
                                  QuantSpec(3, granularity="group", group_size=16), QuantSpec(3, granularity="tensor")],
                         ids=str)
def test_gptq_beats_rtn_on_a_random_linear(spec):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    x = torch.randn(1024, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs: where GPTQ's updates matter
    ref = layer(x).detach()
    rtn = copy.deepcopy(layer)
    quantize_(rtn, spec, find_targets(rtn, ()))
    h = _Hessian(64)
    h(layer, (x,))
    cfg = GPTQConfig(spec)
    q, scale, zero = gptq_weight(layer.weight, h.h, cfg)
    gptq = copy.deepcopy(layer)
    with torch.no_grad():
        gptq.weight.copy_(q)
    err_rtn = (rtn(x) - ref).pow(2).mean().item()
    err_gptq = (gptq(x) - ref).pow(2).mean().item()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    # on RTN's grid: the codes under RTN's scales give back the GPTQ weight exactly
    levels, s, z = quantize_codes(q, spec, (scale, zero))
    assert int(levels.max()) <= 2**spec.bits - 1
    assert torch.equal(dequantize_codes(levels, s, z, spec, q.shape), q)


def test_gptq_through_quantize_and_pack_round_trip(ckpts, tmp_path):
    ck = Checkpoint.load(ckpts["recv"])
    model, adapter, spec = load_model(ck)
    size = adapter.data_config(spec, model).image_size
    calib = torch.rand(16, 3, size, size)
    cfg = GPTQConfig(QuantSpec(3))
    q = quantize_checkpoint(ck, cfg, calibration=calib)
    assert '"method": "gptq"' in q.meta["qvec.quant"] and '"images": 16' in q.meta["qvec.quant"]
    changed = [k for k in q.state if not torch.equal(q.state[k], ck.state[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    rtn = quantize_checkpoint(ck, QuantSpec(3))
    assert any(not torch.equal(q.state[k], rtn.state[k]) for k in changed)  # GPTQ rounds differently
    out = tmp_path / "g.packed.safetensors"
    pack_checkpoint(ck, cfg, out, scale_dtype="float32", calibration=calib)
    back = load_packed(out)
    assert all(torch.equal(back.state[k], q.state[k]) for k in q.state)  # exact with fp32 scales


def test_gptq_calibration_errors(ckpts, tmp_path, capsys):
    with pytest.raises(QvecError, match="needs calibration images"):
        check_calibration(None)
    with pytest.raises(QvecError, match="at least 8 calibration images, got 3"):
        check_calibration(torch.rand(3, 3, 32, 32))
    with pytest.raises(QvecError, match="are 16x16, but the model takes 32x32"):
        check_calibration(torch.rand(8, 3, 16, 16), 32)
    ck = Checkpoint.load(ckpts["recv"])
    with pytest.raises(QvecError, match="but the model takes"):
        quantize_checkpoint(ck, GPTQConfig(QuantSpec(3)), calibration=torch.rand(8, 3, 7, 7))
    out = tmp_path / "q.safetensors"
    base = ["quantize", ckpts["recv"], "--method", "gptq", "-o", out]
    one_line_error(capsys, "--method gptq needs --calib", *base)
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, "no images in this probe folder", *base, "--calib", tmp_path / "empty")
    np.savez(tmp_path / "few.npz", x=np.zeros((5, 32, 32, 3), np.uint8))
    one_line_error(capsys, "at least 8 calibration images, got 5", *base, "--calib", tmp_path / "few.npz")
    np.savez(tmp_path / "tiny.npz", x=np.zeros((20, 4, 4, 3), np.uint8))
    one_line_error(capsys, "probe images are 4x4", *base, "--calib", tmp_path / "tiny.npz")
    one_line_error(capsys, "unknown --method 'awq'; known: rtn, clip, hqq, gptq", "quantize", ckpts["recv"],
                   "--method", "awq", "-o", out)
    one_line_error(capsys, "--calib is for --method gptq", "quantize", ckpts["recv"], "--calib", "noise", "-o", out)
    assert not out.exists()
    assert run(capsys, *base, "--calib", "noise", "--calib-size", "16")[0] == 0 and out.is_file()


def test_gptq_config_checks():
    with pytest.raises(QvecError, match="bits must be"):
        GPTQConfig(QuantSpec(9))
    with pytest.raises(QvecError, match="damp must be in"):
        GPTQConfig(QuantSpec(3), damp=0.0)
    assert str(GPTQConfig(QuantSpec(2))) == "gptq-w2-sym-channel" and GPTQConfig(QuantSpec(2)).grid == QuantSpec(2)


def test_calibration_passes_stop_after_the_block_without_changing_the_result(monkeypatch):
    """Each block's calibration pass ends at that block (its later outputs are unused): same weights as running
    the whole model every time, in less time."""
    import qvec.quant.gptq as gptq
    from qvec.models import ModelSpec, build_model, get_adapter

    spec = ModelSpec.parse("qvec:vit-nano", num_classes=4)
    torch.manual_seed(0)
    base = build_model(spec).eval()
    x = torch.rand(16, 3, 32, 32)
    early, full = copy.deepcopy(base), copy.deepcopy(base)
    calls = []
    real = gptq._stop_after
    monkeypatch.setattr(gptq, "_stop_after", lambda m, b: calls.append(b) or real(m, b))
    quantize_(early, GPTQConfig(QuantSpec(3)), find_targets(early, get_adapter(spec).head_prefixes), calibration=x)
    assert calls and all(c.startswith("blocks.") for c in calls)
    monkeypatch.setattr(gptq, "_stop_after", lambda m, b: None)
    quantize_(full, GPTQConfig(QuantSpec(3)), find_targets(full, get_adapter(spec).head_prefixes), calibration=x)
    fs = full.state_dict()
    assert all(torch.equal(v, fs[k]) for k, v in early.state_dict().items())

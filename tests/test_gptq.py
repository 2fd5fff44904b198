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
    with pytest.raises(QvecError, match="hessian_dtype must be one of float32, float64, got 'float16'"):
        GPTQConfig(QuantSpec(3), hessian_dtype="float16")
    assert GPTQConfig(QuantSpec(3)).to_dict()["hessian_dtype"] == "float32"
    assert str(GPTQConfig(QuantSpec(2))) == "gptq-w2-sym-channel" and GPTQConfig(QuantSpec(2)).grid == QuantSpec(2)


def _nano_gptq(**kwargs) -> dict[str, torch.Tensor]:
    from qvec.models import ModelSpec, build_model, get_adapter

    spec = ModelSpec.parse("qvec:vit-nano", num_classes=4)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.rand(16, 3, 32, 32)
    calibration = kwargs.pop("calibration", lambda x: x)(x)
    quantize_(model, GPTQConfig(QuantSpec(3), **kwargs), find_targets(model, get_adapter(spec).head_prefixes),
              calibration=calibration)
    return model.state_dict()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_pass_gives_the_weights_of_one_model_pass_per_block(monkeypatch):
    """The one-pass orchestration (cached block inputs, each quantized block run once) gives exactly the weights
    of the previous orchestration, a pass of the whole model per block (still used for targets outside a chain of
    blocks): equal codes, at 3 bits on a fixed case."""
    import qvec.quant.gptq as gptq

    calls = []
    real = gptq._from_images
    monkeypatch.setattr(gptq, "_from_images", lambda *a: calls.append(a[2]) or real(*a))
    one_pass = _nano_gptq()
    assert not calls  # every target of vit-nano lies in its chain of blocks
    monkeypatch.setattr(gptq, "_find_chain", lambda *a: ([], []))
    per_block = _nano_gptq()
    assert len(calls) == 4  # one group per block, each calibrated by passes of the whole model
    assert _equal(one_pass, per_block)


def test_a_blocks_last_layer_is_not_run_to_collect_its_hessians(monkeypatch):
    """Each block's Hessian pass stops before its last target's product (fc2): fc2 runs only in the one-image
    check of the chain and in the quantized pass that makes the next block's inputs (none after the last block)."""
    import qvec.quant.gptq as gptq

    runs: dict[str, int] = {}
    real = gptq.gptq_quantize_

    def counting(model, *a, **k):
        for i in range(4):
            model.blocks[i].mlp.fc2.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs.get(i, 0) + 1))
        return real(model, *a, **k, batch_size=8)

    monkeypatch.setattr(gptq, "gptq_quantize_", counting)
    _nano_gptq()
    assert runs == {0: 3, 1: 3, 2: 3, 3: 1}  # 1 image check + 2 batches of the quantized pass; the last: the check


def test_streamed_calibration_spilled_to_disk_gives_the_same_weights(monkeypatch, tmp_path):
    """Calibration as an iterable of batches (read once), with every cached block input in a temporary file
    (``max_cache_bytes=0``): the same weights as from one tensor in memory, and no file left behind."""
    import tempfile

    import qvec.quant.blockwise as blockwise
    import qvec.quant.gptq as gptq

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real, close = gptq.gptq_quantize_, blockwise.BlockCache.close
    monkeypatch.setattr(gptq, "gptq_quantize_", lambda *a, **k: real(*a, **k, batch_size=8))
    reference = _nano_gptq()
    on_disk = []
    monkeypatch.setattr(blockwise.BlockCache, "close", lambda self: on_disk.append(len(self._on_disk)) or close(self))
    monkeypatch.setattr(gptq, "gptq_quantize_", lambda *a, **k: real(*a, **k, batch_size=8, max_cache_bytes=0))
    spilled = _nano_gptq(calibration=lambda x: iter(x.split(8)))
    assert on_disk == [2]  # both batches' block inputs lived in files
    assert _equal(reference, spilled)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(QvecError, match="needs at least 8 calibration images, got 6"):
        _nano_gptq(calibration=lambda x: iter(x[:6].split(4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hessian_gives_the_full_product(dtype, monkeypatch):
    """The upper triangle of X^T X (BLAS syrk), mirrored: the Hessian of the full product (to the dtype's
    rounding), exactly symmetric, the same whether the inputs are held for one pass or added every batch."""
    import qvec.quant.gptq as gptq

    torch.manual_seed(0)
    for cols in (5, 256, 700):
        batches = [torch.randn(2, 50, cols) + 0.5 for _ in range(3)]
        x = torch.cat([b.reshape(-1, cols) for b in batches]).double()
        full = 2 * x.T @ x / x.shape[0]
        for pending in (1 << 30, 0):
            monkeypatch.setattr(gptq, "_PENDING_BYTES", pending)
            hess = _Hessian(cols, dtype)
            for b in batches:
                hess(torch.nn.Identity(), (b,))
            assert len(hess.pending) == (3 if pending else 0)
            h = hess.h
            assert torch.equal(h, h.T) and hess.n == 300 and not hess.pending
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(h, full, rtol=tol, atol=tol)


def test_hessian_inputs_are_copies():
    """An input changed in place after its layer ran (an in-place residual, say) leaves the Hessian unchanged."""
    x = torch.randn(4, 8)
    hess = _Hessian(8)
    hess(torch.nn.Identity(), (x,))
    expected = 2 * x.double().T @ x.double() / 4
    x.zero_()
    torch.testing.assert_close(hess.h, expected)


def test_threaded_factorizations_keep_the_codes():
    """GPTQ with the factorizations on every thread gives exactly the weights of everything on one thread (equal
    codes at 3 bits on a fixed case), in float32 and float64."""
    from qvec.core.threads import one_intraop_thread

    for dtype in ("float32", "float64"):
        fast = _nano_gptq(hessian_dtype=dtype)
        with one_intraop_thread():
            plain = _nano_gptq(hessian_dtype=dtype)
        assert _equal(fast, plain)


def _published_loop(p, config) -> torch.Tensor:
    """GPTQ's column loop as the reference code writes it (IST-DASLab ``fasterquant``), in torch."""
    W, Hinv, S, Z = p.W.clone(), p.Hinv, p.S, p.Z
    Q = torch.zeros_like(W)
    lo, hi, B = config.grid.qmin, config.grid.qmax, config.block_size
    for i1 in range(0, W.shape[1], B):
        i2 = min(i1 + B, W.shape[1])
        W1, Hb = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, s = W1[:, i], S[:, i1 + i]
            z = 0 if Z is None else Z[:, i1 + i]
            q = (torch.clamp(torch.round(col / s) + z, lo, hi) - z) * s
            Q[:, i1 + i] = q
            err = (col - q) / Hb[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hb[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(p.perm)]


@pytest.mark.parametrize("spec", [QuantSpec(3), QuantSpec(2, symmetric=False),
                                  QuantSpec(4, symmetric=False, granularity="group", group_size=16)], ids=str)
def test_column_loop_gives_the_codes_of_the_published_loop(spec):
    """The column loop (NumPy, transposed blocks, work buffers) gives exactly the published loop's weights, with a
    last block shorter than ``block_size``."""
    from qvec.quant.gptq import _prepare, _solve

    torch.manual_seed(0)
    config = GPTQConfig(spec, block_size=32)
    w = torch.randn(48, 80)
    x = torch.randn(400, 80) * torch.rand(80) * 2
    p = _prepare(w, 2 * x.T.double() @ x.double() / 400, config)
    expected = _published_loop(copy.deepcopy(p), config)
    assert torch.equal(_solve(p, config)[0], expected)


def test_damping_grows_until_the_hessian_factors():
    """A Hessian that is not positive definite is damped 10x, 100x, 1000x more until it factors; beyond, one
    clear error."""
    w = torch.randn(2, 3)
    needs_10x = torch.diag(torch.tensor([1.0, 1.0, -0.02], dtype=torch.float64))
    q, scale, _ = gptq_weight(w, needs_10x, GPTQConfig(QuantSpec(3)))
    levels, _, zero = quantize_codes(q, QuantSpec(3), (scale, None))
    assert torch.equal(q, dequantize_codes(levels, scale, zero, QuantSpec(3), q.shape))  # on RTN's grid
    with pytest.raises(QvecError, match="not positive definite even with 1000x damping"):
        gptq_weight(w, torch.diag(torch.tensor([1.0, 1.0, -100.0], dtype=torch.float64)), GPTQConfig(QuantSpec(3)))

"""The data-free quantizers against small references computed here: the clip search against a brute-force search
over a fine ratio grid, HQQ against a plain transcription of the hqq package's solver (and the package itself where
it is installed); the full-range grid's levels; and the CLI's one-line errors for a group size that does not divide
the row and for a preset that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qvec.quant.clip import ClipSearch, search_ratios
from qvec.quant.grid import QuantSpec, dequantize_rows, grouped_view, quantize_codes, round_rows, row_qparams
from qvec.quant.hqq import HQQ, hqq_rows
from qvec.quant.rtn import RTN

from .cli_helpers import one_line_error


def vit_like(rows: int, cols: int, seed: int, std: float = 0.02, outliers: int = 8) -> torch.Tensor:
    """Gaussian weights at a ViT's scale, with a few large outliers (what makes a clip worth searching)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * std
    idx = torch.randint(0, rows * cols, (outliers,), generator=g)
    w.view(-1)[idx] *= 8
    return w


def row_errors(g: torch.Tensor, spec: QuantSpec, ratio: torch.Tensor | float | None) -> torch.Tensor:
    scale, zero = row_qparams(g, spec, ratio)
    return (dequantize_rows(round_rows(g, scale, zero, spec), scale, zero) - g).double().square().sum(1)


# ----------------------------------------------------------------------------------------------------- clip search
CLIP_GRIDS = [
    QuantSpec(3),
    QuantSpec(3, full_range=True),
    QuantSpec(2),
    QuantSpec(3, symmetric=False, granularity="group", group_size=32),
    QuantSpec(2, symmetric=True, granularity="group", group_size=64),
]


@pytest.mark.parametrize("spec", CLIP_GRIDS, ids=str)
def test_clip_search_close_to_brute_force(spec):
    w = vit_like(32, 256, seed=1)
    g = grouped_view(w, spec)
    brute = torch.full((g.shape[0],), float("inf"), dtype=torch.float64)
    for r in torch.arange(0.3, 1.0 + 1e-9, 0.002).tolist():  # 351 ratios, every row
        brute = torch.minimum(brute, row_errors(g, spec, r))
    ratio = search_ratios(g, spec)
    found = row_errors(g, spec, ratio)
    rtn = row_errors(g, spec, None)
    assert bool(((ratio >= 0.3) & (ratio <= 1.0)).all())
    assert bool((found <= rtn * (1 + 1e-6)).all())  # ratio 1 is among the candidates
    assert float(found.sum()) <= float(brute.sum()) * 1.005, (float(found.sum()), float(brute.sum()))
    assert float(found.sum()) < 0.9 * float(rtn.sum())  # the outliers make clipping pay


def test_clip_quantize_weight_is_rtn_at_the_found_ratio():
    spec = QuantSpec(3, symmetric=False, granularity="group", group_size=64)
    w = vit_like(32, 128, seed=2)
    w_hat, scale, zero = ClipSearch(spec).quantize_weight(w)
    g = grouped_view(w, spec)
    s, z = row_qparams(g, spec, search_ratios(g, spec))
    torch.testing.assert_close(scale, s)
    torch.testing.assert_close(zero, z)
    torch.testing.assert_close(w_hat, dequantize_rows(round_rows(g, s, z, spec), s, z).reshape(w.shape))


# ----------------------------------------------------------------------------------------------------- HQQ
def reference_hqq(g: torch.Tensor, qmax: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                  early_stop: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hqq package's ``Quantizer.quantize`` + ``optimize_weights_proximal_legacy`` (0.2.8, axis=1) on rows."""
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    inv = torch.where((hi - lo).abs() <= 1e-4, torch.ones_like(lo), qmax / (hi - lo)).clamp(max=2e4)
    zero = -lo * inv
    best = float("inf")
    for _ in range(iters):
        q = torch.round(g * inv + zero).clamp(0, qmax)
        r = (q - zero) / inv
        x = g - r
        e = torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(p - 1))
        zero = torch.mean(q - (g - e) * inv, dim=1, keepdim=True)
        err = float((g - r).abs().mean())
        if err < best:
            best = err
        elif early_stop:
            break
    return torch.round(g * inv + zero).clamp(0, qmax), 1.0 / inv, zero


def flat_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    w[0] = 0.5  # a constant group: hqq's scale 1
    w[1, :3] = w[1, 3]
    return w


HQQ_CASES = [  # (bits, group, weights, early_stop)
    (3, 64, lambda: vit_like(64, 256, seed=3), True),
    (2, 32, lambda: vit_like(64, 256, seed=4), True),
    (4, 128, lambda: vit_like(32, 512, seed=5), False),
    # weights of order 1: residuals reach the shrink threshold, so the l_p shrink is active
    (3, 64, lambda: vit_like(64, 256, seed=6, std=1.0), True),
    (2, 16, lambda: vit_like(32, 128, seed=7, std=3.0), False),
    (3, 64, lambda: flat_rows(vit_like(16, 64, seed=8)), True),
]


def assert_same_hqq(ours: tuple, ref: tuple, g: torch.Tensor) -> None:
    q, scale, zero = ours
    rq, rscale, rzero = ref
    torch.testing.assert_close(scale, rscale)
    assert float((zero - rzero).abs().max()) < 1e-3
    assert float((q != rq).float().mean()) < 1e-3  # float summation order may flip a code at a rounding tie
    err, rerr = ((q - zero) * scale - g).abs().sum(), ((rq - rzero) * rscale - g).abs().sum()
    assert abs(float(err) - float(rerr)) <= 1e-4 * float(rerr)


@pytest.mark.parametrize("case", range(len(HQQ_CASES)))
def test_hqq_matches_reference(case):
    bits, group, make, early = HQQ_CASES[case]
    spec = QuantSpec(bits, symmetric=False, granularity="group", group_size=group)
    g = grouped_view(make(), spec)
    assert_same_hqq(hqq_rows(g, spec.qmax, early_stop=early), reference_hqq(g, spec.qmax, early_stop=early), g)


def test_hqq_against_the_package():
    hqq = pytest.importorskip("hqq.core.quantize", reason="the hqq package is not installed (pip install hqq)")
    for bits, group, make, _ in HQQ_CASES:
        w = make()
        spec = QuantSpec(bits, symmetric=False, granularity="group", group_size=group)
        q, meta = hqq.Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group, optimize=True,
                                         round_zero=False, axis=1, bitpack=False, device="cpu")
        g = grouped_view(w, spec)
        ref = (q.reshape(g.shape).float(), meta["scale"], meta["zero"])
        assert_same_hqq(hqq_rows(g, spec.qmax), ref, g)


def test_hqq_quantize_weight_reads_back_its_codes():
    spec = QuantSpec(3, symmetric=False, granularity="group", group_size=64)
    w = vit_like(16, 256, seed=9)
    w_hat, scale, zero = HQQ(spec).quantize_weight(w)
    levels, _, _ = quantize_codes(w_hat, spec, (scale, zero))
    assert int(levels.max()) <= spec.qmax
    torch.testing.assert_close(((levels.float() - zero) * scale).reshape(w.shape), w_hat)
    assert float((w_hat - w).square().sum()) < float((RTN(spec).quantize_weight(w)[0] - w).square().sum()) * 1.1


# ----------------------------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_full_range_grid_uses_all_levels(bits):
    ramp = torch.linspace(-1.0, 1.0, 512)
    w = torch.stack([ramp, -ramp, 0.3 * ramp.flip(0), ramp[torch.randperm(512, generator=torch.Generator())]])
    full, paper = QuantSpec(bits, full_range=True), QuantSpec(bits)
    for config in (RTN(full), ClipSearch(full)):
        w_hat, scale, zero = config.quantize_weight(w)
        levels, _, _ = quantize_codes(w_hat, full, (scale, zero))
        for row in levels:
            assert sorted(row.unique().tolist()) == list(range(2**bits)), config
    levels, _, _ = quantize_codes(w, paper)
    assert int(levels.min()) == 1  # the paper's grid never uses its lowest level
    assert full.levels == 2**bits and paper.levels == 2**bits - 1


# ----------------------------------------------------------------------------------------------------- CLI
def qvec_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvec", *map(str, args)], capture_output=True, text=True,
                          env=os.environ.copy())


def assert_one_line_exit_2(r: subprocess.CompletedProcess, message: str, tmp_path) -> None:
    text = (r.stdout + r.stderr).strip()
    assert r.returncode == 2, text
    assert len(text.splitlines()) == 1 and message in text and "Traceback" not in text, text
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*.tmp"))


def test_cli_group_size_that_does_not_divide(ckpts, tmp_path, capsys):
    out = tmp_path / "out" / "q.safetensors"
    out.parent.mkdir()
    r = qvec_cli("quantize", ckpts["recv"], "--method", "hqq", "--asymmetric", "-g", "group", "--group-size", "7",
                 "-o", out)
    assert_one_line_exit_2(r, "group_size 7 does not divide", out.parent)
    one_line_error(capsys, "group_size 7 does not divide", "quantize", ckpts["recv"], "--method", "clip", "-g",
                   "group", "--group-size", "7", "-o", out)
    assert not out.exists()


def test_cli_preset_that_does_not_exist(ckpts, tmp_path):
    out = tmp_path / "out" / "q.safetensors"
    out.parent.mkdir()
    r = qvec_cli("quantize", ckpts["recv"], "--preset", "hqq-g63", "-o", out)
    assert_one_line_exit_2(r, "unknown preset 'hqq-g63'; known: paper,", out.parent)

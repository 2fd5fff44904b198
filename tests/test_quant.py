"""Quantizer golden tests (hand-computed), granularities, bounds, and the target filter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvec.core.errors import QvecError
from qvec.quant import (
    QuantSpec,
    TargetFilter,
    dequantize_codes,
    fake_quantize,
    fake_quantize_,
    find_targets,
    quantize_,
    quantize_codes,
)


def test_spec_grid():
    s = QuantSpec(3)
    assert (s.qmin, s.qmax) == (-4, 3)
    assert (QuantSpec(2).qmin, QuantSpec(2).qmax) == (-2, 1)
    assert (QuantSpec(4, symmetric=False).qmin, QuantSpec(4, symmetric=False).qmax) == (0, 15)
    assert str(QuantSpec(3)) == "w3-sym-channel"


@pytest.mark.parametrize(
    "bad", [dict(bits=1), dict(bits=9), dict(granularity="row"), dict(granularity="group", group_size=0)]
)
def test_spec_rejects_bad_values(bad):
    with pytest.raises(QvecError):
        QuantSpec(**bad)


def test_golden_3bit_per_channel():
    w = torch.tensor([[1.5, -3.0, 0.75, 0.2], [0.5, -0.25, 0.125, -0.0625]])
    # row 0: s = 3/3 = 1 -> round([1.5, -3, .75, .2]) = [2, -3, 1, 0]  (ties to even)
    # row 1: s = 0.5/3    -> w/s = [3, -1.5, .75, -.375] -> [3, -2, 1, 0]
    s1 = 0.5 / 3
    expected = torch.tensor([[2.0, -3.0, 1.0, 0.0], [3 * s1, -2 * s1, 1 * s1, 0.0]])
    got = fake_quantize(w, QuantSpec(3))
    torch.testing.assert_close(got, expected)
    levels, scale, zero = quantize_codes(w, QuantSpec(3))
    assert zero is None
    assert levels.tolist() == [[6, 1, 5, 4], [7, 2, 5, 4]]  # codes - qmin(-4)
    torch.testing.assert_close(scale.flatten(), torch.tensor([1.0, s1]))


def test_golden_per_tensor_and_group():
    w = torch.tensor([[3.0, 1.0, -1.4, 0.4], [0.3, 0.6, 0.9, -0.2]])
    # per tensor: s = 3/3 = 1
    torch.testing.assert_close(
        fake_quantize(w, QuantSpec(3, granularity="tensor")),
        torch.tensor([[3.0, 1.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0]]),
    )
    # groups of 2 along the input dim: [3,1] s=1; [-1.4,.4] s=1.4/3; [.3,.6] s=.2; [.9,-.2] s=.3
    g = QuantSpec(3, granularity="group", group_size=2)
    s2 = 1.4 / 3
    expected = torch.tensor([[3.0, 1.0, -3 * s2, 1 * s2], [0.2 * 2, 0.6, 0.9, -0.3 * 1]])
    # .4/s2 = .857 -> 1; .3/.2 = 1.5 -> 2 (ties to even); -.2/.3 = -.667 -> -1
    torch.testing.assert_close(fake_quantize(w, g), expected)


def test_golden_asymmetric():
    w = torch.tensor([[-1.0, 0.0, 2.5, 6.0]])
    # lo=-1, hi=6, s=7/7=1, zero=1: q = round(w)+1 = [0, 1, 3, 7] -> (q-1)*s = [-1, 0, 2, 6]
    spec = QuantSpec(3, symmetric=False)
    torch.testing.assert_close(fake_quantize(w, spec), torch.tensor([[-1.0, 0.0, 2.0, 6.0]]))
    levels, scale, zero = quantize_codes(w, spec)
    assert levels.tolist() == [[0, 1, 3, 7]] and zero.item() == 1.0 and scale.item() == 1.0


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(b, s, g, 16) for b in (2, 3, 4, 8) for s in (True, False) for g in ("channel", "tensor", "group")],
)
def test_codes_roundtrip_equals_fake_quant(spec):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.rand(24, 1) * 3
    levels, scale, zero = quantize_codes(w, spec)
    assert levels.dtype == torch.uint8 and int(levels.max()) <= 2**spec.bits - 1
    torch.testing.assert_close(dequantize_codes(levels, scale, zero, spec, w.shape), fake_quantize(w, spec))
    # RTN error is at most half a step inside the grid
    err = (fake_quantize(w, spec) - w).abs()
    step = scale.expand(-1, levels.shape[1]).reshape(w.shape) if spec.granularity != "tensor" else scale
    assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("gran", ["channel", "tensor", "group"])
def test_non_contiguous_weight_is_quantized(gran):
    """A transposed view (as a .pt state dict may hold) is quantized in place like its contiguous copy."""
    torch.manual_seed(0)
    spec = QuantSpec(3, granularity=gran, group_size=8)
    w = torch.randn(16, 32).t()
    assert not w.is_contiguous()
    expected = fake_quantize(w.contiguous(), spec)
    assert torch.equal(fake_quantize(w, spec), expected)
    fake_quantize_(w, spec)
    assert torch.equal(w, expected)
    levels, scale, zero = quantize_codes(w, spec)
    assert torch.equal(dequantize_codes(levels, scale, zero, spec, w.shape), expected)


def test_levels_count_and_8bit_near_lossless():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    q = fake_quantize(w, QuantSpec(3))
    for row in q:
        assert len(torch.unique(row)) <= 8
    assert (fake_quantize(w, QuantSpec(8)) - w).norm() / w.norm() < 0.01


def test_large_weight_blocking_matches_unblocked():
    torch.manual_seed(0)
    w = torch.randn(3000, 100)
    spec = QuantSpec(3)
    s = w.abs().amax(1, keepdim=True) / 3
    ref = torch.clamp(torch.round(w / s), -4, 3) * s
    torch.testing.assert_close(fake_quantize(w, spec), ref)


def test_fp16_and_bf16_weights():
    w = torch.randn(16, 32)
    for dt in (torch.float16, torch.bfloat16):
        q = fake_quantize(w.to(dt), QuantSpec(3))
        assert q.dtype == dt
        torch.testing.assert_close(q.float(), fake_quantize(w.to(dt).float(), QuantSpec(3)).to(dt).float())


def test_group_size_must_divide():
    with pytest.raises(QvecError, match="group_size 7 does not divide"):
        fake_quantize(torch.randn(4, 32), QuantSpec(3, granularity="group", group_size=7))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)


def test_targets_default_filter():
    keys = [t.key for t in find_targets(Toy())]
    assert keys == ["fc.weight", "attn.in_proj_weight", "attn.out_proj.weight"]
    no_in = [t.key for t in find_targets(Toy(), targets=TargetFilter(in_proj=False))]
    assert no_in == ["fc.weight", "attn.out_proj.weight"]


def test_quantize_model_in_place_leaves_rest_float():
    torch.manual_seed(0)
    m = Toy()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    keys = quantize_(m, QuantSpec(3))
    after = m.state_dict()
    for k in before:
        if k in keys:
            torch.testing.assert_close(after[k], fake_quantize(before[k], QuantSpec(3)))
            assert not torch.equal(after[k], before[k])
        else:
            assert torch.equal(after[k], before[k]), k

"""QAT preparation: quantized forward, straight-through gradients, latent weights, FT-identical keys."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qvec.models import ModelSpec, build_model, get_adapter
from qvec.quant import QuantSpec, find_targets, quantize_
from qvec.quant.qat import convert_qat, is_qat, prepare_qat

from .test_quant import Toy


def test_forward_sees_quantized_weights():
    torch.manual_seed(0)
    spec = ModelSpec("qvec", "vit-nano", 10)
    model = build_model(spec).eval()
    adapter = get_adapter(spec)
    ptq = copy.deepcopy(model)
    quantize_(ptq, QuantSpec(3), find_targets(ptq, adapter.head_prefixes))
    prepare_qat(model, QuantSpec(3), find_targets(model, adapter.head_prefixes))
    assert is_qat(model)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), ptq(x))


def test_straight_through_gradient_reaches_latent_weight():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    latent = lin.weight.detach().clone()
    m = nn.Sequential(lin)
    prepare_qat(m, QuantSpec(3), find_targets(m, head_prefixes=()))
    x = torch.randn(5, 16)
    m(x).pow(2).sum().backward()
    grad_latent = lin.parametrizations.weight.original.grad
    # STE: d loss / d W_latent equals d loss / d W_hat, computed by hand here
    w_hat = lin.weight.detach()
    y = x @ w_hat.T + lin.bias.detach()
    torch.testing.assert_close(grad_latent, 2 * y.T @ x)
    # the optimizer updates the latent float weight, not the quantized one
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.step()
    torch.testing.assert_close(lin.parametrizations.weight.original.detach(), latent - 0.1 * grad_latent)


def test_convert_restores_ft_keys_and_latent_weights():
    torch.manual_seed(0)
    m = Toy()
    keys = list(m.state_dict())
    prepare_qat(m, QuantSpec(3))
    assert any("parametrizations" in k for k in m.state_dict())
    latent = m.fc.parametrizations.weight.original.detach().clone()
    in_proj = m.attn.parametrizations.in_proj_weight.original.detach().clone()
    out = m.attn(torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8))[0]
    out.sum().backward()
    assert m.attn.parametrizations.in_proj_weight.original.grad is not None
    convert_qat(m)
    assert not is_qat(m)
    assert sorted(m.state_dict()) == sorted(keys)
    assert torch.equal(m.fc.weight, latent) and torch.equal(m.attn.in_proj_weight, in_proj)


def test_head_is_not_fake_quantized():
    spec = ModelSpec("qvec", "vit-nano", 10)
    model = build_model(spec)
    prepare_qat(model, QuantSpec(3), find_targets(model, get_adapter(spec).head_prefixes))
    assert not hasattr(model.head, "parametrizations")
    assert hasattr(model.blocks[0].mlp.fc1, "parametrizations")


def test_qat_on_an_asymmetric_group_grid_is_that_grid_in_the_forward():
    """QAT fake-quantizes with the deploy quantizer's trainable grid: asymmetric groups of 16 here, as g64 RTN and
    HQQ vectors are trained; the converted model has FT's keys and the latent weights."""
    torch.manual_seed(0)
    spec = ModelSpec("qvec", "vit-nano", 10)
    grid = QuantSpec(3, symmetric=False, granularity="group", group_size=16)
    model = build_model(spec).eval()
    adapter = get_adapter(spec)
    ptq = copy.deepcopy(model)
    latent = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_(ptq, grid, find_targets(ptq, adapter.head_prefixes))
    prepare_qat(model, grid, find_targets(model, adapter.head_prefixes))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), ptq(x))
    w = dict(model.named_parameters())["blocks.0.mlp.fc1.parametrizations.weight.original"]
    levels = model.blocks[0].mlp.fc1.weight.detach().reshape(-1, 16)
    assert all(len(torch.unique(row)) <= 2**3 for row in levels)  # at most 2^3 levels per group of 16
    assert not torch.equal(w, model.blocks[0].mlp.fc1.weight)
    convert_qat(model)
    assert set(model.state_dict()) == set(latent)
    assert torch.equal(model.state_dict()["blocks.0.mlp.fc1.weight"], latent["blocks.0.mlp.fc1.weight"])

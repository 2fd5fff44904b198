"""SPEC section 8: the quantizer is equivariant under row permutations and sign flips, so quantization vectors
have no reparameterization ambiguity: permuting MLP hidden units in FT and QAT permutes the vector alike, and
patch + PTQ of permuted models computes the same function."""

from __future__ import annotations

import pytest
import torch

from qvec.core.checkpoint import Checkpoint
from qvec.models import ModelSpec, build_model, checkpoint_from_model, load_model
from qvec.quant import QuantSpec, fake_quantize
from qvec.quant.ptq import quantize_checkpoint
from qvec.vectors.vector import QuantVector


@pytest.mark.parametrize(
    "spec", [QuantSpec(3), QuantSpec(2), QuantSpec(4), QuantSpec(3, granularity="group", group_size=8)], ids=str
)
def test_quantizer_commutes_with_row_permutation_and_sign_flip(spec):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    perm = torch.randperm(32)
    signs = torch.where(torch.rand(32, 1) < 0.5, -1.0, 1.0)
    assert torch.equal(fake_quantize(w[perm], spec), fake_quantize(w, spec)[perm])
    assert torch.equal(fake_quantize(signs * w, spec), signs * fake_quantize(w, spec))


def test_per_channel_commutes_with_column_permutation():
    torch.manual_seed(0)
    w = torch.randn(16, 48)
    perm = torch.randperm(48)
    assert torch.equal(fake_quantize(w[:, perm], QuantSpec(3)), fake_quantize(w, QuantSpec(3))[:, perm])


def permute_mlp_hidden(state: dict[str, torch.Tensor], perms: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permute the hidden units of every MLP block: rows of fc1 (weight, bias) and columns of fc2."""
    out = {k: v.clone() for k, v in state.items()}
    for i, p in enumerate(perms):
        out[f"blocks.{i}.mlp.fc1.weight"] = state[f"blocks.{i}.mlp.fc1.weight"][p]
        out[f"blocks.{i}.mlp.fc1.bias"] = state[f"blocks.{i}.mlp.fc1.bias"][p]
        out[f"blocks.{i}.mlp.fc2.weight"] = state[f"blocks.{i}.mlp.fc2.weight"][:, p]
    return out


def _ckpt(spec, seed, **meta):
    torch.manual_seed(seed)
    return checkpoint_from_model(build_model(spec), spec, **meta)


def test_vector_permutes_and_patched_function_is_invariant():
    spec = ModelSpec("qvec", "vit-nano", 10)
    ft, qat, recv = _ckpt(spec, 0), _ckpt(spec, 0), _ckpt(spec, 1)
    with torch.no_grad():
        for v in qat.state.values():
            v.add_(0.02 * torch.randn_like(v))
    torch.manual_seed(7)
    hidden = ft.state["blocks.0.mlp.fc1.weight"].shape[0]
    depth = sum(1 for k in ft.state if k.endswith("mlp.fc1.weight"))
    perms = [torch.randperm(hidden) for _ in range(depth)]

    ft_p = Checkpoint(permute_mlp_hidden(ft.state, perms), dict(ft.meta))
    qat_p = Checkpoint(permute_mlp_hidden(qat.state, perms), dict(qat.meta))
    recv_p = Checkpoint(permute_mlp_hidden(recv.state, perms), dict(recv.meta))

    # the permuted models compute the same function as the originals
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(load_model(ft_p)[0](x), load_model(ft)[0](x), atol=1e-5, rtol=1e-5)

    v = QuantVector.from_checkpoints(ft, qat)
    v_p = QuantVector.from_checkpoints(ft_p, qat_p)
    expected = permute_mlp_hidden(v.tensors, perms)
    for k in v.tensors:
        torch.testing.assert_close(v_p.tensors[k], expected[k], atol=1e-7, rtol=0)

    quant = QuantSpec(3)
    patched = quantize_checkpoint(v.apply(recv, 1.0), quant)
    patched_p = quantize_checkpoint(v_p.apply(recv_p, 1.0), quant)
    # PTQ is equivariant: the permuted patched+quantized weights are the permutation of the original ones
    expected_q = permute_mlp_hidden(patched.state, perms)
    for k in patched.state:
        torch.testing.assert_close(patched_p.state[k], expected_q[k], atol=1e-6, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(load_model(patched_p)[0](x), load_model(patched)[0](x), atol=1e-4, rtol=1e-4)


def test_sign_flip_of_hidden_units_is_an_exact_symmetry_of_the_quantizer():
    # GELU is not odd, so sign flips are not a symmetry of the network; they are of the quantizer (checked on
    # each weight): flipping rows of fc1 and the matching columns of fc2 flips the vector's rows alike.
    torch.manual_seed(0)
    w1, w2 = torch.randn(64, 16), torch.randn(16, 64)
    s = torch.where(torch.rand(64) < 0.5, -1.0, 1.0)
    q = QuantSpec(3)
    assert torch.equal(fake_quantize(s[:, None] * w1, q), s[:, None] * fake_quantize(w1, q))
    assert torch.equal(fake_quantize(w2 * s[None, :], q), fake_quantize(w2, q) * s[None, :])

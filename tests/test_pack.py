"""Packed low-bit checkpoints: bit packing, sizes, and equality with the fake-quantized model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qvec.quant.bitpack as bitpack
from qvec.core.checkpoint import read_safetensors
from qvec.core.errors import QvecError
from qvec.models import ModelSpec, load_model
from qvec.quant import RTN, NonFiniteWeightError, QuantSpec, dequantize_codes, fake_quantize, quantize_codes
from qvec.quant.bitpack import pack_bits, packed_codes, read_levels, unpack_bits
from qvec.quant.pack import CODES, SCALE, ZERO, load_packed, pack_checkpoint, pack_state, unpack_state
from qvec.quant.ptq import quantize_checkpoint, target_keys
from qvec.quant.rtn import quantize_state_dict_

from .conftest import make_ckpt


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_roundtrip_and_density(bits):
    rng = np.random.default_rng(bits)
    x = rng.integers(0, 2**bits, size=1003, dtype=np.uint8)
    packed = pack_bits(x, bits)
    assert packed.size == -(-1003 * bits // 8)  # really `bits` bits per value
    assert np.array_equal(unpack_bits(packed, bits, 1003), x)


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_stream_format_is_unchanged(bits):
    """The vectorised packing writes the stream of the original bit-matrix packing (value i at bits i*b..), for
    every length mod 8 and with bits above ``bits`` in a level dropped."""
    rng = np.random.default_rng(10 + bits)
    for n in (0, 1, 7, 8, 9, 8 * 70_000 + 5):
        x = rng.integers(0, 256, size=n, dtype=np.uint8)
        bit_matrix = np.unpackbits(x.reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
        reference = np.packbits(bit_matrix.reshape(-1), bitorder="little")
        packed = pack_bits(x, bits)
        assert packed.tobytes() == reference.tobytes(), n
        assert np.array_equal(unpack_bits(packed, bits, n), x & (2**bits - 1)), n


ROUND_TRIP = [QuantSpec(b, symmetric=s) for b in range(2, 9) for s in (True, False)] + [
    QuantSpec(4, symmetric=False, granularity="group", group_size=16), QuantSpec(3, full_range=True),
    QuantSpec(2, granularity="tensor")]


@pytest.mark.parametrize("quant", ROUND_TRIP, ids=str)
def test_pack_round_trip_every_grid(quant, tmp_path, nano_spec):
    """pack then load_packed gives back the fake-quantized weights exactly (fp32 scales), every bit-width 2..8."""
    ckpt = make_ckpt(nano_spec, 0)
    ptq = quantize_checkpoint(ckpt, quant)
    pack_checkpoint(ptq, quant, tmp_path / "p.safetensors", scale_dtype="float32")
    back = load_packed(tmp_path / "p.safetensors")
    assert all(torch.equal(back.state[k], ptq.state[k]) for k in ckpt.state)


def test_pack_round_trip_float_zero_points(tmp_path, nano_spec):
    """HQQ's real-valued zero points are stored fp16: the round trip is exact once the zeros are fp16 values."""
    from qvec.quant.hqq import HQQ

    ckpt = make_ckpt(nano_spec, 0)
    quant = HQQ(QuantSpec(4, symmetric=False, granularity="group", group_size=16))
    ptq = quantize_checkpoint(ckpt, quant)
    key = target_keys(nano_spec)[0]
    assert not torch.equal(ptq.qparams[key][1], ptq.qparams[key][1].round())  # really float zero points
    pack_checkpoint(ptq, quant, tmp_path / "p.safetensors", scale_dtype="float32")
    tensors, _ = read_safetensors(tmp_path / "p.safetensors")
    assert tensors[key + ZERO].dtype == torch.float16
    back = load_packed(tmp_path / "p.safetensors")
    for k, (scale, zero) in ptq.qparams.items():
        levels = quantize_codes(ptq.state[k], quant.grid, (scale, zero))[0]
        expected = dequantize_codes(levels, scale, zero.half().float(), quant.grid, ptq.state[k].shape)
        assert torch.equal(back.state[k], expected), k


@pytest.mark.parametrize("quant", ROUND_TRIP + [QuantSpec(3, symmetric=False, granularity="group", group_size=64),
                                                 QuantSpec(4, symmetric=False, granularity="tensor")], ids=str)
def test_rtn_codes_packed_straight_from_the_weight(quant, monkeypatch):
    """RTN packs its codes from the weight itself, chunk by chunk, with no fake-quantized copy: the same stream,
    scales and zeros as reading the codes back from RTN's reconstruction (chunks small here, so that rows and
    runs of a per-tensor grid span several of them and the last one is partial)."""
    monkeypatch.setattr(bitpack, "_CODE_CHUNK_ELEMS", 1024)
    torch.manual_seed(quant.bits)
    for w in (torch.randn(37, 192), torch.randn(5, 320) * 1e-2, torch.randn(11, 128).bfloat16()):
        w_hat, scale, zero = RTN(quant).quantize_weight(w)
        stream, s, z = RTN(quant).pack_weight(w)
        expected = pack_bits(read_levels(w_hat, quant, (scale, zero)), quant.bits)
        assert stream.tobytes() == expected.tobytes() and torch.equal(s, scale), (quant, w.shape)
        assert (z is None and zero is None) or torch.equal(z, zero)
        assert packed_codes(w_hat, quant, (scale, zero))[0].tobytes() == expected.tobytes()


def test_rtn_pack_refuses_non_finite_weights():
    for bad in (float("nan"), float("inf")):
        w = torch.randn(16, 64)
        w[3, 5] = bad
        with pytest.raises(NonFiniteWeightError):
            RTN(QuantSpec(3, symmetric=False)).pack_weight(w)


def test_empty_weight_is_one_line():
    for quantize in (RTN(QuantSpec(3)).pack_weight, RTN(QuantSpec(3)).quantize_weight):
        with pytest.raises(QvecError, match=r"cannot quantize an empty weight \(shape \(0, 8\)\)"):
            quantize(torch.zeros(0, 8))


def test_unpack_rejects_short_stream():
    with pytest.raises(QvecError, match="packed stream holds"):
        unpack_bits(np.zeros(2, np.uint8), 3, 10)


SPECS = [
    QuantSpec(3),
    QuantSpec(2),
    QuantSpec(4, symmetric=False),
    QuantSpec(3, granularity="group", group_size=32),
    QuantSpec(8, symmetric=False, granularity="tensor"),
]


@pytest.mark.parametrize("quant", SPECS, ids=str)
def test_packed_model_matches_fake_quantized(quant, tmp_path, nano_spec):
    ckpt = make_ckpt(nano_spec, 0, **{"qvec.task": "t"})
    ptq = quantize_checkpoint(ckpt, quant)
    # fp32 scales: bit-exact with PTQ
    pack_checkpoint(ckpt, quant, tmp_path / "exact.safetensors", scale_dtype="float32")
    exact = load_packed(tmp_path / "exact.safetensors")
    assert set(exact.state) == set(ckpt.state)
    for k in ckpt.state:
        assert torch.equal(exact.state[k], ptq.state[k]), k
    # fp16 scales: within the documented bound max|q - z| * |s32 - s16|
    report = pack_checkpoint(ckpt, quant, tmp_path / "p.safetensors")
    packed = load_packed(tmp_path / "p.safetensors")
    max_code = 2**quant.bits if not quant.symmetric else 2 ** (quant.bits - 1)
    for k in target_keys(nano_spec):
        w = ckpt.state[k]
        s32 = w.abs().amax(1, keepdim=True) / quant.qmax if quant.granularity == "channel" else None
        bound = (
            max_code * (w.abs().max() / quant.qmax if s32 is None else s32) * 2**-11 * (2 if not quant.symmetric else 1)
        )
        assert ((packed.state[k] - ptq.state[k]).abs() <= bound + 1e-12).all(), k
    x = torch.randn(3, 3, 32, 32)
    m_ptq, _, _ = load_model(ptq)
    m_packed, _, _ = load_model(packed)
    with torch.inference_mode():
        torch.testing.assert_close(m_packed(x), m_ptq(x), atol=1e-3, rtol=1e-3)
    assert report.num_quantized == len(target_keys(nano_spec))


def test_fp16_scales_fall_back_to_fp32_outside_fp16_range():
    """Tiny rows would get subnormal (or zero) fp16 scales, huge ones infinite: those tensors keep fp32 scales."""
    torch.manual_seed(0)
    quant = QuantSpec(3)
    for factor in (1e-5, 1e-9, 1e6):
        state = {"w": torch.randn(4, 64) * factor, "ok": torch.randn(4, 64)}
        original = {k: v.clone() for k, v in state.items()}
        qparams = quantize_state_dict_(state, ["w", "ok"], RTN(quant))
        tensors, shapes = pack_state(state, qparams, quant)
        assert tensors["w" + SCALE].dtype == torch.float32 and tensors["ok" + SCALE].dtype == torch.float16
        meta = {"qvec.packed": json.dumps({"quant": quant.to_dict(), "shapes": shapes,
                                           "dtypes": {"w": "float32", "ok": "float32"}})}
        assert torch.equal(unpack_state(tensors, meta)["w"], fake_quantize(original["w"], quant))


def test_3bit_size_ratio(tmp_path):
    spec = ModelSpec("qvec", "vit-small", 10)
    ckpt = make_ckpt(spec, 0)
    r = pack_checkpoint(ckpt, QuantSpec(3), tmp_path / "p.safetensors")
    assert r.quantized_ratio <= 0.12
    assert r.packed_bytes < r.fp16_bytes / 3
    meta = json.loads(read_safetensors(tmp_path / "p.safetensors")[1]["qvec.packed"])  # quantizer and shapes
    assert meta["quant"]["bits"] == 3 and "blocks.0.mlp.fc1.weight" in meta["shapes"]


def test_packed_file_layout(tmp_path, nano_spec):
    ckpt = make_ckpt(nano_spec, 0)
    pack_checkpoint(ckpt, QuantSpec(3, symmetric=False), tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("blocks.0.mlp.fc1.weight" + CODES).dtype == torch.uint8
        assert f.get_tensor("blocks.0.mlp.fc1.weight" + SCALE).dtype == torch.float16
        assert f.get_tensor("blocks.0.mlp.fc1.weight" + ZERO).dtype == torch.uint8
    assert "blocks.0.mlp.fc1.weight" not in keys and "blocks.0.mlp.fc1.bias" in keys and "head.weight" in keys


def test_pack_bad_inputs(tmp_path, nano_spec):
    ckpt = make_ckpt(nano_spec, 0)
    with pytest.raises(QvecError, match="group_size 7 does not divide"):
        pack_checkpoint(ckpt, QuantSpec(3, granularity="group", group_size=7), tmp_path / "g.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(QvecError, match="scale dtype"):
        pack_checkpoint(ckpt, QuantSpec(3), tmp_path / "g.safetensors", scale_dtype="int8")
    ckpt.save(tmp_path / "c.safetensors")
    with pytest.raises(QvecError, match="not a packed qvec checkpoint"):
        load_packed(tmp_path / "c.safetensors")
    del ckpt.state["blocks.0.mlp.fc1.weight"]
    with pytest.raises(QvecError, match="'blocks.0.mlp.fc1.weight' is not in the checkpoint"):
        pack_checkpoint(ckpt, QuantSpec(3), tmp_path / "x.safetensors")


PRESETS = ["paper", "full", "clip", "clip-full", "g64", "g128", "clip-g64", "hqq-g64", "gptq", "gptq-g64"]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_quantizer_packs_exactly_and_states_its_bits_per_weight(name, bits, tmp_path):
    """pack/unpack round-trips for every preset and bit-width: with fp32 scales the packed model is the quantizer's
    own output; the file's quantized tensors take exactly the bits per weight the config states."""
    from qvec.quant.presets import preset

    spec = ModelSpec("qvec", "vit-mini", 10)  # 128-wide rows: groups of 64 and 128 divide them
    ckpt = make_ckpt(spec, 0)
    config = preset(name, bits)
    calib = torch.rand(8, 3, 32, 32) if config.needs_calibration else None
    q = quantize_checkpoint(ckpt, config, calibration=calib)
    for dtype, scale_bits in (("float32", 32), ("float16", 16)):
        out = tmp_path / f"{dtype}.safetensors"
        report = pack_checkpoint(q, config, out, scale_dtype=dtype)
        shapes = [tuple(ckpt.state[k].shape) for k in q.qparams]
        assert report.bits_per_weight == pytest.approx(config.bits_per_weight(shapes, scale_bits=scale_bits))
        packed = load_packed(out)
        if dtype == "float32":
            assert all(torch.equal(packed.state[k], q.state[k]) for k in q.state), name
    tensors, _ = read_safetensors(tmp_path / "float16.safetensors")  # the file's own tensors
    real = sum(t.numel() * t.element_size() for key, t in tensors.items()
               if any(key == k + sfx for k in q.qparams for sfx in (CODES, SCALE, ZERO)))
    assert real * 8 / sum(ckpt.state[k].numel() for k in q.qparams) == pytest.approx(report.bits_per_weight)


def test_pack_error_midway_leaves_nothing_and_restores_threads(tmp_path, nano_spec):
    """A NaN in the last weight is found while earlier ones are already written: one error naming it, no file,
    and torch's thread count as it was."""
    ckpt = make_ckpt(nano_spec, 0)
    key = target_keys(nano_spec)[-1]
    ckpt.state[key][0, 0] = float("nan")
    before = torch.get_num_threads()
    with pytest.raises(NonFiniteWeightError, match=key):
        pack_checkpoint(ckpt, QuantSpec(3), tmp_path / "p.safetensors")
    assert torch.get_num_threads() == before and list(tmp_path.iterdir()) == []

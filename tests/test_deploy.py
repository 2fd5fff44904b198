"""ONNX export (qvec.deploy): MatMulNBits nodes holding qvec's codes give the fake-quantized model's logits in ONNX
Runtime; packed files export without dequantizing; bad inputs are one line and exit 2."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="the optional extra qvec[onnx] (onnx, onnxruntime) is not installed")
pytest.importorskip("onnxruntime", reason="the optional extra qvec[onnx] (onnx, onnxruntime) is not installed")

import onnx  # noqa: E402

from qvec.core.errors import QvecError  # noqa: E402
from qvec.deploy.onnx import export_onnx  # noqa: E402
from qvec.deploy.runtime import load_onnx  # noqa: E402
from qvec.models import ModelSpec, build_model, checkpoint_from_model, load_model  # noqa: E402
from qvec.quant import QuantSpec  # noqa: E402
from qvec.quant.pack import pack_checkpoint  # noqa: E402
from qvec.quant.ptq import quantize_checkpoint  # noqa: E402

from .cli_helpers import one_line_error, run  # noqa: E402
from .tinytask import CLASSES, write_task  # noqa: E402

TINY = ModelSpec.parse("timm:vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, embed_dim=64, depth=2,
                       num_heads=2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return checkpoint_from_model(build_model(TINY), TINY, **{"qvec.task": "stripes", "qvec.kind": "ft",
                                                             "qvec.classes": json.dumps(CLASSES)})


def _logits_match(q, path, images=3):
    """ORT's logits of the exported file against the fake-quantized torch model's, to float tolerance."""
    torch.manual_seed(1)
    x = torch.randn(images, 3, 32, 32)
    with torch.no_grad():
        ref = load_model(q)[0].eval()(x)
    got = load_onnx(path, threads=1)(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("grid", [QuantSpec(2), QuantSpec(3), QuantSpec(4), QuantSpec(4, symmetric=False),
                                  QuantSpec(3, symmetric=False, granularity="group", group_size=16)], ids=str)
def test_exported_logits_match_the_fake_quantized_model(grid, tiny, tmp_path):
    q = quantize_checkpoint(tiny, grid)
    report = export_onnx(q, tmp_path / "m.onnx")
    assert report.num_quantized == _ops(tmp_path / "m.onnx")["MatMulNBits"] == 8  # 4 Linear per block
    assert report.container_bits == {2: 2, 3: 4, 4: 4}[grid.bits]
    if grid.bits == 3:  # exactly, in 4-bit containers; the real packed size is stated
        assert report.real_code_bytes * 4 == report.code_bytes * 3 and "4-bit containers" in str(report)
    _logits_match(q, tmp_path / "m.onnx")


def test_float_zero_points_and_the_float_parts(tiny, tmp_path):
    """HQQ's real-valued zero points export as float zero points; the head and norms stay float."""
    from qvec.quant.hqq import HQQ

    q = quantize_checkpoint(tiny, HQQ(QuantSpec(4, symmetric=False, granularity="group", group_size=32)))
    export_onnx(q, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["head.weight"].data_type == onnx.TensorProto.FLOAT
    _logits_match(q, tmp_path / "m.onnx")


def test_packed_file_exported_without_dequantizing(tiny, tmp_path, monkeypatch):
    """A packed 4-bit file: its code streams go into the graph as they are (no unpacking, no float weights)."""
    import qvec.deploy.nbits as nbits
    import qvec.quant.bitpack as bitpack
    import qvec.quant.pack as pack

    grid = QuantSpec(4)
    q = quantize_checkpoint(tiny, grid)
    pack_checkpoint(q, grid, tmp_path / "p.safetensors", scale_dtype="float32")

    def refuse(*_a, **_k):
        raise AssertionError("the export unpacked or dequantized the packed file")

    for module, name in ((nbits, "unpack_bits"), (bitpack, "unpack_bits"), (pack, "unpack_bits"),
                         (pack, "unpack_state")):
        monkeypatch.setattr(module, name, refuse)
    export_onnx(tmp_path / "p.safetensors", tmp_path / "m.onnx")
    monkeypatch.undo()
    _logits_match(q, tmp_path / "m.onnx")
    pack_checkpoint(quantize_checkpoint(tiny, QuantSpec(3)), QuantSpec(3), tmp_path / "p3.safetensors",
                    scale_dtype="float32")  # 3-bit streams are re-laid into 4-bit containers
    export_onnx(tmp_path / "p3.safetensors", tmp_path / "m3.onnx")
    _logits_match(quantize_checkpoint(tiny, QuantSpec(3)), tmp_path / "m3.onnx")


def test_ptq_checkpoint_file_and_eval_of_the_onnx(tiny, tmp_path, capsys):
    """A PTQ-made file exports on its recorded grid; ``qvec eval`` runs the .onnx on a task like a checkpoint."""
    q = quantize_checkpoint(tiny, QuantSpec(4))
    q.save(tmp_path / "q.safetensors")
    code, text = run(capsys, "export", "--onnx", tmp_path / "q.safetensors", "-o", tmp_path / "m.onnx")
    assert code == 0 and "8 MatMulNBits nodes" in " ".join(text.split()), text
    _logits_match(q, tmp_path / "m.onnx")
    data = write_task(tmp_path / "data", "stripes", n_train=8, n_test=40).parent
    results = []
    for model in ("q.safetensors", "m.onnx"):
        code, text = run(capsys, "eval", "-m", tmp_path / model, "-t", "stripes", "-d", data, "--json")
        assert code == 0, text
        results.append(json.loads(text))
    assert results[0]["n"] == results[1]["n"] == 40 and results[0]["correct"] == results[1]["correct"]


def test_bad_inputs_are_one_line_and_exit_2(tiny, tmp_path, monkeypatch, capsys):
    path = tmp_path / "ft.safetensors"
    tiny.save(path)
    out = tmp_path / "m.onnx"
    # a grid the runtime cannot hold: groups of 8 (MatMulNBits blocks are powers of two from 16)
    one_line_error(capsys, "group size 8 is not a block size", "export", "--onnx", path, "-o", out, "--bits", "4",
                   "-g", "group", "--group-size", "8")
    with pytest.raises(QvecError, match="real-valued zero points on a 8-bit grid"):
        from qvec.quant.hqq import HQQ

        export_onnx(quantize_checkpoint(tiny, HQQ(QuantSpec(8, symmetric=False))), out)
    # a family the exporter does not know (vit-nano's, unregistered for the test)
    from qvec.deploy.onnx import ONNX_FAMILIES, register_onnx_family

    nano = ModelSpec.parse("qvec:vit-nano", num_classes=3)
    torch.manual_seed(0)
    checkpoint_from_model(build_model(nano), nano).save(tmp_path / "nano.safetensors")
    ONNX_FAMILIES.unregister("qvec")
    try:
        one_line_error(capsys, "unknown ONNX export family 'qvec'; known: timm", "export", "--onnx",
                       tmp_path / "nano.safetensors", "-o", out, "--bits", "4")
    finally:
        register_onnx_family("qvec")
    (tmp_path / "nano.safetensors").unlink()
    # the optional extra missing
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    one_line_error(capsys, "pip install 'qvec[onnx]'", "export", "--onnx", path, "-o", out, "--bits", "4")
    monkeypatch.undo()
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ft.safetensors"]


def test_onnx_eval_checks_the_task(tiny, tmp_path):
    export_onnx(quantize_checkpoint(tiny, QuantSpec(4)), tmp_path / "m.onnx")
    model = load_onnx(tmp_path / "m.onnx", threads=1)
    assert model.num_classes == 4 and model.data_config.image_size == 32
    assert np.isfinite(model(torch.zeros(2, 3, 32, 32)).numpy()).all()
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(QvecError, match="ONNX Runtime cannot load it"):
        load_onnx(tmp_path / "bad.onnx")

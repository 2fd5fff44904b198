"""qvec.core.safetensors_writer: a safetensors file written tensor by tensor, its header written last."""

import pytest
import torch
from safetensors import safe_open

import qvec.core.safetensors_writer as stw
from qvec.core.checkpoint import read_safetensors, safetensors_writer, save_safetensors
from qvec.core.errors import QvecError
from qvec.core.safetensors_writer import SafetensorsWriter, header_room

META = {"qvec.format": "checkpoint", "qvec.model": '{"family": "qvec", "name": "vit-nano", "num_classes": 4}'}


def test_streamed_file_reads_back_with_a_padded_header(tmp_path, monkeypatch):
    monkeypatch.setattr(stw, "SYNC_EVERY", 1)  # flushed to disk after every tensor
    big = torch.arange(12.0).reshape(3, 4)
    tensors = {"z": torch.arange(5, dtype=torch.uint8), "a": big[1:], "h": torch.ones(2, dtype=torch.float16),
               "e": torch.zeros(0)}
    shapes = [(k, tuple(t.shape)) for k, t in tensors.items()]
    with safetensors_writer(tmp_path / "s.safetensors", META, shapes, 1 << 40) as w:
        for k, t in tensors.items():
            w.add(k, t)
    back, meta = read_safetensors(tmp_path / "s.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert meta["qvec.model"] == META["qvec.model"] and "qvec.schema" in meta  # stamped like save_safetensors
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:  # the reference reader accepts the padding
        assert torch.equal(f.get_tensor("a"), big[1:])


def test_header_room_holds_any_dtypes(tmp_path):
    shapes = [("w", (1000, 1)), ("s", (1000, 1))]
    room = header_room(shapes, META, 10**12)
    with open(tmp_path / "f", "wb") as f:
        w = SafetensorsWriter(f, room)
        w.add("w", torch.zeros(1000, 1, dtype=torch.bool))
        w.add("s", torch.zeros(1000, 1, dtype=torch.bfloat16))
        w.finish(META)
    with open(tmp_path / "f", "wb") as f:
        w = SafetensorsWriter(f, 16)
        w.add("w", torch.zeros(3))
        with pytest.raises(QvecError, match="header needs .* bytes, 16 were kept"):
            w.finish(META)


def test_save_safetensors_bytes_unchanged(tmp_path):
    """save_safetensors writes what it always wrote: keys in order, the header exactly as long as it needs."""
    tensors = {"b": torch.ones(3), "a": torch.zeros(2, 2, dtype=torch.int64)}
    save_safetensors(tmp_path / "x.safetensors", tensors, META)
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8 : 8 + n].rstrip(b" ").endswith(b"}") and len(raw[8 + n :]) == 3 * 4 + 4 * 8
    assert raw[8 + n :][:32] == torch.zeros(4, dtype=torch.int64).numpy().tobytes()  # "a" first

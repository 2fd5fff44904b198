"""Speed of the core operations on a ViT-B/16 (timm config) and a ViT-B/32 OpenCLIP image encoder (random weights).

Prints, for extract / patch / PTQ (3-bit per-channel) / pack: seconds, the bytes of weights each step reads and
writes divided by its time, and that as a share of this machine's memory-copy bandwidth (a large
``Tensor.copy_``). Targets (issue 2): patch and PTQ each >= 30% of copy bandwidth; patch + PTQ < 2 s on 2 cores;
packed 3-bit quantized tensors <= 0.12 of their fp32 size. Issue 20: pack (codes read back, bit-packed, file
written) at most 3x PTQ's time.

    python benchmarks/bench_core.py [--models vit_base_patch16_224 ...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qvec.core.checkpoint import Checkpoint
from qvec.models import ModelSpec, build_model, get_adapter
from qvec.quant import RTN, QuantSpec, find_targets
from qvec.quant.pack import pack_checkpoint
from qvec.quant.rtn import quantize_state_dict_
from qvec.vectors.vector import QuantVector

GB = 1e9


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large ``copy_`` on this machine."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), repeats)


def bench_model(spec: ModelSpec, repeats: int, bw: float) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    model = build_model(spec)
    adapter = get_adapter(spec)
    ft = {k: v.detach().clone() for k, v in model.state_dict().items()}
    qat = {k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ft.items()}
    recv = {k: v + 1e-2 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ft.items()}
    keys = adapter.backbone_keys(ft)
    targets = [t.key for t in find_targets(model, adapter.head_prefixes)]
    vbytes = sum(ft[k].numel() * ft[k].element_size() for k in keys)
    tbytes = sum(ft[k].numel() * ft[k].element_size() for k in targets)

    vec = QuantVector.from_state_dicts(ft, qat, keys)
    t_extract = best_time(lambda: QuantVector.from_state_dicts(ft, qat, keys), repeats)
    t_patch_new = best_time(lambda: vec.apply_to_state(recv, 1.0), repeats)
    patched = vec.apply_to_state(recv, 1.0)
    t_patch = best_time(lambda: vec.apply_to_state(patched, 1.0, inplace=True), repeats)
    spec3 = QuantSpec(3)

    def ptq() -> None:
        quantize_state_dict_(patched, targets, RTN(spec3))

    t_ptq = best_time(ptq, repeats)
    ckpt = Checkpoint(recv, {"qvec.model": spec.to_json()})
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "packed.safetensors"
        t_pack = best_time(lambda: pack_checkpoint(ckpt, spec3, out), repeats)
        report = pack_checkpoint(ckpt, spec3, out)
    rows = [
        ("extract", t_extract, 3 * vbytes),  # read FT and QAT, write the vector
        ("patch", t_patch, 3 * vbytes),  # in place (qvec patch): read receiver and vector, write the receiver
        ("patch (new)", t_patch_new, 3 * vbytes),  # into freshly allocated tensors (page faults included)
        ("PTQ 3-bit", t_ptq, 2 * tbytes),  # read and write every target weight
        ("pack 3-bit", t_pack, tbytes + report.quantized_packed_bytes),
    ]
    print(f"\n## {spec}  ({sum(v.numel() for v in ft.values()) / 1e6:.1f} M params, {len(targets)} quantized tensors)")
    print(f"{'step':<12}{'seconds':>9}{'GB/s':>8}{'% of copy':>11}")
    for name, t, nbytes in rows:
        print(f"{name:<12}{t:>9.3f}{nbytes / t / GB:>8.2f}{100 * nbytes / t / bw:>10.0f}%")
    print(f"patch + PTQ: {t_patch + t_ptq:.3f} s (target < 2 s)")
    print(f"pack / PTQ: {t_pack / t_ptq:.2f}x (target <= 3x)")
    print(
        f"packed file {report.packed_bytes / 2**20:.1f} MiB vs fp32 {report.fp32_bytes / 2**20:.1f} MiB and fp16 "
        f"{report.fp16_bytes / 2**20:.1f} MiB; quantized tensors at {report.quantized_ratio:.4f} of fp32 "
        "(target <= 0.12)"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["timm:vit_base_patch16_224", "open_clip:ViT-B-32"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bw = copy_bandwidth()
    print(f"memory copy bandwidth (read + write): {bw / GB:.2f} GB/s")
    for name in args.models:
        bench_model(ModelSpec.parse(name, num_classes=10), args.repeats, bw)


if __name__ == "__main__":
    main()

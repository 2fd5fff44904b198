"""GPTQ's time beside RTN's on a ViT (random weights: the time does not depend on their values).

GPTQ = the calibration forward passes (one per block, hooks collecting each layer's Hessian) plus the per-layer
Cholesky solves and column updates; RTN = one pass over the weights. Both at 3-bit symmetric per-channel.

    python benchmarks/bench_gptq.py [--model timm:vit_base_patch16_224] [--images 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qvec import GPTQConfig, ModelSpec, QuantSpec, build_model, get_adapter, quantize_
from qvec.quant import find_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec.parse(args.model, num_classes=10)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    adapter = get_adapter(spec)
    size = adapter.data_config(spec, model).image_size
    targets = find_targets(model, adapter.head_prefixes)
    x = torch.rand(args.images, 3, size, size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    quantize_(model, QuantSpec(args.bits), targets)
    rtn = time.perf_counter() - t0
    model.load_state_dict(state)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(x), 32):
            model(x[s : s + 32])
    fwd = time.perf_counter() - t0
    model.load_state_dict(state)
    t0 = time.perf_counter()
    quantize_(model, GPTQConfig(QuantSpec(args.bits)), targets, calibration=x)
    gptq = time.perf_counter() - t0
    print(f"{spec} at {size} px, {len(targets)} target weights, {args.images} calibration images, "
          f"{args.threads} threads")
    print(f"RTN  {rtn:8.2f} s")
    print(f"GPTQ {gptq:8.2f} s  ({gptq / rtn:,.0f}x RTN; one plain forward pass over the images: {fwd:.1f} s)")


if __name__ == "__main__":
    main()

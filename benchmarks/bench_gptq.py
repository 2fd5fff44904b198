"""GPTQ's time against one plain forward pass over its calibration images (and RTN's), on a ViT with random weights
(the time does not depend on their values). Target (issue 20): ViT-B/16 at 224 px, 128 images, GPTQ <= 3x one
forward pass.

GPTQ = one pass over cached block inputs (each block: a float pass collecting its layers' inputs, their Hessians
by BLAS syrk, the per-layer factorizations and column loops, then the quantized block run once for the next
block's inputs); RTN = one pass over the weights. Both at 3-bit symmetric per-channel.
The Hessian products are float32 (the default, as the reference code); ``--hessian-dtype float64`` times the
products in float64, at twice their cost (docs/deploy.md).

    python benchmarks/bench_gptq.py [--model timm:vit_base_patch16_224] [--images 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qvec import GPTQConfig, ModelSpec, QuantSpec, build_model, get_adapter, quantize_
from qvec.quant import find_targets
from qvec.quant.gptq import HESSIAN_DTYPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    ap.add_argument("--hessian-dtype", choices=HESSIAN_DTYPES, default=GPTQConfig.hessian_dtype)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec.parse(args.model, num_classes=10, **({"img_size": args.img_size} if args.img_size else {}))
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
    quantize_(model, GPTQConfig(QuantSpec(args.bits), hessian_dtype=args.hessian_dtype), targets, calibration=x)
    gptq = time.perf_counter() - t0
    print(f"{spec} at {size} px, {len(targets)} target weights, {args.images} calibration images, "
          f"{args.threads} threads, {args.hessian_dtype} Hessian products; load average {os.getloadavg()}")
    print(f"RTN  {rtn:8.2f} s")
    print(f"forward {fwd:8.2f} s  (one plain pass over the {args.images} images, batches of 32)")
    print(f"GPTQ {gptq:8.2f} s  = {gptq / fwd:.2f}x one forward pass (target <= 3x), {gptq / rtn:,.0f}x RTN")


if __name__ == "__main__":
    main()

"""The data-free quantizers on a ViT's block Linear weights: time (and its ratio to RTN on the same grid), relative
weight error and relative layer-output error, with the machine's load averages.

Each quantizer runs over every Linear weight of the blocks. Times are interleaved with RTN on the same grid and with
the paper's RTN, ``--repeats`` times, in this one process; the medians of the per-repeat ratios are printed (wall
clock and CPU time: CPU time is what a shared, loaded machine distorts least). One thread by default: on a shared
machine, a second OpenMP thread that is descheduled stalls every small operation (``--threads 2`` shows it).

Errors: ``||W_hat - W||^2 / ||W||^2`` and ``||X (W_hat - W)^T||^2 / ||X W^T||^2`` summed over the layers, X each
layer's input on ``--images`` CIFAR-10 test images (resized to the model's input); last column, the output error
as a multiple of the paper RTN's. Issue 19's target: the clip search and HQQ each at most 10x RTN's time.

    python benchmarks/bench_quantizers.py [--model timm:vit_base_patch16_224] [--bits 3] [--repeats 5]
        [--weights FILE.safetensors] [--package]     # --package: also the `hqq` package's quantizer (pip install hqq)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qvec.models import ModelSpec, build_model, get_adapter
from qvec.quant import find_targets
from qvec.quant.base import QuantizerConfig
from qvec.quant.clip import ClipSearch
from qvec.quant.grid import QuantSpec
from qvec.quant.hqq import HQQ
from qvec.quant.rtn import RTN

CIFAR = Path("/work/shared/data/cifar10.npz")
Quantize = Callable[[torch.Tensor], torch.Tensor]


def configs(bits: int, group: int) -> list[tuple[str, QuantizerConfig]]:
    paper = QuantSpec(bits)
    asym = QuantSpec(bits, symmetric=False, granularity="group", group_size=group)
    return [
        ("RTN, the paper's (sym, per channel)", RTN(paper)),
        ("RTN, full-range sym, per channel", RTN(QuantSpec(bits, full_range=True))),
        ("clip search, sym, per channel", ClipSearch(paper)),
        ("clip search, full-range sym, per channel", ClipSearch(QuantSpec(bits, full_range=True))),
        (f"RTN, asym g{group}", RTN(asym)),
        (f"clip search, asym g{group}", ClipSearch(asym)),
        (f"HQQ (qvec), asym g{group}", HQQ(asym)),
    ]


def package_hqq(bits: int, group: int) -> Quantize:
    """The `hqq` package's core quantizer (its default solver), as a user of the package would call it."""
    from hqq.core.quantize import Quantizer

    def quantize(w: torch.Tensor) -> torch.Tensor:
        q, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group, optimize=True,
                                     round_zero=False, axis=1, bitpack=False, device="cpu")
        return ((q.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)

    return quantize


def block_linears(model: nn.Module, head_prefixes: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The quantization targets that are Linear weights inside the transformer blocks."""
    out = {}
    for t in find_targets(model, head_prefixes):
        if isinstance(t.module, nn.Linear) and t.attr == "weight" and ".blocks." in f".{t.key}":
            out[t.key] = t.module
    return out


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: dict[str, nn.Linear], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's input on ``images``, flattened to (tokens, in_features)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str) -> Callable:
        def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            seen.setdefault(key, inp[0].detach().reshape(-1, inp[0].shape[-1]))
        return hook

    hooks = [m.register_forward_hook(keep(k)) for k, m in layers.items()]
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return seen


def cifar_images(n: int, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    x = torch.from_numpy(np.load(CIFAR)["x_test"][:n]).permute(0, 3, 1, 2).float().div_(255)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


@torch.no_grad()
def errors(quantize: Quantize, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
           ) -> tuple[float, float]:
    wnum = wden = onum = oden = 0.0
    for k, w in weights.items():
        d = quantize(w) - w
        wnum += float(d.double().square().sum())
        wden += float(w.double().square().sum())
        x = inputs[k]
        onum += float((x @ d.T).double().square().sum())
        oden += float((x @ w.T).double().square().sum())
    return wnum / wden, onum / oden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--weights", help="a safetensors state dict for the model (default: random weights)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--package", action="store_true", help="also time the `hqq` package's quantizer (slow)")
    ap.add_argument("--package-repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec.parse(args.model, num_classes=10)
    torch.manual_seed(0)
    model = build_model(spec, weights=args.weights).eval()
    adapter = get_adapter(spec)
    data = adapter.data_config(spec, model)
    layers = block_linears(model, adapter.head_prefixes)
    weights = {k: m.weight.detach().float().contiguous() for k, m in layers.items()}
    inputs = layer_inputs(model, layers, cifar_images(args.images, data.image_size, data.mean, data.std))

    rows: list[tuple[str, QuantizerConfig | None, Quantize, int]] = [
        (name, c, (lambda w, c=c: c.quantize_weight(w)[0]), args.repeats) for name, c in configs(args.bits, args.group)]
    if args.package:
        try:
            rows.append((f"HQQ (hqq package), asym g{args.group}", None, package_hqq(args.bits, args.group),
                         args.package_repeats))
        except ImportError:
            print("hqq package not installed (pip install hqq): its row is left out")
    asym = QuantSpec(args.bits, symmetric=False, granularity="group", group_size=args.group)
    paper = RTN(QuantSpec(args.bits))

    load0 = os.getloadavg()
    for _, _, quantize, _ in rows:  # warm-up (allocator, first-call costs)
        quantize(next(iter(weights.values())))
    results = []
    for name, config, quantize, repeats in rows:
        rtn = RTN(config.grid if config is not None else asym)
        runs = []
        for _ in range(repeats):
            r = timed(lambda rtn=rtn: [rtn.quantize_weight(w) for w in weights.values()])
            p = timed(lambda: [paper.quantize_weight(w) for w in weights.values()])
            q = timed(lambda quantize=quantize: [quantize(w) for w in weights.values()])
            runs.append((q, r, p))
        t_wall = statistics.median(q[0] for q, _, _ in runs)
        ratio_wall = statistics.median(q[0] / r[0] for q, r, _ in runs)
        ratio_cpu = statistics.median(q[1] / r[1] for q, r, _ in runs)
        ratio_paper = statistics.median(q[1] / p[1] for q, _, p in runs)
        bpw = (config or HQQ(asym)).bits_per_weight(w.shape for w in weights.values())
        results.append((name, bpw, t_wall, ratio_wall, ratio_cpu, ratio_paper, *errors(quantize, weights, inputs)))
    load1 = os.getloadavg()

    n = sum(w.numel() for w in weights.values())
    print(f"{spec}{' from ' + args.weights if args.weights else ' (random weights)'}: {len(weights)} block Linear "
          f"weights, {n / 1e6:.1f} M; {args.bits} bits; {args.threads} thread(s); {args.repeats} interleaved repeats "
          f"(package: {args.package_repeats}); output error on {args.images} CIFAR-10 test images")
    print(f"load averages (1, 5, 15 min): before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} on {os.cpu_count()} cores")
    print("xRTN: time over RTN's on the same grid (median of interleaved pairs; wall clock, CPU time); xpaper: CPU "
          "time over the paper RTN's; out err xpaper: output error over the paper RTN's")
    paper_out = results[0][7]
    print(f"{'quantizer':44s} {'bits/w':>6s} {'time s':>7s} {'xRTN wall':>9s} {'xRTN cpu':>8s} {'xpaper':>6s} "
          f"{'rel w err':>9s} {'rel out err':>11s} {'xpaper':>6s}")
    for name, bpw, t, rw, rc, rp, we, oe in results:
        print(f"{name:44s} {bpw:6.3f} {t:7.3f} {rw:9.1f} {rc:8.1f} {rp:6.1f} {we:9.5f} {oe:11.5f} "
              f"{oe / paper_out:6.3f}")


if __name__ == "__main__":
    main()

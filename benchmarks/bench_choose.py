"""Time of choosing lambda without labels (``qvec.selection.choose_lambda``) per receiver, per rule.

For each model: a receiver FT checkpoint and a donor vector (random weights and a random vector of QAT-like size:
the time does not depend on their values), 12 candidates (lambda = 0 and the SPEC grid) at 2 bits, and each rule's
scoring passes. Prints seconds per receiver and per candidate. Models: the built-in vit-mini at 32 px and the
DINOv2 ViT-S/14 backbone at 56 px (the study's size; its weights file when given, else random).

    python benchmarks/bench_choose.py [--dinov2 ../shared/models/vit_small_patch14_dinov2.safetensors]
        [--probe ../shared/data/pretrain_cifar10.npz] [--probe-size 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from qvec.data.probe import load_probe
from qvec.models import ModelSpec, build_model, checkpoint_from_model, get_adapter
from qvec.quant import QuantSpec
from qvec.vectors.selection import choose_lambda
from qvec.vectors.vector import QuantVector

RULES = ("weight", "agree", "agree:top1")


def make_pair(spec: ModelSpec, weights: str | None, folder: Path) -> tuple[Path, QuantVector]:
    torch.manual_seed(0)
    model = build_model(spec, weights=weights) if weights else build_model(spec)
    ck = checkpoint_from_model(model, spec)
    path = folder / f"{spec.name}.safetensors"
    ck.save(path)
    keys = get_adapter(spec).backbone_keys(ck.state)
    vec = QuantVector({k: 1e-3 * ck.state[k].std() * torch.randn_like(ck.state[k]) for k in keys}, {})
    return path, vec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dinov2", default=None, help="DINOv2 ViT-S/14 weights (timm layout); default: random init")
    ap.add_argument("--probe", default="noise", help="probe images (.npz, folder or noise)")
    ap.add_argument("--probe-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quant = QuantSpec(2)
    models = [(ModelSpec("qvec", "vit-mini", 10), None, args.probe_size),
              (ModelSpec.parse("timm:vit_small_patch14_dinov2", img_size=56).with_classes(10), args.dinov2,
               min(args.probe_size, 128))]
    print(f"threads {args.threads}; 12 candidates (0 + SPEC grid); 2-bit per-channel RTN; probe {args.probe}")
    print(f"{'model':32s} {'rule':12s} {'probe imgs':>10s} {'s / receiver':>13s} {'s / candidate':>14s}")
    with tempfile.TemporaryDirectory() as tmp:
        for spec, weights, n in models:
            path, vec = make_pair(spec, weights, Path(tmp))
            probe = load_probe(args.probe, n)
            for rule in RULES:
                t0 = time.perf_counter()
                choice = choose_lambda(path, vec, quant, rule=rule, probe=probe)
                secs = time.perf_counter() - t0
                cands = len(next(iter(choice.scores.values())))
                imgs = 0 if rule == "weight" else len(probe)
                print(f"{str(spec):32s} {rule:12s} {imgs:>10d} {secs:>13.2f} {secs / cands:>14.3f}")


if __name__ == "__main__":
    main()

"""Training and evaluation throughput of a small ViT, FT vs QAT, and QAT's per-step overhead.

    python benchmarks/bench_train.py [--model vit-mini] [--steps 12] [--threads N] [--bits 3]

One training step = forward + backward + gradient clip + AdamW step on a batch of 32x32 images (default: the small
fine-tuning recipe's batch, 32). FT and QAT steps are timed alternately and the median is reported, so load from
other processes on shared cores hits both alike. Evaluation = forward of 512-image batches under
``torch.inference_mode`` (the QAT model is timed while still prepared, i.e. quantizing its weights on the fly).
Target: QAT step <= 1.3x FT step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qvec.models import ModelSpec, build_model, get_adapter
from qvec.quant import QuantSpec, find_targets
from qvec.quant.qat import prepare_qat
from qvec.train.recipe import SMALL_FINETUNE
from qvec.train.trainer import trainable_parameters


def make(spec: ModelSpec, qat: QuantSpec | None):
    torch.manual_seed(0)
    model = build_model(spec)
    if qat is not None:
        prepare_qat(model, qat, find_targets(model, get_adapter(spec).head_prefixes))
    params = trainable_parameters(model)
    return model, params, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)


def step_time(model, params, opt, x, y) -> float:
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def eval_time(model, x) -> float:
    model.eval()
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit-mini")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=SMALL_FINETUNE.batch_size, help="default: the small FT recipe's")
    ap.add_argument("--eval-batch", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec.parse(args.model, 10)
    q = QuantSpec(args.bits)
    ft, qat = make(spec, None), make(spec, q)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    xe = torch.randn(args.eval_batch, 3, 32, 32, generator=g)
    for m in (ft, qat):  # warm-up
        step_time(*m, x, y)
        m[0].train()
    t_ft, t_qat, e_ft, e_qat = [], [], [], []
    for _ in range(args.steps):
        t_ft.append(step_time(*ft, x, y))
        t_qat.append(step_time(*qat, x, y))
    for _ in range(max(3, args.steps // 3)):
        e_ft.append(eval_time(ft[0], xe))
        e_qat.append(eval_time(qat[0], xe))
    med = statistics.median
    n_targets = len(find_targets(build_model(spec), get_adapter(spec).head_prefixes))
    print(f"model {spec} ({sum(p.numel() for p in ft[1]) / 1e6:.2f} M params, {n_targets} quantized Linear "
          f"weights), QAT {q}, torch threads {torch.get_num_threads()}, {args.steps} timed steps (median)")
    print(f"train  FT : {args.batch / med(t_ft):7.1f} img/s  ({1000 * med(t_ft):.1f} ms/step of {args.batch})")
    print(f"train  QAT: {args.batch / med(t_qat):7.1f} img/s  ({1000 * med(t_qat):.1f} ms/step of {args.batch})")
    print(f"eval   FT : {args.eval_batch / med(e_ft):7.1f} img/s")
    print(f"eval   QAT: {args.eval_batch / med(e_qat):7.1f} img/s  (prepared model, fake quantization on the fly)")
    ratio = med(t_qat) / med(t_ft)
    print(f"QAT/FT step-time ratio: {ratio:.3f}x (target <= 1.3x: {'ok' if ratio <= 1.3 else 'MISSED'})")


if __name__ == "__main__":
    main()

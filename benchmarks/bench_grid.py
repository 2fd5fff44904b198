"""Throughput of the grid's evaluation stage on the mini suite: cells per minute, local vs Ray with 2 workers.

A cell is one patched evaluation PTQ(theta_FT^R + lam * tau_D) on a receiver split (a validation cell per lambda,
plus the test cells at lambda = 1 and lambda*). Evaluation cost does not depend on what the weights are, so the
benchmark writes randomly initialised FT/QAT checkpoints of the mini model for each task straight into the artifact
store (no training) and runs the real grid (:func:`qvec.grid.run_grid`) on them with the mini config's evaluation
settings. It prints, per executor: cells, wall time of the evaluation stage (first cells job start to last cells
job end), cells per minute, and the share of worker time spent inside ``evaluate`` (forward passes) against
overhead (patch, PTQ, loading, scheduling, database writes). Target: overhead under 10%.

    python benchmarks/bench_grid.py [--data ../shared/data] [--tasks mnist,gtsrb,...] [--bits 3]
                                    [--executors local,ray] [--config configs/mini.toml]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path

import torch

from qvec.core.checkpoint import META_FINGERPRINT, META_KIND, META_TASK
from qvec.data.tasks import get_task
from qvec.grid import build_plan, load_config, run_grid
from qvec.grid.executors import make_executor
from qvec.grid.store import ResultStore
from qvec.models import build_model, checkpoint_from_model

ROOT = Path(__file__).resolve().parents[1]


def fake_artifacts(cfg, artifacts: Path) -> None:
    """Random-weight theta_0, FT and QAT checkpoints where the plan expects the trained ones."""
    plan = build_plan(cfg, artifacts)
    spec = cfg.model_spec()
    for job in plan.jobs:
        if job.kind != "finetune" or Path(job.params["out"]).is_file():
            continue
        task = get_task(job.params["task"], job.params["data_dir"])
        s = spec.with_classes(task.num_classes)
        torch.manual_seed(zlib.crc32(job.params["task"].encode()))  # FT and QAT of a task start alike
        model = build_model(s)
        if job.params["qat"]:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3 * torch.randn_like(p))
        meta = {META_TASK: task.name, META_KIND: "qat" if job.params["qat"] else "ft", META_FINGERPRINT: "bench",
                "qvec.train_seconds": "0"}
        checkpoint_from_model(model, s, **meta).save(job.params["out"])


def stage_stats(db: Path, study: str, workers: int) -> dict:
    with ResultStore(db) as store:
        jobs = [j for j in store.jobs(study) if j.kind == "cells"]
        rows = [r for r in store.results(study) if r.kind == "patched"]
    start = min(j.finished - j.seconds for j in jobs)
    wall = max(j.finished for j in jobs) - start
    evals = sum(r.eval_seconds for r in rows)
    return {"cells": len(rows), "wall_s": wall, "cells_per_min": 60 * len(rows) / wall,
            "images_per_s": sum(r.n for r in rows) / wall, "eval_share": evals / (wall * workers),
            "patch_ptq_share": sum(r.patch_seconds + r.ptq_seconds for r in rows) / (wall * workers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "mini.toml")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: the config's)")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of the config's tasks")
    ap.add_argument("--bits", default="3")
    ap.add_argument("--executors", default="local,ray", help="any of local, ray, inprocess (local, 1 worker)")
    ap.add_argument("--workers", type=int, default=2,
                    help="worker processes (local) or CPUs of the local Ray cluster; local with 1 = in-process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        theta0 = tmp / "theta0.safetensors"
        over = {"bits": [int(b) for b in args.bits.split(",")], "backbone": str(theta0), "name": "bench"}
        if args.data:
            over["data_dir"] = str(args.data.resolve())
        if args.tasks:
            over["tasks"] = args.tasks.split(",")
        base = load_config(args.config, {"bits": over["bits"], "data_dir": over.get("data_dir")})
        checkpoint_from_model(build_model(base.model_spec().with_classes(10)), base.model_spec()).save(theta0)
        cfg = load_config(args.config, over)
        if args.tasks:
            cfg.donors, cfg.receivers = list(cfg.tasks), list(cfg.tasks)
        fake_artifacts(cfg, tmp / "artifacts")
        pairs = sum(1 for j in build_plan(cfg, tmp / "artifacts").jobs if j.kind == "cells")
        print(f"{cfg.model}, {len(cfg.receivers)} receivers x {len(cfg.donors)} donors = {pairs} pairs at bits "
              f"{cfg.bits}, {len(cfg.lambdas)} lambdas, val_limit {cfg.eval.val_limit}, test_limit "
              f"{cfg.eval.test_limit}, torch threads {torch.get_num_threads()}")
        print(f"{'executor':<10} {'cells':>6} {'wall s':>8} {'cells/min':>10} {'img/s':>8} {'eval %':>7} "
              f"{'patch+PTQ %':>12} {'overhead %':>11}")
        for name in args.executors.split(","):
            db = tmp / f"{name}.db"
            workers = 1 if name == "inprocess" else args.workers
            ex = make_executor("local" if name == "inprocess" else name, workers=workers)
            t0 = time.perf_counter()
            run_grid(cfg, db=db, artifacts=tmp / "artifacts", executor=ex)
            total = time.perf_counter() - t0
            s = stage_stats(db, "bench", workers)
            print(f"{name:<10} {s['cells']:>6} {s['wall_s']:>8.1f} {s['cells_per_min']:>10.1f} "
                  f"{s['images_per_s']:>8.0f} {100 * s['eval_share']:>6.1f}% {100 * s['patch_ptq_share']:>11.1f}% "
                  f"{100 * (1 - s['eval_share']):>10.1f}%   (whole run incl. baselines/vectors/startup: {total:.0f}s)")


if __name__ == "__main__":
    main()

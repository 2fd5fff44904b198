"""The exported low-bit model in ONNX Runtime against the float model (ONNX Runtime and torch): file size, peak
memory, latency and throughput at batch 1 and 32 with 1 and 2 threads, MatMulNBits ``accuracy_level`` 0 (float
activations) and 4 (int8 activations); and top-1 of the exported model against ``qvec eval`` of the same
fake-quantized checkpoint. Targets (issue 20): 4-bit file <= 0.16x the float ONNX file; top-1 within 0.2 points;
batch-1 throughput at least float ONNX Runtime's.

Speed runs on a model with random weights (``--model``, default ViT-B/16 at 224 px); accuracy on a fine-tuned
checkpoint (``--checkpoint``, a task of ``--data``). Latencies are the median of ``--repeats`` runs, every
configuration timed in turn within each repeat (interleaved), in this process; peak memory (max RSS) is measured in a
fresh process per configuration (load the model, run one batch of 32).

    python benchmarks/bench_export.py [--model timm:vit_base_patch16_224] [--checkpoint FT.safetensors --task mnist]
    python benchmarks/bench_export.py --skip-speed --profile --threads 2   # batch-1 time by ONNX op type
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qvec.core.checkpoint import Checkpoint
from qvec.deploy.onnx import export_float_onnx, export_onnx
from qvec.models import ModelSpec, build_model, checkpoint_from_model, get_adapter
from qvec.quant import QuantSpec
from qvec.quant.ptq import quantize_checkpoint

QUANTIZED = {"w4": (QuantSpec(4), 0), "w4 acc4": (QuantSpec(4), 4), "w3 (in 4-bit)": (QuantSpec(3), 0),
             "w2 acc4": (QuantSpec(2), 4)}


def export_all(ckpt: Checkpoint, folder: Path) -> dict[str, Path]:
    """The float ONNX model and each quantized export of ``ckpt``, by name."""
    paths = {"float": export_float_onnx(ckpt, folder / "float.onnx")}
    for name, (grid, level) in QUANTIZED.items():
        paths[name] = folder / f"{name.split()[0]}-a{level}.onnx"
        export_onnx(quantize_checkpoint(ckpt, grid), paths[name], accuracy_level=level)
    return paths


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def peak_rss_mib(target: str, threads: int, size: int) -> float:
    """Peak RSS of a fresh process that loads ``target`` (an .onnx, or ``torch:SPEC_JSON``) and runs a batch of 32,
    above its RSS before loading (the interpreter and imported libraries)."""
    out = subprocess.run([sys.executable, __file__, "--rss", target, "--threads", str(threads), "--size", str(size)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak) of this process from /proc (ru_maxrss would count the parent before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_child(target: str, threads: int, size: int) -> None:
    base = _status_mib("VmRSS")
    x = np.random.default_rng(0).standard_normal((32, 3, size, size), dtype=np.float32)
    if target.startswith("torch:"):
        torch.set_num_threads(threads)
        model = build_model(ModelSpec.from_json(target.removeprefix("torch:"))).eval()
        with torch.inference_mode():
            model(torch.from_numpy(x))
    else:
        s = session(Path(target), threads)
        s.run(None, {s.get_inputs()[0].name: x})
    print(_status_mib("VmHWM") - base)


def latencies(runners: dict, x: np.ndarray, repeats: int) -> dict[str, float]:
    """Median seconds of each runner on ``x``, the runners interleaved within each repeat (after one warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(repeats + 1):
        for name, run in runners.items():
            t = time.perf_counter()
            run(x)
            if r:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def speed(spec: ModelSpec, repeats: int, batches: tuple[int, ...], threads: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(spec).eval()
    size = get_adapter(spec).data_config(spec, model).image_size
    with tempfile.TemporaryDirectory() as d:
        paths = export_all(checkpoint_from_model(model, spec), Path(d))
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        print(f"\n## {spec} at {size} px, random weights; load average {os.getloadavg()}")
        print("\n| model | file MiB | x float ONNX | peak memory MiB (load + batch 32, 2 threads) |")
        print("|---|---:|---:|---:|")
        print(f"| torch float | - | - | {peak_rss_mib('torch:' + spec.to_json(), 2, size):.0f} |")
        for k, p in paths.items():
            print(f"| ORT {k} | {sizes[k] / 2**20:.1f} | {sizes[k] / sizes['float']:.3f} | "
                  f"{peak_rss_mib(str(p), 2, size):.0f} |")
        for t in threads:
            torch.set_num_threads(t)
            runners = {"torch float": lambda x: model(torch.from_numpy(x))}
            for k, p in paths.items():
                if k != "w3 (in 4-bit)":  # the same kernel as w4
                    s = session(p, t)
                    runners[f"ORT {k}"] = lambda x, s=s: s.run(None, {"pixels": x})
            for b in batches:
                x = np.random.default_rng(b).standard_normal((b, 3, size, size), dtype=np.float32)
                with torch.inference_mode():
                    lat = latencies(runners, x, repeats if b == 1 else max(1, repeats // 4))
                print(f"\n{t} thread(s), batch {b}, median of repeats; load average {os.getloadavg()}")
                print("| model | ms / batch | images / s | x ORT float throughput |")
                print("|---|---:|---:|---:|")
                for k, v in lat.items():
                    print(f"| {k} | {1e3 * v:.1f} | {b / v:.1f} | {lat['ORT float'] / v:.2f} |")


def op_times(path: Path, threads: int, x: np.ndarray, repeats: int) -> dict[str, float]:
    """Milliseconds per run spent in each ONNX op type, from ONNX Runtime's own profile of ``repeats`` runs (after
    one warm-up run, which the profile also holds and is left out)."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as d:
        options.profile_file_prefix = str(Path(d) / "ort")
        s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(repeats + 1):
            s.run(None, {"pixels": x})
        events = json.loads(Path(s.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[1]["ts"] if len(runs) > 1 else 0  # skip the warm-up run
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1e3 / repeats
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def where_time_goes(spec: ModelSpec, threads: int, repeats: int) -> None:
    """Batch 1: the ONNX Runtime profile of float ONNX against the 4-bit exports, by op type."""
    torch.manual_seed(0)
    model = build_model(spec).eval()
    size = get_adapter(spec).data_config(spec, model).image_size
    x = np.random.default_rng(1).standard_normal((1, 3, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as d:
        paths = export_all(checkpoint_from_model(model, spec), Path(d))
        names = ["float", "w4", "w4 acc4"]
        times = {k: op_times(paths[k], threads, x, repeats) for k in names}
    totals = {k: sum(t.values()) for k, t in times.items()}
    ops = sorted({op for t in times.values() for op in t}, key=lambda op: -max(t.get(op, 0.0) for t in times.values()))
    shown = [op for op in ops if any(times[k].get(op, 0.0) >= 0.01 * totals[k] for k in names)]  # 1% or more
    print(f"\n## Where the time goes: {spec}, batch 1, {threads} thread(s), ms per image by op type (ONNX Runtime "
          f"profile, mean of {repeats} runs); load average {os.getloadavg()}")
    print("\n| op type | " + " | ".join(f"ORT {k}" for k in names) + " |")
    print("|---|" + "---:|" * len(names))
    for op in shown:
        print(f"| {op} | " + " | ".join(f"{times[k].get(op, 0.0):.1f}" for k in names) + " |")
    print("| other ops | " + " | ".join(
        f"{sum(v for op, v in times[k].items() if op not in shown):.1f}" for k in names) + " |")
    print("| all | " + " | ".join(f"{totals[k]:.1f}" for k in names) + " |")


def accuracy(path: Path, task_name: str, data: str | None, threads: int, limit: int | None) -> None:
    from qvec.data.tasks import get_task
    from qvec.deploy.runtime import evaluate_onnx
    from qvec.train.evaluate import evaluate_checkpoint

    torch.set_num_threads(threads)
    ckpt = Checkpoint.load(path)
    task = get_task(task_name, data)
    print(f"\n## top-1 of {path.name} ({ckpt.model_spec}) on {task.name}/test"
          f"{f' (first {limit} images)' if limit else ''}; load average {os.getloadavg()}")
    print("| model | top-1 % | `qvec eval` of the fake-quantized checkpoint | difference (points) |")
    print("|---|---:|---:|---:|")
    fp = evaluate_checkpoint(ckpt, task, "test", limit=limit)
    with tempfile.TemporaryDirectory() as d:
        paths = export_all(ckpt, Path(d))
        print(f"| torch float | {100 * fp.accuracy:.2f} | - | - |")
        ort_float = evaluate_onnx(paths["float"], task, "test", threads=threads, limit=limit).accuracy
        print(f"| ORT float | {100 * ort_float:.2f} | - | - |")
        for name, (grid, _) in QUANTIZED.items():
            fake = evaluate_checkpoint(ckpt, task, "test", quant=grid, limit=limit).accuracy
            got = evaluate_onnx(paths[name], task, "test", threads=threads, limit=limit).accuracy
            print(f"| ORT {name} | {100 * got:.2f} | {100 * fake:.2f} | {100 * (got - fake):+.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--checkpoint", type=Path, default=None, help="fine-tuned checkpoint for the accuracy table")
    ap.add_argument("--task", default="mnist")
    ap.add_argument("--data", default=None, help="folder of task .npz files (default: $QVEC_DATA)")
    ap.add_argument("--limit", type=int, default=None, help="accuracy on the first N test images only")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also show where the batch-1 time goes, by ONNX op type, at each --threads")
    ap.add_argument("--rss", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss:
        _rss_child(args.rss, args.threads[0], args.size)
        return
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {os.cpu_count()} cores")
    if not args.skip_speed:
        speed(ModelSpec.parse(args.model, num_classes=10), args.repeats, tuple(args.batches), tuple(args.threads))
    if args.profile:
        for t in args.threads:
            where_time_goes(ModelSpec.parse(args.model, num_classes=10), t, args.repeats)
    if args.checkpoint:
        accuracy(args.checkpoint, args.task, args.data, max(args.threads), args.limit)


if __name__ == "__main__":
    main()

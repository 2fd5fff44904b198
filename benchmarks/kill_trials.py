"""Crash trials: SIGKILL ``qvec pack`` and ``qvec grid run`` at random moments, then count what was left behind.

    python benchmarks/kill_trials.py --trials 20            # both; prints the counts (all must be 0)
    python benchmarks/kill_trials.py --what pack --trials 5

pack: each trial starts ``qvec pack`` on a ViT-B-sized checkpoint and kills it after a random delay, then checks
that the output is absent or whole, and that the next pack to the same path leaves no temporary file.
grid: one tiny synthetic study is run to completion once (the reference); then the same study is started in a
fresh folder and killed after a random delay, ``--trials`` times, each restart resuming the last, and finally run
to completion. Lost rows (reference results missing), extra rows, differing values, jobs executed twice, and
temporary files left are counted.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def qvec(*args: str) -> list[str]:
    return [sys.executable, "-m", "qvec", *args]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


def kill_after(cmd: list[str], delay: float) -> bool:
    """Start ``cmd``, SIGKILL it after ``delay`` s; False when it finished first."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def pack_trials(root: Path, trials: int, rng: random.Random) -> dict[str, int]:
    from qvec.models import ModelSpec, build_model, checkpoint_from_model

    spec = ModelSpec.parse("timm:vit_base_patch16_224", num_classes=10)
    src = checkpoint_from_model(build_model(spec), spec, **{"qvec.task": "x"}).save(root / "vitb.safetensors")
    t0 = time.perf_counter()
    subprocess.run(qvec("pack", str(src), "--bits", "3", "-o", str(root / "ref.safetensors")), env=ENV, check=True,
                   stdout=subprocess.DEVNULL)
    full = time.perf_counter() - t0
    counts = {"killed": 0, "torn outputs": 0, "temp files after the next write": 0}
    out = root / "out" / "packed.safetensors"
    out.parent.mkdir()
    for _ in range(trials):
        out.unlink(missing_ok=True)
        counts["killed"] += kill_after(qvec("pack", str(src), "--bits", "3", "-o", str(out)),
                                       rng.uniform(0.2, full * 1.1))
        if out.exists() and out.read_bytes() != (root / "ref.safetensors").read_bytes():
            counts["torn outputs"] += 1
        subprocess.run(qvec("pack", str(src), "--bits", "3", "-o", str(out)), env=ENV, check=True,
                       stdout=subprocess.DEVNULL)
        counts["temp files after the next write"] += len(temp_files(out.parent))
    print(f"pack: one uninterrupted pack takes {full:.1f} s; kill delays uniform in [0.2, {full * 1.1:.1f}] s")
    return counts


def _table(db: Path) -> dict[str, float]:
    with sqlite3.connect(db) as con:
        return {k: v for k, v in con.execute("SELECT key, value FROM results")}


def _job_runs(db: Path) -> Counter:
    with sqlite3.connect(db) as con:
        return Counter(k for (k,) in con.execute("SELECT key FROM jobs"))


def grid_trials(root: Path, trials: int, rng: random.Random) -> dict[str, int]:
    from qvec.data.synthetic import write_suite

    data = write_suite(root / "data", tasks=["syn_glyphs", "syn_shapes"], n_train=300, n_test=80, n_pretrain=300)
    config = root / "tiny.toml"
    config.write_text(f'''name = "tiny"
model = "qvec:vit-nano"
data_dir = "{data}"
tasks = ["syn_glyphs", "syn_shapes"]
bits = [3]
lambdas = [0.5, 1.0]
[pretrain]
data = "pretrain_synthetic.npz"
epochs = 2
train_limit = 192
batch_size = 64
warmup_steps = 1
[recipe]
epochs = 2
train_limit = 128
batch_size = 64
warmup_steps = 1
''')

    def run_cmd(folder: Path) -> list[str]:
        return qvec("grid", "run", str(config), "--db", str(folder / "k.db"), "--artifacts",
                    str(folder / "artifacts"), "--workers", "2", "--threads", "1", "--quiet")

    t0 = time.perf_counter()
    subprocess.run(run_cmd(root / "ref"), env=ENV, check=True, stdout=subprocess.DEVNULL)
    full = time.perf_counter() - t0
    killed_dir = root / "killed"
    kills = 0
    for _ in range(trials):
        kills += kill_after(run_cmd(killed_dir), rng.uniform(2.0, max(3.0, full / 4)))
    subprocess.run(run_cmd(killed_dir), env=ENV, check=True, stdout=subprocess.DEVNULL)
    ref, got = _table(root / "ref" / "k.db"), _table(killed_dir / "k.db")
    runs = _job_runs(killed_dir / "k.db")
    print(f"grid: one uninterrupted run takes {full:.1f} s; {kills} of {trials} starts were killed before the end")
    return {"lost rows": len(set(ref) - set(got)), "extra rows": len(set(got) - set(ref)),
            "differing values": sum(1 for k in set(ref) & set(got) if ref[k] != got[k]),
            "jobs executed twice": sum(1 for n in runs.values() if n > 1),
            "temp files left": len(temp_files(killed_dir))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--what", choices=("pack", "grid", "both"), default="both")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for what, fn in (("pack", pack_trials), ("grid", grid_trials)):
            if args.what in (what, "both"):
                (root / what).mkdir()
                counts = fn(root / what, args.trials, rng)
                print(f"{what}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
                bad += sum(v for k, v in counts.items() if k != "killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

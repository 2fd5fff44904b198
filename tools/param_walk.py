"""Follow a grid job's parameters through the code that runs it, and count the modules they visit.

    python tools/param_walk.py [--workdir DIR]

It builds a tiny study on the generated demo suite (vit-nano, one short epoch per training), runs its training and
vector jobs, then runs one job of each evaluation kind (``baseline``, ``cells``) under a profiler hook that records
every qvec function called with the job, its ``params`` mapping or one of the mappings and lists inside it as an
argument. It prints, per job kind, the modules in the order the parameters entered them, how many distinct
modules that is, and how many times the walk came back to a module it had already left (A -> B -> A is one
return). docs/extending.md gives the figures. Nothing is written outside ``--workdir`` (default: a temp folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import qvec

SRC = str(Path(qvec.__file__).resolve().parent)


def _tracked(job) -> set[int]:
    """Ids of the job, its params and the containers inside them (scalars are shared by identity: left out)."""
    ids = {id(job), id(job.params)}
    stack = list(job.params.values())
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            ids.add(id(v))
            stack += list(v.values())
        elif isinstance(v, list):
            ids.add(id(v))
            stack += v
    return ids


def walk(job, execute) -> list[str]:
    """Run ``execute(job)`` and return the qvec modules, in call order, of the calls that received the job's data."""
    ids = _tracked(job)
    seen: list[str] = []

    def hook(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(SRC):
            return
        code = frame.f_code
        args = [frame.f_locals.get(n) for n in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]]
        if any(id(a) in ids for a in args if a is not None):
            mod = frame.f_globals.get("__name__", "?")
            if not seen or seen[-1] != mod:
                seen.append(mod)

    sys.setprofile(hook)
    try:
        execute(job)
    finally:
        sys.setprofile(None)
    return seen


def returns(modules: list[str]) -> int:
    """How many times the walk enters a module it had already left."""
    return sum(1 for i, m in enumerate(modules) if m in modules[:i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    from qvec.data.synthetic import write_suite
    from qvec.grid.config import load_config
    from qvec.grid.jobs import execute_job
    from qvec.grid.plan import build_plan

    root = args.workdir or Path(tempfile.mkdtemp(prefix="qvec-walk-"))
    root.mkdir(parents=True, exist_ok=True)
    tasks = ["syn_glyphs", "syn_shapes"]
    write_suite(root / "data", tasks=tasks, n_train=256, n_test=64, n_pretrain=256)
    (root / "walk.toml").write_text(f"""
name = "walk"
model = "qvec:vit-nano"
data_dir = "{root / 'data'}"
tasks = {tasks!r}
bits = [3]
lambdas = [0.5, 1.0]
self_pairs = false
[pretrain]
data = "pretrain_synthetic.npz"
epochs = 1
train_limit = 128
batch_size = 64
warmup_steps = 1
[recipe]
epochs = 1
train_limit = 128
batch_size = 64
warmup_steps = 1
[eval]
val_limit = 24
test_limit = 32
batch_size = 32
[rules]
use = ["agree"]
probe = "pretrain_synthetic.npz"
probe_size = 16
""".replace("'", '"'))
    plan = build_plan(load_config(root / "walk.toml"), root / "artifacts")
    for job in plan.jobs:
        if job.kind in ("pretrain", "finetune", "vector"):
            execute_job(job)
    for kind in ("baseline", "cells"):
        job = next(j for j in plan.jobs if j.kind == kind and (kind != "baseline" or j.params.get("quant")))
        mods = walk(job, execute_job)
        print(f"{kind} job {job.id}: {len(set(mods))} modules, {returns(mods)} returns")
        print("  " + " -> ".join(m.removeprefix("qvec.") for m in mods))


if __name__ == "__main__":
    main()

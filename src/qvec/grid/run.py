"""The grid driver: plan, skip what is done, run the rest on an executor, record every output.

Crash safety comes from three rules. (1) A training or vector job is done when its content-addressed artifact
exists; artifacts are renamed into place atomically, and an interrupted training resumes from its per-epoch state
file. (2) An evaluation job is done when all of its result rows are in the database; a job's rows are written in
the same SQLite transaction as its entry in the execution log, so after a ``kill -9`` either both are there or
neither is. (3) Rows are keyed by content and inserted idempotently. So a restarted run loses no finished result,
repeats no finished job, and ends with the same rows as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from qvec.core.atomic import check_output, make_folder
from qvec.core.checkpoint import atomic_path
from qvec.core.errors import QvecError
from qvec.core.schema import (
    META_FINGERPRINT,
    META_INCLUDE_IN_PROJ,
    META_KIND,
    META_MODEL,
    META_QUANT,
    META_RECIPE,
    META_TASK,
    META_TRAIN_SECONDS,
)
from qvec.grid.config import GridConfig
from qvec.grid.executors import Executor, make_executor
from qvec.grid.jobs import JobOutput, candidate_keys, is_artifact, job_result_keys, missing_keys
from qvec.grid.lock import StudyLock
from qvec.grid.plan import Job, Plan, build_plan
from qvec.grid.store import JobRecord, ResultStore, Training
from qvec.models import ModelSpec
from qvec.quant import QuantSpec
from qvec.train.recipe import Recipe


@dataclass
class RunSummary:
    """What a run did: planned jobs, those already done, those executed now, new rows and time."""

    study: str
    db: str
    artifacts: str
    planned: dict[str, int]
    skipped: int = 0
    executed: int = 0
    new_rows: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    job_seconds: dict[str, float] = field(default_factory=dict)


def _lookup(store: ResultStore) -> Callable:
    return lambda keys: {k: r.value for k, r in store.existing(keys).items()}


def job_status(plan: Plan, store: ResultStore) -> dict[str, str]:
    """``done`` or ``pending`` for every job of the plan (what ``qvec grid plan --db`` shows)."""
    lookup = _lookup(store)
    status = {}
    for job in plan.jobs:
        if is_artifact(job):
            done = Path(job.params["out"]).is_file()
        else:
            done = missing_keys(job, lookup) == []
        status[job.id] = "done" if done else "pending"
    return status


def run_grid(
    config: GridConfig,
    *,
    db: str | Path,
    artifacts: str | Path,
    executor: Executor | None = None,
    log: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run (or resume) the study ``config``: every job not yet done, on ``executor`` (default: local workers)."""
    executor = executor or make_executor("local")
    plan = build_plan(config, artifacts)
    check_output(db)  # a database is a regular file or a new one, like every output
    make_folder(Path(db).parent)
    make_folder(plan.artifacts.root)
    lock = StudyLock(db, config.name).acquire()  # a second runner of this study stops here, before any work
    try:
        store = ResultStore(db)
    except BaseException:
        lock.release()
        raise
    say = log or (lambda _msg: None)
    summary = RunSummary(config.name, str(store.path), str(plan.artifacts.root), plan.counts())
    t0 = time.perf_counter()
    try:
        store.register_study(config.name, config.to_dict())
        lookup = _lookup(store)
        status = job_status(plan, store)
        pending: list[Job] = [j for j in plan.jobs if status[j.id] == "pending"]
        for job in plan.jobs:  # rows measured earlier (or by another study) become part of this study
            if status[job.id] == "done" and not is_artifact(job):
                store.link_results(config.name, job_result_keys(job, lookup) or [])
        summary.skipped = len(plan.jobs) - len(pending)
        say(f"study {config.name}: {len(plan.jobs)} jobs planned, {summary.skipped} already done, "
            f"{len(pending)} to run on {executor.name}")

        def dispatch(job: Job) -> Job:
            if is_artifact(job):
                return job
            return replace(job, params={**job.params, "known": lookup(candidate_keys(job))})

        cells = [j for j in plan.jobs if j.kind == "cells"]
        lock.update(jobs_done=summary.skipped, jobs_total=len(plan.jobs), cells_total=len(cells),
                    cells_done=sum(status[j.id] == "done" for j in cells))
        on_done = _Recorder(config.name, store, lookup, summary, say, len(pending), lock)
        executor.run(pending, dispatch, on_done)
    finally:
        try:
            plan.artifacts.link_by_name({j.id: Path(j.params["out"]) for j in plan.jobs
                                         if is_artifact(j) and j.params.get("out")}, config.name)
            _record_trainings(plan, store)
            summary.seconds = time.perf_counter() - t0
            store.close()
        finally:
            lock.release()
    return summary


@dataclass
class _Recorder:
    """What happens as each job finishes: its record and rows are stored and linked to the study, and a line is
    said (``[3/40] cells w3 mnist -> gtsrb: 41.2s, 14 rows``)."""

    study: str
    store: ResultStore
    lookup: Callable
    summary: RunSummary
    say: Callable[[str], None]
    total: int
    lock: StudyLock | None = None
    handled: int = 0

    def __call__(self, job: Job, out: JobOutput) -> None:
        self.handled += 1
        if self.lock is not None:
            info = self.lock.info
            self.lock.update(jobs_done=info.jobs_done + 1, cells_done=info.cells_done + (job.kind == "cells"))
        p, summary = job.params, self.summary
        label = p.get("label", job.id)
        if out.reused:  # another process finished the artifact first: nothing was executed here
            summary.skipped += 1
            self.say(f"[{self.handled}/{self.total}] {label}: already done elsewhere")
            return
        rec = JobRecord(key=job.key, kind=job.kind, label=label, study=self.study,
                        task=p.get("receiver") or p.get("task", ""), bits=p.get("bits"), seconds=out.seconds,
                        results=len(out.results), worker=out.worker)
        summary.new_rows += self.store.add_job(rec, out.results, self.study)
        if not is_artifact(job):
            self.store.link_results(self.study, job_result_keys(job, self.lookup) or [])
        summary.executed += 1
        summary.eval_seconds += out.eval_seconds
        summary.job_seconds[job.kind] = summary.job_seconds.get(job.kind, 0.0) + out.seconds
        rows = f", {len(out.results)} rows" if out.results else ""
        self.say(f"[{self.handled}/{self.total}] {label}: {out.seconds:.1f}s{rows}")


def _train_seconds(path: Path) -> float | None:
    """The training time a checkpoint's header records (``qvec.train_seconds``), without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_TRAIN_SECONDS)
        return float(raw) if raw is not None else None
    except (OSError, ValueError, RuntimeError):
        return None


def _record_trainings(plan: Plan, store: ResultStore) -> None:
    """Note every finished training artifact of the plan with its training time (for the report's cost table)."""
    rows = []
    for job in plan.jobs:
        if job.kind not in ("pretrain", "finetune"):
            continue
        out = Path(job.params["out"])
        secs = _train_seconds(out) if out.is_file() else None
        if secs is not None:
            qat = job.params.get("qat")
            rows.append(Training(plan.config.name, job.key, "qat" if qat else job.kind, job.params.get("task", ""),
                                 job.params.get("bits"), int(job.params.get("seed") or 0), secs,
                                 str(QuantSpec.from_dict(qat)) if qat else ""))
    if rows:
        store.add_trainings(rows)


def _header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError) as e:
        raise QvecError(f"{path}: not a readable safetensors checkpoint ({str(e).splitlines()[0]})") from None


def _theta0_fingerprint(plan: Plan) -> str | None:
    """The backbone fingerprint every FT/QAT of the plan must carry (None while theta_0 is not there yet)."""
    cfg = plan.config
    if cfg.backbone == "hub":
        raise QvecError("adopting checkpoints needs a theta_0 file (backbone = 'pretrain' or a path), not 'hub'")
    if cfg.backbone == "pretrain":
        path = Path(next(j for j in plan.jobs if j.kind == "pretrain").params["out"])
    else:
        path = cfg.resolve_path(cfg.backbone)
    return _header(path).get(META_FINGERPRINT) if path.is_file() else None


def _same_json(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and json.loads(a) == json.loads(b)
    except ValueError:
        return False


def _matches(job: Job, meta: dict[str, str], theta0_fp: str | None) -> bool:
    """Does a checkpoint header record exactly this training job's inputs?"""
    p = job.params
    want, have = ModelSpec.from_json(p["model"]), meta.get(META_MODEL)
    if have is None:
        return False
    have_spec = ModelSpec.from_json(have)
    if (have_spec.family, have_spec.name, have_spec.options) != (want.family, want.name, want.options):
        return False
    if META_RECIPE not in meta or Recipe.from_json(meta[META_RECIPE]) != Recipe.from_json(p["recipe"]):
        return False  # compared as recipes: a header written before a field existed has that field's default
    if job.kind == "pretrain":
        return meta.get(META_KIND) == "pretrained" and meta.get(META_TASK) == f"pretrain:{Path(p['data_file']).stem}"
    kind = "qat" if p["qat"] else "ft"
    if meta.get(META_KIND) != kind or meta.get(META_TASK) != p["task"]:
        return False
    if theta0_fp is None or meta.get(META_FINGERPRINT) != theta0_fp:
        return False
    if p["qat"]:
        return _same_json(meta.get(META_QUANT), json.dumps(p["qat"])) and _same_json(
            meta.get(META_INCLUDE_IN_PROJ), json.dumps(p["include_in_proj"]))
    return True


def adopt_checkpoints(config: GridConfig, artifacts: str | Path, files: list[str | Path]) -> list[tuple[Path, str]]:
    """Put checkpoints trained outside the grid (``qvec pretrain`` / ``qvec finetune``) where the plan expects them.

    A file is adopted only when its header records exactly a training job's inputs: model, kind, task,
    quantizer, recipe (field by field) and, for FT/QAT, the fingerprint of this plan's theta_0. So adopting never
    changes what the grid computes; it only saves recomputing it. The task's data file is not recorded in a
    header: adopt only checkpoints trained on the same data folder. Returns (file, job id) pairs; a file that
    matches no job is a QvecError.
    """
    plan = build_plan(config, artifacts)
    training = [j for j in plan.jobs if j.kind in ("pretrain", "finetune")]
    metas = {Path(f): _header(Path(f)) for f in files}
    # theta_0 first: the FT/QAT checks need its fingerprint.
    order = sorted(metas, key=lambda f: metas[f].get(META_KIND) != "pretrained")
    adopted = []
    for f in order:
        theta0_fp = _theta0_fingerprint(plan)
        job = next((j for j in training if _matches(j, metas[f], theta0_fp)), None)
        if job is None:
            raise QvecError(f"{f}: its header matches no training job of study {config.name!r} (model, kind, task, "
                            "quantizer, recipe and theta_0 must all be the grid's)")
        out = Path(job.params["out"])
        if not out.is_file():
            plan.artifacts.write_info(job.kind, job.key, {"label": job.params["label"], "adopted_from": str(f)})
            with atomic_path(out) as tmp:
                shutil.copyfile(f, tmp)
        adopted.append((f, job.id))
    return adopted


def default_paths(config: GridConfig, workdir: str | Path | None = None) -> tuple[Path, Path]:
    """Default database and artifact folder: ``<workdir>/<study>.db`` and ``<workdir>/artifacts`` (workdir
    defaults to ``runs/`` in the current folder)."""
    root = Path(workdir) if workdir is not None else Path("runs")
    return root / f"{config.name}.db", root / "artifacts"

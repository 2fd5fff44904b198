"""Executors: run a list of jobs with dependencies, handing every output to the driver as soon as it is ready.

* ``local`` (default): a pool of single-threaded worker processes on this machine, one per usable CPU (at most
  4; ``--workers``). With one worker it runs jobs in this process, one after another.
* ``ray``: one Ray task per job on a Ray cluster (a local one it starts itself, or ``--address``); a task whose
  worker process dies is retried by Ray (``max_retries``). The artifact folder must be on a filesystem every
  worker sees (trivially true for a one-machine cluster).

Why processes with one thread each rather than one process with all threads: a grid is hundreds of independent
jobs, and intra-op threading of the many small tensor operations (the patch, the RTN pass, attention on 65
tokens) scales poorly and collapses when the cores are shared: OpenMP barriers stall when a core is taken, so a
multi-threaded process ends up far slower than single-threaded workers (the timings are in docs/grid.md,
"Executors").

Both parallel executors share one scheduling loop: a job is submitted when every job it depends on has
finished; outputs return to the driver, which alone writes the database, so results are written once. Plan order
is kept among ready jobs, so evaluation cells of one receiver tend to land on the same warm worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from qvec.core.errors import QvecError
from qvec.core.limits import check_count, check_workers, max_threads
from qvec.core.progress import stderr_is_terminal
from qvec.grid.jobs import JobOutput, execute_job
from qvec.grid.monitor import JobMonitor
from qvec.grid.plan import Job
from qvec.grid.workerinit import die_with_parent

Dispatch = Callable[[Job], Job]
OnDone = Callable[[Job, JobOutput], None]
Runner = Callable[..., JobOutput]
TRAINING_KINDS = ("pretrain", "finetune")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Executor:
    """Runs jobs; ``dispatch`` finalises a job just before it starts, ``on_done`` receives each output."""

    name = "base"

    def run(self, jobs: Sequence[Job], dispatch: Dispatch, on_done: OnDone) -> None:
        raise NotImplementedError


class LocalExecutor(Executor):
    """Sequential, in this process, with torch's current threads. ``progress`` shows training progress bars."""

    name = "local"

    def __init__(self, progress: bool = False, runner: Runner = execute_job) -> None:
        self.progress = progress
        self.runner = runner

    def run(self, jobs: Sequence[Job], dispatch: Dispatch, on_done: OnDone) -> None:
        ids = {j.id for j in jobs}
        done: set[str] = set()
        for job in jobs:
            missing = [d for d in job.deps if d in ids and d not in done]
            if missing:
                raise QvecError(f"job {job.id} was scheduled before its dependency {missing[0]}")
            on_done(job, self.runner(dispatch(job), progress=self.progress and job.kind in TRAINING_KINDS))
            done.add(job.id)


class ParallelExecutor(Executor):
    """The dependency-respecting scheduling loop shared by the process pool and Ray."""

    slots: int = 1  # jobs that can run at once
    cpus: int = 1
    threads: int | None = None  # torch threads of every job (None: the rule of threads_for)
    monitor = None  # a JobMonitor showing the jobs in flight, or None

    def threads_for(self, job: Job) -> int:
        """Torch threads of a job: every CPU for pretraining, which always runs alone (everything waits for it),
        else an equal share (1 with one worker per CPU). On idle cores a training step gains from a second
        thread, but on busy shared cores a second thread is several times slower (docs/grid.md, "Executors"), which
        is why every other job gets one. A fixed rule, not the current load, also means a resumed run trains with
        the threads of an uninterrupted one, so its weights (and table) are identical."""
        if self.threads is not None:
            return self.threads
        return self.cpus if job.kind == "pretrain" else max(1, self.cpus // self.slots)

    def _start(self) -> None: ...

    def _stop(self) -> None: ...

    def _submit(self, job: Job, threads: int):
        raise NotImplementedError

    def _running(self, handle) -> bool:
        """Whether a submitted job has started (queued ones get no progress bar)."""
        return True

    def _wait(self, handles: list) -> list[tuple[object, JobOutput | None, BaseException | None]]:
        """Wait until a handle is finished (at most a second when a monitor is shown); return (handle, output,
        error) for the finished ones."""
        raise NotImplementedError

    def run(self, jobs: Sequence[Job], dispatch: Dispatch, on_done: OnDone) -> None:
        if not jobs:
            return
        self._start()
        try:
            self._loop(jobs, dispatch, on_done)
        finally:
            if self.monitor is not None:
                self.monitor.close()
            self._stop()

    def _loop(self, jobs: Sequence[Job], dispatch: Dispatch, on_done: OnDone) -> None:
        ids = {j.id for j in jobs}
        pending = list(jobs)
        done: set[str] = set()
        in_flight: dict = {}
        failures: list[tuple[Job, BaseException]] = []
        while pending or in_flight:
            ready = [j for j in pending if all(d not in ids or d in done for d in j.deps)]
            for job in ready:
                in_flight[self._submit(dispatch(job), self.threads_for(job))] = job
            if ready:
                taken = {j.id for j in ready}
                pending = [j for j in pending if j.id not in taken]
            if not in_flight:
                break  # everything left depends on a failed job
            if self.monitor is not None:
                self.monitor.update([j for h, j in in_flight.items() if self._running(h)])
            for handle, out, error in self._wait(list(in_flight)):
                job = in_flight.pop(handle)
                if error is not None:
                    failures.append((job, error))
                    continue
                on_done(job, out)
                done.add(job.id)
        if failures:
            job, err = failures[0]
            cause = getattr(err, "cause", None) or err
            first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            skipped = f", {len(pending)} dependent jobs not run" if pending else ""
            raise QvecError(f"{len(failures)} job(s) failed on the {self.name} executor (first: {job.id}: {first})"
                            f"{skipped}; finished results are saved, rerun to continue")


def _call_runner(runner: Runner, job: Job, threads: int | None = None) -> JobOutput:
    """Run one job with ``runner`` in a worker process, with ``threads`` torch threads."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return runner(job)


class PoolExecutor(ParallelExecutor):
    """``workers`` single-threaded processes on this machine (``spawn``ed: safe with torch's thread pools)."""

    name = "local"

    def __init__(self, workers: int, runner: Runner = execute_job, threads: int | None = None) -> None:
        self.threads = threads
        self.slots = workers
        self.cpus = max(workers, usable_cpus())
        self.runner = runner
        self._pool = None

    def _start(self) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(self.slots, mp_context=mp.get_context("spawn"), initializer=die_with_parent,
                                         initargs=(os.getpid(),))

    def _stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, job: Job, threads: int):
        return self._pool.submit(_call_runner, self.runner, job, threads)

    def _running(self, handle) -> bool:
        return handle.running()

    def _wait(self, handles: list):
        from concurrent.futures import FIRST_COMPLETED, wait

        finished, _ = wait(handles, timeout=1.0 if self.monitor is not None else None, return_when=FIRST_COMPLETED)
        return [(f, None if f.exception() else f.result(), f.exception()) for f in finished]


class RayExecutor(ParallelExecutor):
    """Parallel on Ray: one task per job (``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs each), retried
    ``max_retries`` times if its worker dies. Starts a local cluster (``num_cpus`` CPUs) unless ``address`` names
    one or Ray is already up."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_job: float = 1,
        max_retries: int = 3,
        runner: Runner = execute_job,
        gpus_per_job: float = 0,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_job = cpus_per_job
        self.gpus_per_job = gpus_per_job
        self.max_retries = max_retries
        self.runner = runner
        self._ray = None
        self._started = False

    def _start(self) -> None:
        try:
            import ray
        except ImportError:
            raise QvecError("the Ray executor needs ray: pip install 'qvec[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            kw: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if self.address:
                kw["address"] = self.address
            else:  # "local": always a fresh cluster here, never a stale one found through /tmp/ray
                kw["address"] = "local"
                if self.num_cpus:
                    kw["num_cpus"] = self.num_cpus
            try:
                ray.init(**kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = self.address or "a local cluster"
                raise QvecError(f"could not start or reach Ray at {where} ({str(e).splitlines()[0]})") from None
            self._started = True
        res = ray.cluster_resources()
        self.slots = max(1, int(res.get("CPU", 1) // self.cpus_per_job))
        if self.gpus_per_job:  # GPU jobs (training on a cluster of GPU nodes): as many at once as GPUs allow
            self.slots = max(1, min(self.slots, int(res.get("GPU", 0) // self.gpus_per_job)))
        self._remote = ray.remote(
            num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job, max_retries=self.max_retries
        )(_call_runner)

    def _stop(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def _submit(self, job: Job, threads: int):
        # Ray already pins each task to its CPUs (OMP_NUM_THREADS); no thread hint across a cluster.
        return self._remote.remote(self.runner, job)

    def _wait(self, handles: list):
        finished, _ = self._ray.wait(handles, num_returns=1, timeout=1.0 if self.monitor is not None else None)
        out = []
        for ref in finished:
            try:
                out.append((ref, self._ray.get(ref), None))
            except Exception as e:  # the job raised, or its worker died more than max_retries times
                out.append((ref, None, e))
        return out


def default_workers() -> int:
    """Local workers by default: one per usable CPU, at most 4 (each holds a model and cached splits)."""
    return max(1, min(4, usable_cpus()))


def make_executor(name: str, *, address: str | None = None, num_cpus: int | None = None,
                  workers: int | None = None, progress: bool = False, gpus_per_job: float = 0,
                  threads: int | None = None) -> Executor:
    """An executor by name: ``local`` (``workers`` processes; 1 = in this process) or ``ray``.

    ``progress`` shows training progress: bars of the running jobs when stderr is a terminal. ``threads`` fixes
    the torch threads of every local job (default: every CPU for pretraining, an equal share otherwise).
    ``gpus_per_job`` (Ray only) reserves GPUs for each job; jobs then train and evaluate on their GPU.
    """
    if threads is not None:
        check_count(threads, "--threads", 1, max_threads())
    if workers is not None:
        check_workers(workers)
    if name == "local":
        if address:
            raise QvecError("--address is only for --executor ray")
        n = default_workers() if workers is None else workers
        if n == 1:
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            return LocalExecutor(progress=progress)
        ex = PoolExecutor(n, threads=threads)
    elif name == "ray":
        if threads is not None:
            raise QvecError("--threads is for the local executor; Ray pins each job to its CPUs")
        ex = RayExecutor(address=address, num_cpus=num_cpus or workers, gpus_per_job=gpus_per_job)
    else:
        raise QvecError(f"unknown executor {name!r}; choose local or ray")
    if progress:
        ex.monitor = JobMonitor(lines=not stderr_is_terminal())
    return ex

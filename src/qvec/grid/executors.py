"""Executors: run a list of jobs with dependencies, handing every output to the driver as soon as it is ready.

* :class:`LocalExecutor` (default) runs jobs one after another in this process, in plan order (which is a
  topological order, with evaluation cells grouped by receiver so the model and data stay hot).
* :class:`RayExecutor` runs independent jobs in parallel on a Ray cluster (a local one it starts itself, or
  ``address``). Dependencies are respected by submitting a job only when every job it depends on has finished;
  outputs come back to the driver, which alone writes the database (results are written once); a task whose
  worker process dies is retried by Ray (``max_retries``). The artifact folder must be on a filesystem every
  worker sees (trivially true for a one-machine cluster).

Both take a ``runner`` (default :func:`qvec.grid.jobs.execute_job`) so one mechanism serves every job kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import QvecError
from .jobs import JobOutput, execute_job
from .plan import Job

Dispatch = Callable[[Job], Job]
OnDone = Callable[[Job, JobOutput], None]
Runner = Callable[..., JobOutput]
TRAINING_KINDS = ("pretrain", "finetune")


class Executor:
    """Runs jobs; ``dispatch`` finalises a job just before it starts, ``on_done`` receives each output."""

    name = "base"

    def run(self, jobs: Sequence[Job], dispatch: Dispatch, on_done: OnDone) -> None:
        raise NotImplementedError


class LocalExecutor(Executor):
    """Sequential, in-process. ``progress`` shows the training loops' own progress bars."""

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
            out = self.runner(dispatch(job), progress=self.progress and job.kind in TRAINING_KINDS)
            on_done(job, out)
            done.add(job.id)


class RayExecutor(Executor):
    """Parallel on Ray: one task per job (``cpus_per_job`` CPUs each), retried ``max_retries`` times if its
    worker dies. Starts a local cluster (``num_cpus`` CPUs) unless ``address`` names one or Ray is already up."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_job: float = 1,
        max_retries: int = 3,
        runner: Runner = execute_job,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_job = cpus_per_job
        self.max_retries = max_retries
        self.runner = runner

    def _init(self):
        try:
            import ray
        except ImportError:
            raise QvecError("the Ray executor needs ray: pip install 'qvec[ray]'") from None
        if ray.is_initialized():
            return ray, False
        kw: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if self.address:
            kw["address"] = self.address
        elif self.num_cpus:
            kw["num_cpus"] = self.num_cpus
        try:
            ray.init(**kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = self.address or "a local cluster"
            raise QvecError(f"could not start or reach Ray at {where} ({str(e).splitlines()[0]})") from None
        return ray, True

    def run(self, jobs: Sequence[Job], dispatch: Dispatch, on_done: OnDone) -> None:
        if not jobs:
            return
        ray, started = self._init()
        try:
            self._run(ray, jobs, dispatch, on_done)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, jobs: Sequence[Job], dispatch: Dispatch, on_done: OnDone) -> None:
        remote = ray.remote(num_cpus=self.cpus_per_job, max_retries=self.max_retries)(_call_runner)
        ids = {j.id for j in jobs}
        pending = list(jobs)
        done: set[str] = set()
        in_flight: dict = {}
        failures: list[tuple[Job, BaseException]] = []
        while pending or in_flight:
            ready = [j for j in pending if all(d not in ids or d in done for d in j.deps)]
            for job in ready:
                in_flight[remote.remote(self.runner, dispatch(job))] = job
            pending = [j for j in pending if j not in ready]
            if not in_flight:
                break  # everything left depends on a failed job
            finished, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in finished:
                job = in_flight.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as e:  # the job raised, or its worker died more than max_retries times
                    failures.append((job, e))
                    continue
                on_done(job, out)
                done.add(job.id)
        if failures:
            job, err = failures[0]
            cause = getattr(err, "cause", None) or err
            first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            skipped = f", {len(pending)} dependent jobs not run" if pending else ""
            raise QvecError(f"{len(failures)} job(s) failed on Ray (first: {job.id}: {first}){skipped}; "
                            "finished results are saved, rerun to continue")


def _call_runner(runner: Runner, job: Job) -> JobOutput:
    """The Ray task: run one job with ``runner`` in the worker process (a function, as Ray requires)."""
    return runner(job)


def make_executor(name: str, *, address: str | None = None, num_cpus: int | None = None,
                  progress: bool = False) -> Executor:
    """An executor by name: ``local`` or ``ray``."""
    if name == "local":
        if address:
            raise QvecError("--address is only for --executor ray")
        return LocalExecutor(progress=progress)
    if name == "ray":
        return RayExecutor(address=address, num_cpus=num_cpus)
    raise QvecError(f"unknown executor {name!r}; choose local or ray")

"""Ray execution on a local 2-worker cluster started by the test on 127.0.0.1: every job kind runs remotely with
its dependencies respected, a worker that dies is retried, and the table equals the local executor's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvec.grid import load_config, run_grid
from qvec.grid.executors import RayExecutor
from qvec.grid.jobs import execute_job
from qvec.grid.store import ResultStore

from .grid_helpers import table, write_tiny_config

ray = pytest.importorskip("ray")


class CrashFirstCells:
    """A runner whose worker process dies (``os._exit``) the first time it gets a ``cells`` job: Ray must retry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __call__(self, job, progress: bool = False):
        if job.kind == "cells" and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(job.id)
            os._exit(1)
        return execute_job(job, progress)


@pytest.fixture(scope="module")
def cluster():
    """``ray start --head --block`` on 127.0.0.1 with 2 CPUs; SIGTERM at the end shuts down what it started."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(240):  # wait until the head answers (a few seconds)
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                assert head.poll() is None, "ray start --head failed"
                time.sleep(0.5)
        assert ray.is_initialized(), "Ray head did not come up"
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.shutdown()  # the executor connects by address itself, as `--executor ray --address` does
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.terminate()
        head.wait(timeout=60)


@pytest.mark.slow
def test_ray_grid_matches_local(tmp_path, cluster):
    cfg = load_config(write_tiny_config(tmp_path))
    marker = tmp_path / "crashed"
    ray_run = run_grid(cfg, db=tmp_path / "ray.db", artifacts=tmp_path / "artifacts",
                       executor=RayExecutor(address=cluster, max_retries=2, runner=CrashFirstCells(marker)))
    assert marker.is_file(), "the crash injection never ran"
    assert ray_run.executed == 15
    with ResultStore(tmp_path / "ray.db") as store:
        rows = store.results("tiny")
        log = store.jobs("tiny")
    assert len({r.worker for r in rows}) >= 2, "both workers should have evaluated cells"
    assert len(log) == 15 and len({j.key for j in log}) == 15  # the retried job is written once

    # The local executor, on the artifacts the Ray workers trained, measures exactly the same table.
    local = run_grid(cfg, db=tmp_path / "local.db", artifacts=tmp_path / "artifacts")
    assert local.executed == 8  # baselines and cells only: every training and vector is reused
    assert table(tmp_path / "local.db") == table(tmp_path / "ray.db")

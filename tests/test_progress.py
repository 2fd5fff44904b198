"""Progress of long grid work: trainings keep a progress file that the driver's monitor shows per running job;
``--threads`` fixes the torch threads of every job."""

from __future__ import annotations

import json

import pytest

from qvec.cli import main
from qvec.core.errors import QvecError
from qvec.data.tasks import get_task
from qvec.grid.executors import PoolExecutor, make_executor
from qvec.grid.monitor import JobMonitor
from qvec.grid.plan import Job
from qvec.train.recipe import Recipe
from qvec.train.trainer import _ProgressFile, finetune, progress_path

from .tinytask import write_task


def test_progress_file_is_kept_current_and_removed(tmp_path):
    out = tmp_path / "m.safetensors"
    p = _ProgressFile(out, total=10, title="ft x", every_s=0.0)
    p.update(3, 12.5)
    assert json.loads(progress_path(out).read_text()) == {"step": 3, "total": 10, "ips": 12.5, "title": "ft x"}
    p.close()
    assert not progress_path(out).exists()


def test_training_leaves_no_progress_file(tmp_path, nano_spec):
    data = tmp_path / "data"
    write_task(data, n_train=40, n_test=8)
    out = tmp_path / "ft.safetensors"
    finetune(nano_spec, get_task("stripes", data), Recipe(lr=1e-3, warmup_steps=1, batch_size=16), out,
             progress=False)
    assert out.exists() and not progress_path(out).exists()


def test_monitor_shows_running_jobs_with_their_progress(tmp_path):
    out = tmp_path / "a.safetensors"
    _ProgressFile(out, total=40, title="ft", every_s=0.0).update(10, 5.0)
    training, cell = Job("ft/a", "finetune", "k1", params={"out": str(out)}), Job("cells/w2/a->b", "cells", "k2")
    mon = JobMonitor()
    mon.update([training, cell])
    tasks = {t.description: t for t in mon._progress.tasks}
    assert tasks["ft/a"].total == 40 and tasks["ft/a"].completed == 10
    assert tasks["cells/w2/a->b"].total is None
    mon.update([cell])  # a finished job's bar goes away
    assert [t.description for t in mon._progress.tasks] == ["cells/w2/a->b"]
    mon.close()


def test_threads_option():
    ex = make_executor("local", workers=2, threads=3)
    assert isinstance(ex, PoolExecutor) and ex.threads_for(Job("pretrain/x", "pretrain", "k")) == 3
    assert make_executor("local", workers=2).threads_for(Job("ft/x", "finetune", "k")) >= 1
    with pytest.raises(QvecError, match="--threads must be at least 1, got 0"):
        make_executor("local", workers=2, threads=0)
    with pytest.raises(QvecError, match="--threads is for the local executor"):
        make_executor("ray", threads=2)


def test_grid_run_threads_zero_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "g.toml"
    cfg.write_text('model = "qvec:vit-nano"\ntasks = ["stripes"]\nbackbone = "hub"\n')
    assert main(["grid", "run", "--threads", "0", "--workdir", str(tmp_path / "w"), "--model", "qvec:vit-nano",
                 "--tasks", "stripes"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err

"""Issue 21, item 5: two ``qvec grid run`` on one study at once. The study's lock lets one runner work; the second
is refused in one line, before any work, naming the runner that holds it. No job runs twice, and the table is the
one a single runner makes. ``qvec report`` on a study that is still running says the report is partial."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from qvec.grid.lock import StudyLock, lock_path, run_status

from .grid_helpers import TINY_TASKS, table, tiny_suite
from .hostile_helpers import qvec_env, qvec_run, snapshot
from .test_report import build_db


def _config(root: Path) -> Path:
    """The tiny study cut further: one lambda, a few dozen images per training (15 jobs, seconds each)."""
    data = tiny_suite(root)
    path = root / "duo.toml"
    path.write_text(f"""
name = "duo"
model = "qvec:vit-nano"
data_dir = "{data}"
tasks = {TINY_TASKS!r}
bits = [3]
lambdas = [1.0]

[pretrain]
data = "pretrain_synthetic.npz"
epochs = 1
train_limit = 64
batch_size = 32
warmup_steps = 1

[recipe]
epochs = 1
train_limit = 64
batch_size = 32
warmup_steps = 1

[eval]
val_limit = 16
test_limit = 16
batch_size = 32
""".replace("'", '"'))
    return path


def _run_args(config: Path, where: Path) -> list:
    return ["grid", "run", config, "--db", where / "duo.db", "--artifacts", where / "artifacts", "--workers", "1",
            "--quiet"]


def _jobs(db: Path) -> Counter:
    with sqlite3.connect(db) as con:
        return Counter(k for (k,) in con.execute("SELECT key FROM jobs"))


def test_5_two_runners_on_one_study(tmp_path):
    config = _config(tmp_path)
    both, alone = tmp_path / "both", tmp_path / "alone"
    first = subprocess.Popen([sys.executable, "-m", "qvec", *map(str, _run_args(config, both))], env=qvec_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while (info := run_status(both / "duo.db", "duo")) is None or info.jobs_total == 0:
            assert first.poll() is None, first.communicate()
            assert time.time() - t0 < 120, "the first runner never took the study's lock"
            time.sleep(0.05)
        # The first runner is paused while the second tries (a second runner can take longer to start than this
        # whole study takes to run); it holds the lock all the while, as a busy runner does.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            before = snapshot(config.parent / "data", config, both / "duo.db")
            second = qvec_run(*_run_args(config, both), cwd=tmp_path)
            after = snapshot(config.parent / "data", config, both / "duo.db")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert (second.returncode, second.stdout) == (2, ""), second
        pattern = (rf"error: study 'duo' of {re.escape(str(both / 'duo.db'))} is being run by another qvec \(pid "
                   rf"{first.pid} on \S+, since [\d-]+ [\d:]+, \d+ of 15 jobs and \d+ of 4 cells done\); wait for "
                   r"it to finish, or stop it, then rerun \(finished jobs are kept\)\n")
        assert re.fullmatch(pattern, second.stderr), second.stderr
        assert after == before  # the second runner wrote nothing: not the database, not the data
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert out.startswith("study duo: 15 jobs run, 0 already done"), out
    again = qvec_run(*_run_args(config, both), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.startswith("study duo: 0 jobs run, 15 already done"), again
    assert not lock_path(both / "duo.db", "duo").exists()

    single = qvec_run(*_run_args(config, alone), cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    runs = _jobs(both / "duo.db")
    assert max(runs.values()) == 1 and sum(runs.values()) == 15, runs
    assert table(both / "duo.db") == table(alone / "duo.db")


def test_5_report_on_a_running_study_is_partial(tmp_path):
    db = build_db(tmp_path / "hand.db")
    lock = StudyLock(db, "hand").acquire()
    try:
        lock.update(jobs_done=4, jobs_total=10, cells_done=2, cells_total=6)
        r = qvec_run("report", db, "-o", tmp_path / "rep", cwd=tmp_path)
        who = lock.info.who()
    finally:
        lock.release()
    assert r.returncode == 0, r.stderr
    note = f"study 'hand' is still running ({who}): this report is partial, 2 of 6 cells done"
    assert r.stderr.splitlines()[-1] == f"note: {note}", r.stderr
    assert f"> **Partial report.** {note}" in (tmp_path / "rep" / "report.md").read_text()
    done = qvec_run("report", db, "-o", tmp_path / "rep2", cwd=tmp_path)
    assert done.returncode == 0 and "partial" not in done.stderr + (tmp_path / "rep2" / "report.md").read_text()

"""Crash safety: a real ``qvec grid run`` killed with SIGKILL (during training, then during evaluation) and
restarted loses no finished result, repeats no finished job, and ends with the table of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from .grid_helpers import table, write_tiny_config


def _start(config: Path, root: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # same threads in every run
    cmd = [sys.executable, "-m", "qvec", "grid", "run", str(config), "--db", str(root / "k.db"),
           "--artifacts", str(root / "artifacts"), "--quiet"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False if the process ended first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the grid run neither finished nor reached the kill point in time")


def _rows(db: Path, kind: str = "patched") -> int:
    if not db.is_file():
        return 0
    try:
        con = sqlite3.connect(db, timeout=1)
        try:
            return con.execute("SELECT COUNT(*) FROM results WHERE kind = ?", (kind,)).fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # table not created yet
        return 0


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_matches_uninterrupted(tmp_path):
    config = write_tiny_config(tmp_path)
    ref, killed = tmp_path / "ref", tmp_path / "killed"

    _finish(_start(config, ref))

    trained = lambda: len(list((killed / "artifacts" / "finetune").glob("*.safetensors"))) >= 2  # noqa: E731
    assert _kill_when(_start(config, killed), trained), "run ended before the first kill point"
    assert _kill_when(_start(config, killed), lambda: _rows(killed / "k.db") >= 3), "ended before kill 2"
    out = _finish(_start(config, killed))
    assert "already done" in out

    assert table(killed / "k.db") == table(ref / "k.db")
    with sqlite3.connect(killed / "k.db") as con:
        runs = Counter(k for (k,) in con.execute("SELECT key FROM jobs"))
    repeated = [k for k, n in runs.items() if n > 1]
    assert not repeated, f"finished jobs executed twice: {repeated}"
    with sqlite3.connect(ref / "k.db") as con:
        assert sum(runs.values()) <= con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


@pytest.mark.slow
def test_kill_trials_script_counts_nothing_left_behind():
    """benchmarks/kill_trials.py (3 trials each here; 20 for the figures in docs/grid.md) exits 0 only when no
    torn output, temp file, lost, extra or differing row and no repeated job was found."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_trials.py"
    r = subprocess.run([sys.executable, str(script), "--trials", "3"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lost rows 0" in r.stdout and "temp files after the next write 0" in r.stdout

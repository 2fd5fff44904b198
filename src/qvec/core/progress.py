"""Progress that a log file can hold: plain lines, for output that is not a terminal.

On a terminal, training and grid runs draw rich progress bars. Piped into a file (``qvec demo > demo.log``), a bar
draws nothing until it ends, so a log stays silent through a pretraining of many minutes. :class:`LineProgress`
takes the bar's place there: the same calls (``add_task``, ``update``, ``remove_task``, ``start``, ``stop``, the
subset of :class:`rich.progress.Progress` qvec uses), printed as one line per task at most every
``$QVEC_PROGRESS_SECONDS`` (default 30) seconds, plus the task's last step::

    pretrain vit-nano: step 120/900 (13%), loss 2.3051, 41 img/s, 2m58s elapsed, eta 19m17s
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from qvec.core.errors import QvecError

INTERVAL_ENV = "QVEC_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def progress_interval() -> float:
    """Seconds between two lines of one task: ``$QVEC_PROGRESS_SECONDS``, else 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise QvecError(f"${INTERVAL_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def stderr_is_terminal() -> bool:
    """Whether progress on stderr can be drawn as a live bar (else it is printed as lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class _Task:
    title: str
    total: float | None
    completed: float
    fields: dict
    started: float = field(default_factory=time.monotonic)
    first: float = 0.0  # steps done when the task was added (a resumed run): not counted in the rate
    said_at: float | None = None
    said: float | None = None  # the steps the last line said


class LineProgress:
    """Progress printed as plain lines, rate-limited per task (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None, interval: float | None = None, unit: str = "step") -> None:
        self.stream = stream
        self.interval = progress_interval() if interval is None else interval
        self.unit = unit
        self._tasks: dict[int, _Task] = {}
        self._next = 0

    def start(self) -> None:
        """Nothing to draw in advance (the bar's interface)."""

    def stop(self) -> None:
        """Say every unfinished task's last state once more, then forget them."""
        for tid in list(self._tasks):
            self.remove_task(tid)

    def add_task(self, title: str, total: float | None = None, completed: float = 0, **fields) -> int:
        tid = self._next
        self._next += 1
        self._tasks[tid] = _Task(title, total, completed, dict(fields), first=completed)
        return tid

    def update(self, task_id: int, *, advance: float = 0, completed: float | None = None, total: float | None = None,
               **fields) -> None:
        t = self._tasks.get(task_id)
        if t is None:
            return
        t.completed = completed if completed is not None else t.completed + advance
        if total is not None:
            t.total = total
        t.fields.update(fields)
        now = time.monotonic()
        finished = t.total is not None and t.completed >= t.total
        if (finished and t.said != t.completed) or now - (t.said_at or t.started) >= self.interval:
            self._say(t, now)

    def remove_task(self, task_id: int) -> None:
        """Forget a task, saying its last state first when no line has said it yet."""
        t = self._tasks.pop(task_id, None)
        if t is not None and t.said != t.completed and t.completed != t.first:
            self._say(t, time.monotonic())

    def line(self, t: _Task, now: float) -> str:
        """``title: step 120/900 (13%), loss 2.3051, 41 img/s, 2m58s elapsed, eta 19m17s``."""
        elapsed = now - t.started
        parts = []
        if t.total:
            parts.append(f"{self.unit} {t.completed:g}/{t.total:g} ({100 * t.completed / t.total:.0f}%)")
        elif t.completed:
            parts.append(f"{self.unit} {t.completed:g}")
        for k, v in t.fields.items():
            text = str(v).strip()
            if text and text != "-":
                parts.append(f"{k} {text}" if k != "ips" else f"{text.removesuffix(' img/s')} img/s")
        parts.append(f"{_duration(elapsed)} elapsed")
        rate = (t.completed - t.first) / elapsed if elapsed > 0 else 0.0
        if t.total and rate > 0 and t.completed < t.total:
            parts.append(f"eta {_duration((t.total - t.completed) / rate)}")
        return f"{t.title}: {', '.join(parts)}"

    def _say(self, t: _Task, now: float) -> None:
        t.said_at, t.said = now, t.completed
        stream = self.stream or sys.stderr
        print(self.line(t, now), file=stream, flush=True)

"""What a parallel grid shows while it runs: one live progress bar per running job (rich, on a terminal).

Worker processes cannot draw on the driver's terminal, so each training keeps a small progress file beside its
output (:func:`qvec.train.progress_path`); the driver reads those of the running jobs about once a second. Jobs
without one (evaluation cells, vectors) show their name and elapsed time. When the output is not a terminal the
same progress is printed as plain lines, at most one per job every ``$QVEC_PROGRESS_SECONDS`` (a log of a long
pretraining is not silent), beside the grid's one line per finished job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from qvec.grid.plan import Job
from qvec.train.trainer import progress_path


class JobMonitor:
    """Rich progress bars for the jobs in flight; ``update`` adds, advances and removes them."""

    def __init__(self, lines: bool = False) -> None:
        """``lines``: plain progress lines (:class:`qvec.core.progress.LineProgress`), for a log file or pipe."""
        self._bars: dict[str, int] = {}
        self._started = False
        if lines:
            from qvec.core.progress import LineProgress

            self._progress = LineProgress()
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[ips]}"), TimeElapsedColumn(), TextColumn("eta"),
                                  TimeRemainingColumn(), console=Console(stderr=True), transient=True)

    def update(self, running: Sequence[Job]) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        ids = {j.id for j in running}
        for jid in [j for j in self._bars if j not in ids]:
            self._progress.remove_task(self._bars.pop(jid))
        for job in running:
            info = _read_progress(job)
            if job.id not in self._bars:
                self._bars[job.id] = self._progress.add_task(job.id, total=info.get("total") if info else None,
                                                             ips="")
            if info:
                self._progress.update(self._bars[job.id], total=info["total"], completed=info["step"],
                                      ips=f"{info['ips']:.0f} img/s")
            else:
                self._progress.update(self._bars[job.id])  # a line mode heartbeat for jobs without steps

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False


def _read_progress(job: Job) -> dict | None:
    out = job.params.get("out")
    if not out:
        return None
    p = progress_path(Path(out))
    try:
        info = json.loads(p.read_text())
        if not isinstance(info, dict) or not {"step", "total", "ips"} <= set(info):
            return None
        return info if time.time() - p.stat().st_mtime < 3600 else None
    except (OSError, ValueError):  # not written yet, or being replaced
        return None

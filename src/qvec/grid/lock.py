"""One runner per study: a second ``qvec grid run`` of a study that is running is refused in one line.

Two runners of one study would both see the same jobs pending and run each of them twice (the database stays
consistent, since rows are keyed by content, but every job's time is spent twice and the second run reports
"0 new results"). So :func:`qvec.grid.run_grid` holds an exclusive lock on the study for the whole run: an
``flock`` on ``.<db name>.<study>.lock`` beside the database. A second runner that cannot take it stops at once,
before any work, naming the runner that holds it (pid, host, start, jobs done). The kernel drops the lock when its
process ends, however it ends (``kill -9`` included), so a crashed run never blocks the next one; the file itself
is removed when a run ends normally. Different studies in one database run side by side.

The lock file also carries the run's progress (jobs and cells done), which :func:`run_status` reads: ``qvec
report`` on a study that is still running says that its report is partial, and how many cells it has.

``flock`` is advisory and local: runners on different hosts that share the database over NFS do not see each
other's lock (run a shared study from one host, or with Ray from one driver).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qvec.core.atomic import file_kind
from qvec.core.errors import QvecError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (docs/grid.md, "Crash safety")
    fcntl = None  # type: ignore[assignment]


@dataclass
class RunInfo:
    """Who runs a study and how far it is."""

    study: str
    pid: int
    host: str
    started: float
    jobs_done: int = 0
    jobs_total: int = 0
    cells_done: int = 0
    cells_total: int = 0

    def who(self) -> str:
        """``pid 4242 on node1, since 2026-12-07 11:51:18``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, since {since}"

    def describe(self) -> str:
        """Who runs the study, and how far it is."""
        return (f"{self.who()}, {self.jobs_done} of {self.jobs_total} jobs and {self.cells_done} of "
                f"{self.cells_total} cells done")


def lock_path(db: str | os.PathLike, study: str) -> Path:
    """The lock file of ``study`` in the database ``db``: beside it, hidden."""
    db = Path(db)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study)  # a name, never a path
    return db.parent / f".{db.name}.{safe}.lock"


def _read(path: Path) -> RunInfo | None:
    try:
        data = json.loads(path.read_text() or "{}")
        return RunInfo(**data) if data else None
    except (OSError, ValueError, TypeError):
        return None


def _flock_soon(fd: int, tries: int = 10) -> bool:
    """An exclusive lock within about a second (a report reading the progress holds it shared for a moment)."""
    for i in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if i + 1 < tries:
                time.sleep(0.1)
    return False


class StudyLock:
    """The exclusive lock of one study of a database, held while a runner works on it (a context manager)."""

    def __init__(self, db: str | os.PathLike, study: str) -> None:
        self.path = lock_path(db, study)
        self.db = Path(db)
        self.info = RunInfo(study, os.getpid(), socket.gethostname(), time.time())
        self._fd: int | None = None

    def acquire(self) -> StudyLock:
        """Take the lock, or raise a one-line QvecError naming the runner that holds it."""
        if fcntl is None:
            return self
        while True:
            kind = file_kind(self.path)
            if kind is not None:  # never open (a FIFO blocks) or later unlink what is not our regular file
                raise QvecError(f"{self.path}: the study's lock file is {kind}, not a regular file; remove it")
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as e:
                raise QvecError(f"{self.path}: cannot create the study's lock file ({e.strerror})") from None
            if not _flock_soon(fd):
                os.close(fd)
                other = _read(self.path)
                who = other.describe() if other else "another process"
                raise QvecError(f"study {self.info.study!r} of {self.db} is being run by another qvec ({who}); "
                                "wait for it to finish, or stop it, then rerun (finished jobs are kept)") from None
            # The holder before us may have removed the file after we opened it: lock the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                self._write()
                return self
            os.close(fd)

    def update(self, **progress: int) -> None:
        """Record the run's progress (``jobs_done``, ``jobs_total``, ``cells_done``, ``cells_total``)."""
        for k, v in progress.items():
            setattr(self.info, k, int(v))
        self._write()

    def _write(self) -> None:
        if self._fd is None:
            return
        data = json.dumps(asdict(self.info)).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:
            pass  # progress is a courtesy; the lock itself holds

    def release(self) -> None:
        """Remove the lock file (while still holding it) and release the lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_status(db: str | os.PathLike, study: str) -> RunInfo | None:
    """The runner of ``study`` while one holds its lock (with its progress), else None."""
    path = lock_path(db, study)
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return _read(path) or RunInfo(study, 0, "?", 0.0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return None  # a lock file left by a killed run: nobody runs the study

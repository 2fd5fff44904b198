"""Atomic file writes: every artifact is written to a temporary file that qvec owns, beside its target, and renamed
onto it only when complete, so a crash or ``kill -9`` never leaves a torn file under the real name.

The temporary name is ``.<name>.<host>.<pid>.tmp``. A write that was killed leaves one behind; the next write to the
same path removes every such file whose process is gone, so leftovers never pile up. Files get the usual
permissions (``0666 & ~umask``), as ``open`` gives them, not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qvec.core.errors import QvecError, os_error

#: Temporary files of another host (a shared cluster folder), or in a format without a pid, count as stale after
#: this long without a change.
STALE_AFTER_S = 3600.0


def _host() -> str:
    """This machine in a temporary name: a readable prefix plus a hash of the full name (cluster nodes whose
    names share a long prefix stay apart)."""
    name = socket.gethostname()
    short = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:24] or "host"
    return f"{short}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def temp_path_for(path: Path) -> Path:
    return path.parent / f".{path.name}.{_host()}.{os.getpid()}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files that killed writes to ``path`` left behind; returns what was removed."""
    removed = []
    prefix, host = f".{path.name}.", _host()
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    for p in candidates:
        parts = p.name[len(prefix):-len(".tmp")].rsplit(".", 1)
        stale = False
        if len(parts) == 2 and parts[1].isdigit() and parts[0] == host:
            stale = int(parts[1]) != os.getpid() and not _alive(int(parts[1]))
        else:
            try:
                stale = time.time() - p.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
        if stale:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The block must create the file at the yielded path (any writer that writes to a path name will do). A target
    that is a directory, or a folder that cannot be written, is an OSError naming the path, before any work.
    """
    path = Path(path)
    if path.is_dir():
        raise QvecError(f"{path}: is a directory; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QvecError(f"{path}: {parent} is a file, not a folder")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = temp_path_for(path)
        tmp.unlink(missing_ok=True)
    except OSError as e:
        raise os_error(e, path) from None
    try:
        yield tmp
        if not tmp.exists():
            raise QvecError(f"{path}: the writer produced no file")
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        if e.filename is not None and Path(e.filename) not in (tmp, path):
            raise  # about another file (an unreadable source): the caller's message names it
        raise os_error(e, path) from None
    except RuntimeError as e:  # torch.save reports a failed write (a full disk) as a RuntimeError
        _discard(tmp)
        if "writ" in str(e).lower():
            raise QvecError(f"{path}: cannot write ({str(e).strip().splitlines()[0][:120]})") from None
        raise
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, with the usual permissions, flushed to disk before the rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())

"""Atomic file writes: every artifact is written to a temporary file that qvec owns, beside its target, and renamed
onto it only when complete, so a crash or ``kill -9`` never leaves a torn file under the real name.

The temporary name is ``.<name>.<host>.<pid>.tmp``. A write that was killed leaves one behind; the next write to the
same path removes every such file whose process is gone, so leftovers never pile up. Files get the usual
permissions (``0666 & ~umask``), as ``open`` gives them, not ``mkstemp``'s 0600.

It is also the one output policy (:func:`check_output`), applied by every writer before anything is written: only a
regular file, or a path that does not exist yet, is ever written. A directory, a device node, a named pipe (FIFO)
or a socket is refused, since renaming a file onto it would replace what is not qvec's (as root, ``-o /dev/null``
would delete ``/dev/null``), and so is any file the running command read as an input (:func:`guard_inputs`,
:func:`note_input`; hard links and symbolic links included), so ``pack c -o c`` cannot replace its own input.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
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


# ------------------------------------------------------------------------------------------ output policy
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))

#: The inputs the running command has read (``(st_dev, st_ino)`` -> path), while :func:`guard_inputs` is active.
_INPUTS: list[dict[tuple[int, int], str]] = []


def file_kind(path: str | os.PathLike) -> str | None:
    """What is at ``path`` when it is not a regular file: ``a directory``, ``a named pipe (FIFO)``, ``a character
    device``, ``a block device`` or ``a socket``; None for a regular file or nothing (symbolic links followed)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((name for test, name in _KINDS if test(mode)), None)


@contextmanager
def guard_inputs() -> Iterator[None]:
    """While active (one CLI command), every file read through :func:`note_input` is an input that no writer may
    replace. A library program that loads a file, edits it and saves it back is not affected."""
    _INPUTS.append({})
    try:
        yield
    finally:
        _INPUTS.pop()


def note_input(path: str | os.PathLike) -> None:
    """Record ``path`` as an input of the running command (a no-op outside :func:`guard_inputs`)."""
    if not _INPUTS:
        return
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return
    _INPUTS[-1].setdefault((st.st_dev, st.st_ino), str(path))


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                 new_folders: bool = True) -> Path:
    """The output policy, one line per refusal: ``path`` must be a regular file or not exist (a symbolic link is
    judged by its target and then replaced by the new file), and not the same file as any of ``inputs`` or of
    the files the running command read (:func:`guard_inputs`). Its folder must be a folder; when it does not
    exist it is created by the writer, unless ``new_folders`` is False (the CLI's output files: a typo in a path
    must not silently grow a tree), which refuses it. Returns ``path`` as a Path."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None  # a parent is a file: named below
    except OSError as e:
        raise os_error(e, path) from None
    if st is not None:
        kind = next((name for test, name in _KINDS if test(st.st_mode)), None)
        if kind == "a directory":
            raise QvecError(f"{path}: is a directory; give a file name")
        if kind is not None:
            raise QvecError(f"{path}: is {kind}, not a regular file; qvec writes only regular files or new paths")
        same = _same_input(st, inputs)
        if same is not None:
            raise QvecError(f"{path}: is the same file as the input {same}; write the output to another path")
    missing = None
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QvecError(f"{path}: {parent} is {file_kind(parent) or 'a file'}, not a folder")
            break
        missing = parent
    if missing is not None and not new_folders:
        raise QvecError(f"{path}: folder {path.parent} does not exist; create it first (qvec creates no folders "
                        "for an output file, so a typo cannot grow a tree)")
    return path


def _same_input(st: os.stat_result, inputs: Iterable[str | os.PathLike]) -> str | None:
    """The input that is the same file as ``st`` (same device and inode: hard links too), or None."""
    for inp in inputs:
        try:
            other = os.stat(inp)
        except (OSError, ValueError):
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return str(inp)
    for guard in _INPUTS:
        if (st.st_dev, st.st_ino) in guard:
            return guard[(st.st_dev, st.st_ino)]
    return None


def announce_new_folder(path: str | os.PathLike) -> str | None:
    """The line a command says before creating the folder ``path`` (with the parents it lacks), or None when it
    exists. A folder that exists as something else is refused in one line."""
    path = Path(path)
    if path.is_dir():
        return None
    if path.exists() or file_kind(path) is not None:
        raise QvecError(f"{path}: is {file_kind(path) or 'a file'}, not a folder")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QvecError(f"{path}: {parent} is {file_kind(parent) or 'a file'}, not a folder")
            break
    top = missing[-1]
    extra = f" (and {len(missing) - 1} folder{'s' if len(missing) > 2 else ''} above it, from {top})" \
        if len(missing) > 1 else ""
    return f"creating folder {path}{extra}"


#: Who hears about folders :func:`make_folder` creates (the CLI prints one line each), while
#: :func:`announce_folders` is active.
_ANNOUNCERS: list[tuple[Callable[[str], None], list[Path]]] = []


@contextmanager
def announce_folders(say: Callable[[str], None]) -> Iterator[None]:
    """While active (one CLI command), every folder :func:`make_folder` creates is said in one line through
    ``say``, at the moment it is created (after the command's checks passed), once per new tree: a folder inside
    one already said is not said again."""
    _ANNOUNCERS.append((say, []))
    try:
        yield
    finally:
        _ANNOUNCERS.pop()


def make_folder(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` with the parents it lacks, saying so (:func:`announce_folders`): a folder a user
    named is never grown silently, so a typo in a path shows. Something other than a folder there is one line."""
    path = Path(path)
    line = announce_new_folder(path)
    if line is None:
        return path
    top = next(p for p in reversed((path, *path.parents)) if not p.exists()).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, path) from None
    if _ANNOUNCERS:
        say, said = _ANNOUNCERS[-1]
        if not any(top == s or s in top.parents for s in said):
            said.append(top)
            say(line)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The block must create the file at the yielded path (any writer that writes to a path name will do). The
    output policy (:func:`check_output`, with ``inputs``) is applied first: a directory, device, FIFO or socket,
    or an input of the running command, is refused in one line before any work, as is a folder that cannot be
    written.
    """
    path = check_output(path, inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a library writer's own folders: the CLI checks its outputs'
        remove_stale_temps(path)
        tmp = temp_path_for(path)
        tmp.unlink(missing_ok=True)
    except OSError as e:
        raise os_error(e, path) from None
    try:
        yield tmp
        if not tmp.exists():
            raise QvecError(f"{path}: the writer produced no file")
        if file_kind(path) is not None:  # it became a directory, FIFO or device while the writer worked
            check_output(path)
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

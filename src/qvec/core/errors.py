"""One exception type for every user-facing failure, so the CLI can print it as one line."""

from __future__ import annotations


class QvecError(Exception):
    """A problem with the user's input (file, key, shape, value) that deserves a one-line message."""


def describe_os_error(e: OSError, path: object = None) -> str:
    """``PATH: cause`` for a filesystem error (read-only folder, full disk, a directory where a file goes)."""
    where = path if path is not None else (e.filename if e.filename is not None else None)
    cause = e.strerror or type(e).__name__
    if e.filename2 is not None:
        cause += f" (-> {e.filename2})"
    return f"{where}: {cause}" if where is not None else cause


def os_error(e: OSError, path: object, action: str = "cannot write") -> QvecError:
    """The QvecError for an OSError met while writing ``path``."""
    return QvecError(f"{path}: {action} ({e.strerror or type(e).__name__})")

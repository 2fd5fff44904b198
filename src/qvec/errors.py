"""One exception type for every user-facing failure, so the CLI can print it as one line."""

from __future__ import annotations


class QvecError(Exception):
    """A problem with the user's input (file, key, shape, value) that deserves a one-line message."""

"""Extensions that live outside qvec: modules named in ``$QVEC_PLUGINS`` (comma-separated) or registered under
the ``qvec.plugins`` entry-point group are imported on first need, so that their registrations (a lambda rule, a
model family) exist in every process of a study, the grid's spawned workers included, which inherit the
environment but not the driver's imports."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from .errors import QvecError

_LOADED = False


def load_plugins() -> None:
    """Import every plugin module once per process; a module that does not import is one clear error."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    names = [n.strip() for n in os.environ.get("QVEC_PLUGINS", "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise QvecError(f"$QVEC_PLUGINS: cannot import {name!r} ({e})") from None
    for ep in entry_points(group="qvec.plugins"):
        ep.load()

"""Extensions that live outside qvec: modules named in ``$QVEC_PLUGINS`` (comma-separated) or registered under
the ``qvec.plugins`` entry-point group are imported on first use of any registry (:mod:`qvec.core.registry`), so
that their registrations (a quantizer, a lambda rule, a signal, a model family, a report figure) exist in every
process of a study, the grid's spawned workers included, which inherit the environment but not the driver's
imports. A module that cannot be imported is one clear error, never silently skipped.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from qvec.core.errors import QvecError

ENV = "QVEC_PLUGINS"
_LOADED: set[str] = set()


def plugin_names() -> list[str]:
    """The plugin modules ``$QVEC_PLUGINS`` names, in order."""
    return [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]


def load_plugins(retry: bool = False) -> None:
    """Import every plugin module not imported yet in this process (``retry``: also entry points seen before)."""
    for name in plugin_names():
        if name in _LOADED:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or the plugin's own error at import time
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QvecError(f"${ENV}: cannot import plugin module {name!r} ({type(e).__name__}: {first})") from None
        _LOADED.add(name)
    for ep in entry_points(group="qvec.plugins"):
        key = f"entry-point:{ep.name}={ep.value}"
        if key in _LOADED and not retry:
            continue
        try:
            ep.load()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QvecError(f"qvec.plugins entry point {ep.name!r}: cannot load {ep.value!r} ({first})") from None
        _LOADED.add(key)

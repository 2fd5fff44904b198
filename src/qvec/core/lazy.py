"""Lazy package attributes (PEP 562): a package names what it exports and from which module, and imports that
module on first use, so that importing the package (the CLI's ``--help``, a grid worker's start) costs nothing."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a name to its module (absolute, or
    relative to ``package`` with a leading dot)."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    def __dir__() -> list[str]:
        import sys

        return sorted([*vars(sys.modules[package]), *exports])

    return __getattr__, __dir__

"""One registry type for every extension point: quantizers, presets, lambda rules, signals, model families, report
figures and tables, grid job kinds.

A :class:`Registry` maps names to objects. Built-ins register themselves when their module is imported, and the
registry imports its built-in modules on first use, so nothing depends on which module happened to be imported
first. Plugins (modules named in ``$QVEC_PLUGINS`` or under the ``qvec.plugins`` entry-point group,
:mod:`qvec.core.plugins`) are loaded on first use too, and again looked for on a missed lookup, so a plugin's
registrations exist in every process of a study, the grid's spawned and Ray workers included.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from qvec.core.errors import QvecError
from qvec.core.plugins import load_plugins

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind (``kind`` names it in messages), with lazily imported built-in modules."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = (), plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._builtins = builtins
        self._items: dict[str, T] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtins:
            importlib.import_module(module)
        load_plugins()

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """``registry.register(name, obj)``, or ``@registry.register(name)`` on a class or function. A later
        registration under the same name replaces the earlier one (a plugin may override a built-in)."""
        if obj is not None:
            self._items[name] = obj
            return obj

        def deco(o: T) -> T:
            self._items[name] = o
            return o

        return deco

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests and plugins that register something for a while)."""
        self._items.pop(name, None)

    def get(self, name: str, what: str | None = None) -> T:
        """The object registered as ``name``; a miss looks for plugins once more, then is one line naming the
        known names (``what`` replaces the kind in that line, e.g. ``--method``)."""
        self._load()
        if name not in self._items:
            load_plugins(retry=True)
        if name not in self._items:
            raise QvecError(f"unknown {what or self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}")
        return self._items[name]

    def registered(self) -> set[str]:
        """The names registered so far, without loading built-ins or plugins (for a registration's own checks)."""
        return set(self._items)

    def names(self) -> list[str]:
        """Registered names: the built-ins in the order of their modules, then the others as registered."""
        return [name for name, _ in self.items()]

    def items(self) -> list[tuple[str, T]]:
        self._load()
        rank = {m: i for i, m in enumerate(self._builtins)}
        order = sorted(enumerate(self._items.items()),
                       key=lambda e: (rank.get(getattr(e[1][1], "__module__", ""), len(rank)), e[0]))
        return [item for _, item in order]

    def __contains__(self, name: object) -> bool:
        self._load()
        if name not in self._items:
            load_plugins(retry=True)
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

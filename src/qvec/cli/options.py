"""Option groups: CLI options that several commands share, declared once as a dataclass.

A group's fields are typer ``Annotated`` aliases with their defaults. :func:`takes` lets a command take a whole
group as one parameter: typer sees the group's fields in that parameter's place (so ``--help`` lists them there,
in field order), and the command is called with one instance of the group holding the values given.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _group_parameters(group: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(group, include_extras=True)
    return [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
                              default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(group)]


def takes(**groups: type) -> Callable[[F], F]:
    """Decorator for a command (placed below ``@app.command``): each keyword names one of the command's parameters
    and the option group (a dataclass) it stands for."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            params += _group_parameters(groups[p.name]) if p.name in groups else [p]
        names = [p.name for p in params]
        if len(set(names)) != len(names) or not set(groups) <= set(sig.parameters):
            raise TypeError(f"{fn.__name__}: option groups {sorted(groups)} clash with its parameters {names}")

        @functools.wraps(fn)
        def command(**kwargs):
            for name, group in groups.items():
                kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)})
            return fn(**kwargs)

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params} | {"return": sig.return_annotation}
        return command  # type: ignore[return-value]

    return decorate

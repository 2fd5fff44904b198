"""Config values checked against the real types of dataclass fields (``typing.get_type_hints``), so that every
table of a study config is validated by the dataclass it fills, with one line naming ``table.key``."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin

from qvec.core.errors import QvecError


def fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` (parsed TOML/YAML) fits the type ``tp`` (bool is not a number here; lists and tables are
    checked element by element; a dataclass type takes a table)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if tp is int:
        return isinstance(value, int)
    if tp is float:
        return isinstance(value, int | float) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if tp is list or origin is list:
        return isinstance(value, list) and (not args or all(fits(v, args[0]) for v in value))
    if tp is dict or origin is dict:
        return isinstance(value, dict) and (not args or all(fits(k, args[0]) and fits(v, args[1])
                                                             for k, v in value.items()))
    if is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


def describe(tp: Any) -> str:
    """What a value of type ``tp`` is, in words (for error messages)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        named = [describe(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" (or omitted)" if type(None) in args and not named else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
             list: "a list"}
    if tp in words:
        return words[tp]
    if origin is list:
        return {int: "integers", float: "numbers", str: "a list of names"}.get(args[0], "a list") if args else "a list"
    if origin is dict or is_dataclass(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def field_types(cls: type) -> dict[str, Any]:
    """The resolved field types of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def checked(source: str, where: str, value: Any, tp: Any) -> Any:
    """``value`` (a copy of a list or table) if it fits ``tp``, else one line naming the key and what it must be."""
    if not fits(value, tp):
        raise QvecError(f"{source}: {where} must be {describe(tp)}, got {value!r}")
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def table(source: str, where: str, raw: Any, cls: type, extra: Sequence[str] = ()) -> dict[str, Any]:
    """A config table checked against the fields of dataclass ``cls`` (plus ``extra`` keys, returned unchecked):
    unknown keys and values of the wrong type are one-line errors naming ``where.key``."""
    tab = checked(source, where, raw, dict)
    types_ = field_types(cls)
    out = {}
    for k, v in tab.items():
        if k in types_:
            out[k] = checked(source, f"{where}.{k}", v, types_[k])
        elif k in extra:
            out[k] = v
        else:
            raise QvecError(f"{source}: unknown key {where}.{k}; known: {', '.join(sorted([*types_, *extra]))}")
    return out

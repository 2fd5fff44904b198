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
from typing import Annotated, Any, TypeVar

import typer

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


# ------------------------------------------------------------------------------------- the quantizer group
Preset = Annotated[str | None, typer.Option("--preset", help="A named quantizer (qvec presets lists them): "
                                            "paper (the paper's RTN), g64, clip, hqq-g64, gptq, ... Grid flags "
                                            "given with it override its grid.")]
Method = Annotated[str | None, typer.Option("--method", help="A registered quantizer when no --preset: rtn "
                                            "(default), clip, hqq (asymmetric grids) or gptq (needs --calib).")]
Bits = Annotated[int | None, typer.Option("--bits", "-b", help="Bit-width, 2..8 (default 3, the paper's).")]
Gran = Annotated[str | None, typer.Option("--granularity", "-g", help="channel (paper default), tensor or group.")]
GroupSize = Annotated[int | None, typer.Option("--group-size", help="Group size along the input dimension "
                                               "(default 128; it must divide the rows); given alone, it "
                                               "means --granularity group.")]
Asym = Annotated[bool | None, typer.Option("--asymmetric/--symmetric", help="Asymmetric (zero point) or "
                                           "symmetric (default).")]
FullRange = Annotated[bool | None, typer.Option("--full-range/--restricted", help="Symmetric grids: use all 2^b "
                                                "levels, or the paper's 2^b - 1 (default).")]
Calib = Annotated[str | None, typer.Option("--calib", help="Calibration images of a calibrated quantizer (gptq): "
                                           "a folder, an .npz, or noise (unlabeled).")]
CalibSize = Annotated[int, typer.Option("--calib-size", help="Calibration images used (at least 8).")]


@dataclasses.dataclass(frozen=True)
class QuantizerFlags:
    """Which quantizer: a preset or a method, on a grid, with calibration images when it needs them."""

    preset: Preset = None
    method: Method = None
    bits: Bits = None
    granularity: Gran = None
    group_size: GroupSize = None
    asymmetric: Asym = None
    full_range: FullRange = None
    calib: Calib = None
    calib_size: CalibSize = 128

    def config(self, calibration: bool = True):
        """The quantizer config these flags name (a QvecError, one line, for a bad combination); without
        ``calibration`` the calibration flags are not checked (QAT needs only the config's trainable grid)."""
        from qvec.core.errors import QvecError
        from qvec.quant import QuantSpec, get_quantizer, quantizer_names
        from qvec.quant.presets import get_preset

        if self.preset is not None and self.method is not None:
            raise QvecError("--preset names the quantizer; drop --method (or drop --preset)")
        base = get_preset(self.preset) if self.preset is not None else None
        cls = get_quantizer(base.method if base else (self.method or "rtn"), "--method")
        bits = 3 if self.bits is None else self.bits
        grid = base.grid(bits) if base else QuantSpec(bits)
        granularity = self.granularity
        if self.group_size is not None and granularity is None:
            granularity = "group"  # a group size asks for groups
        elif self.group_size is not None and granularity != "group":
            raise QvecError(f"--group-size is for --granularity group; got --granularity {granularity}")
        over = {"symmetric": None if self.asymmetric is None else not self.asymmetric,
                "granularity": granularity, "group_size": self.group_size, "full_range": self.full_range}
        grid = dataclasses.replace(grid, **{k: v for k, v in over.items() if v is not None})
        if calibration and cls.needs_calibration and self.calib is None:
            raise QvecError(f"--{'preset ' + self.preset if self.preset else 'method ' + cls.method} needs --calib "
                            "PATH|noise (unlabeled calibration images)")
        if calibration and not cls.needs_calibration and self.calib is not None:
            calibrated = " or ".join(f"--method {n}" for n in quantizer_names() if get_quantizer(n).needs_calibration)
            raise QvecError(f"--calib is for {calibrated} ({cls.method} needs no data)")
        return cls.from_grid(grid, **(base.knobs if base else {}))

    def given(self) -> bool:
        """Whether any quantizer flag was given (``qvec eval`` stays in float otherwise)."""
        return any(v is not None for v in (self.preset, self.method, self.bits, self.granularity, self.group_size,
                                           self.asymmetric, self.full_range, self.calib))

    def describe(self, config) -> str:
        return f"{config}" + (f" calibrated on {self.calib_size} images of {self.calib}" if self.calib else "")

"""Layer 7, the ``qvec`` command line: a thin typer layer over the library (every command is a library call).

May import: every layer.

Commands live in submodules by area (``core``: vectors and quantization; ``train``: tasks, training,
evaluation; ``grid``: experiment grids and reports); each registers itself on :data:`app`. The command modules
import the library inside each command, not at the top: ``qvec --help`` and ``qvec CMD --help`` load neither torch
nor timm (``benchmarks/bench_startup.py`` prints the time and memory this takes).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from qvec import __version__
from qvec.core.atomic import announce_folders, check_output, guard_inputs
from qvec.core.errors import QvecError, describe_os_error

#: Width of output that is not a terminal (a pipe, a file): wide enough that no path or table row is wrapped.
PIPE_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    """A rich Console that wraps at the terminal's width on a terminal, and not at all when piped (``$COLUMNS``,
    when set, still wins)."""
    c = Console(stderr=stderr, soft_wrap=True)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        c.width = PIPE_WIDTH
    return c


app = typer.Typer(
    name="qvec",
    help="Zero-shot low-bit quantization of fine-tuned ViTs through quantization vectors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = make_console(stderr=True)


#: The running command's arguments (``qvec CMD --help`` imports no plugin: help works with a broken one).
_ARGS: list[str] = []


def _show_version(value: bool) -> None:
    if value:
        print(f"qvec {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print qvec's version and exit.", is_eager=True,
                                          callback=_show_version)] = False,
) -> None:
    """Zero-shot low-bit quantization of fine-tuned ViTs through quantization vectors."""
    from qvec.core.plugins import load_plugins, plugin_names

    if plugin_names() and "--help" not in _ARGS:  # every command, not only those that look a name up
        load_plugins()


def output_file(path, *inputs) -> None:
    """A command's output file, checked before any work: the output policy of :func:`qvec.core.atomic.check_output`
    (a regular file or a new path, not one of ``inputs``), and its folder must exist."""
    check_output(path, [i for i in inputs if i is not None], new_folders=False)


def _say_folder(line: str) -> None:
    """A folder the command creates, said in one line on stderr (a typo in a path must not grow a tree silently)."""
    console.print(line, highlight=False, markup=False)


def _register() -> None:
    from qvec.cli import core  # noqa: F401

    for optional in ("train", "grid", "deploy"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{optional}":
                raise


def _usage_error_types() -> tuple[type, ...]:
    types: list[type] = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            types.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            pass
    return tuple(types)


def _is_usage_error(e: BaseException) -> bool:
    """A usage mistake (bad value, unknown option or command, missing option): click shows it in a few lines."""
    return isinstance(e, _usage_error_types())


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; a QvecError becomes one red line on stderr and exit status 2."""
    _register()
    _ARGS[:] = sys.argv[1:] if argv is None else argv
    try:
        with guard_inputs(), announce_folders(_say_folder):
            app(args=argv, standalone_mode=False)
    except QvecError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        console.print("aborted")
        return 130
    except OSError as e:  # a filesystem error no library call turned into a QvecError: still one line
        console.print(f"[bold red]error:[/] {escape(describe_os_error(e))}", highlight=False, soft_wrap=True)
        return 2
    except Exception as e:
        if _is_usage_error(e):  # click's, or the copy of click that typer vendors (typer._click)
            e.show()  # type: ignore[attr-defined]
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Layer 7, the ``qvec`` command line: a thin typer layer over the library (every command is a library call).

May import: every layer.

Commands live in submodules by area (``core``: vectors and quantization; ``train``: tasks, training,
evaluation; ``grid``: experiment grids and reports); each registers itself on :data:`app`.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from qvec.core.errors import QvecError, describe_os_error

app = typer.Typer(
    name="qvec",
    help="Zero-shot low-bit quantization of fine-tuned ViTs through quantization vectors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


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
    try:
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

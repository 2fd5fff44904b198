"""Turning hub-download failures into one-line instructions (users without network get a clear next step)."""

from __future__ import annotations

from pathlib import Path

from qvec.core.errors import QvecError


def offline_error(what: str, err: BaseException, hint: str) -> QvecError:
    """The error for a pretrained model whose weights could not be fetched."""
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return QvecError(
        f"could not load pretrained weights for {what} ({reason}); with network access run `{hint}`, "
        f"or download the weights elsewhere and pass the file with --weights PATH"
    )


def require_weights_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise QvecError(f"{p}: weights file not found")
    return p

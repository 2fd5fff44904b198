"""Deployment commands: export (ONNX Runtime with MatMulNBits)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qvec.cli import app
from qvec.cli.core import InProj, ModelOpt, load_checkpoint, out
from qvec.cli.options import QuantizerFlags, takes
from qvec.core.errors import QvecError

AccuracyLevel = Annotated[int, typer.Option("--accuracy-level", help="MatMulNBits accuracy_level: 0 keeps the "
                                            "activations float (default), 4 lets the runtime use int8 activations.")]


@app.command()
@takes(q=QuantizerFlags)
def export(
    input: Annotated[Path, typer.Argument(help="Packed file, PTQ-made checkpoint, or float checkpoint (then with "
                                          "quantizer flags).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (.onnx).")],
    onnx: Annotated[bool, typer.Option("--onnx", help="ONNX Runtime format: each quantized Linear a MatMulNBits "
                                       "node with qvec's codes (the one format so far).")] = False,
    q: QuantizerFlags = QuantizerFlags(),
    in_proj: InProj = True,
    accuracy_level: AccuracyLevel = 0,
    model: ModelOpt = None,
) -> None:
    """Write a quantized model that runs with its real bits: ONNX Runtime, MatMulNBits nodes, float parts float.
    Packed and PTQ-made files are exported as they are; a float checkpoint is quantized first (--bits, --preset,
    --method)."""
    if not onnx:
        raise QvecError("say which format to export: --onnx (ONNX Runtime, MatMulNBits)")
    from qvec.deploy.onnx import export_onnx

    source = load_checkpoint(input, model) if model else input
    r = export_onnx(source, output, q.config() if q.given() else None, accuracy_level=accuracy_level,
                    targets=in_proj, calibration=q.calib, calibration_size=q.calib_size)
    out.print(f"wrote {output}: {r}")

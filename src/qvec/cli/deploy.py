"""Deployment commands: export (ONNX Runtime with MatMulNBits)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qvec.cli import app
from qvec.cli.core import Asym, Calib, CalibSize, Gran, GroupSize, InProj, Method, ModelOpt, load_checkpoint, out
from qvec.cli.core import quantizer_config as _quantizer_config
from qvec.core.errors import QvecError
from qvec.quant import QuantSpec

AccuracyLevel = Annotated[int, typer.Option("--accuracy-level", help="MatMulNBits accuracy_level: 0 keeps the "
                                            "activations float (default), 4 lets the runtime use int8 activations.")]


@app.command()
def export(
    input: Annotated[Path, typer.Argument(help="Packed file, PTQ-made checkpoint, or float checkpoint (with --bits).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (.onnx).")],
    onnx: Annotated[bool, typer.Option("--onnx", help="ONNX Runtime format: each quantized Linear a MatMulNBits "
                                       "node with qvec's codes (the one format so far).")] = False,
    bits: Annotated[int | None, typer.Option("--bits", "-b", help="Quantize a float checkpoint first at this "
                                             "bit-width (packed and PTQ-made files are exported as they are).")]
    = None,
    granularity: Gran = "channel",
    group_size: GroupSize = 128,
    asymmetric: Asym = False,
    method: Method = "rtn",
    calib: Calib = None,
    calib_size: CalibSize = 128,
    in_proj: InProj = True,
    accuracy_level: AccuracyLevel = 0,
    model: ModelOpt = None,
) -> None:
    """Write a quantized model that runs with its real bits: ONNX Runtime, MatMulNBits nodes, float parts float."""
    if not onnx:
        raise QvecError("say which format to export: --onnx (ONNX Runtime, MatMulNBits)")
    from qvec.deploy.onnx import export_onnx

    source = load_checkpoint(input, model) if model else input
    quant = None
    if bits is not None:
        grid = QuantSpec(bits=bits, symmetric=not asymmetric, granularity=granularity,  # type: ignore[arg-type]
                         group_size=group_size)
        quant = _quantizer_config(method, grid, calib)
    r = export_onnx(source, output, quant, accuracy_level=accuracy_level, targets=in_proj, calibration=calib,
                    calibration_size=calib_size)
    out.print(f"wrote {output}: {r}")

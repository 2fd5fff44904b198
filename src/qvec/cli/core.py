"""Core commands: extract, patch, quantize, pack, unpack, inspect, models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qvec.cli import app, make_console, output_file
from qvec.cli.options import QuantizerFlags, takes
from qvec.core.errors import QvecError

if TYPE_CHECKING:  # the library is imported inside the commands: `qvec --help` loads no torch
    from qvec.core.checkpoint import Checkpoint

out = make_console()

InProj = Annotated[
    bool,
    typer.Option(
        "--in-proj/--no-in-proj",
        help="Quantize fused MultiheadAttention in_proj_weight (default); --no-in-proj reproduces the authors' PTQ.",
    ),
]
Output = Annotated[Path, typer.Option("--output", "-o", help="Output file (safetensors).")]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Architecture (family:name) of checkpoints without a qvec header."),
]
AllowFp = Annotated[
    bool, typer.Option("--allow-fingerprint-mismatch", help="Apply even if made for another pretrained backbone.")
]


def load_checkpoint(path: Path, model: str | None = None) -> Checkpoint:
    """Load a checkpoint; ``model`` names the architecture of a file without a qvec header (a plain state dict)."""
    from qvec.core.checkpoint import Checkpoint
    from qvec.models import with_model

    ckpt = Checkpoint.load(path)
    return with_model(ckpt, model) if model else ckpt


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@app.command()
def extract(
    ft: Annotated[Path, typer.Option("--ft", help="Donor's fine-tuned (FT) checkpoint.")],
    qat: Annotated[Path, typer.Option("--qat", help="Donor's QAT checkpoint (same theta_0, recipe, seed).")],
    output: Output,
    allow_fingerprint_mismatch: AllowFp = False,
    model: ModelOpt = None,
    ignore_headers: Annotated[bool, typer.Option("--ignore-headers", help="Skip the checks that the FT file is "
                                                 "kind ft, the QAT file kind qat, both of one task, and different.")]
    = False,
    coverage: Annotated[str, typer.Option("--coverage", help="all: every float backbone tensor (the paper's); "
                                          "quantized: only the weights PTQ quantizes.")] = "all",
    in_proj: InProj = True,
) -> None:
    """Extract the donor's quantization vector tau = theta_QAT - theta_FT (backbone only)."""
    output_file(output, ft, qat)  # before the library loads: a refused output costs no import
    from qvec.vectors.vector import QuantVector

    vec = QuantVector.from_checkpoints(
        load_checkpoint(ft, model), load_checkpoint(qat, model), allow_fingerprint_mismatch,
        check_roles=not ignore_headers, coverage=coverage, targets=in_proj,
    )
    vec.save(output)
    out.print(f"wrote {output}: {len(vec.tensors)} tensors, {vec.num_params:,} params, norm {vec.norm():.4f}")


@app.command()
@takes(q=QuantizerFlags)
def patch(
    receiver: Annotated[Path, typer.Option("--receiver", "-r", help="Receiver's fine-tuned checkpoint.")],
    vector: Annotated[list[Path], typer.Option("--vector", "-v", help="Quantization vector(s); several are averaged "
                                               "unless --donor choose.")],
    output: Output,
    lam: Annotated[str, typer.Option("--lam", "-l", help="Scale lambda (1.0 is the paper's zero-shot setting), or "
                                     "auto: chosen by --rule without receiver labels.")] = "1.0",
    rule: Annotated[str, typer.Option("--rule", help="Lambda rule for --lam auto: agree (KL on --probe, default), "
                                      "agree:top1, agree-noise, weight (no images), fixed:X, one.")] = "agree",
    probe: Annotated[str | None, typer.Option("--probe", help="Unlabeled probe images for --lam auto: a folder, an "
                                              ".npz, or noise. Not the receiver's labels.")] = None,
    probe_size: Annotated[int, typer.Option("--probe-size", help="Probe images used.")] = 1000,
    donor: Annotated[str, typer.Option("--donor", help="With several vectors: mean (average them) or choose (--lam "
                                       "auto picks the best of them and their mean).")] = "mean",
    q: QuantizerFlags = QuantizerFlags(),
    in_proj: InProj = True,
    allow_fingerprint_mismatch: AllowFp = False,
    model: ModelOpt = None,
) -> None:
    """Patch a receiver: theta_FT^R + lam * tau (the receiver keeps its head). Quantize the result next.

    With ``--lam auto`` lambda is chosen for the deploy quantizer (--preset, or --method and --bits etc.): every
    candidate is scored after that quantizer (lambda = 0, no patch, is a candidate); the choice and every
    candidate's score are printed and recorded in the output's header."""
    if donor not in ("mean", "choose"):
        raise QvecError(f"--donor must be mean or choose, got {donor!r}")
    output_file(output, receiver, *vector, probe if probe and probe != "noise" else None,
                q.calib if q.calib and q.calib != "noise" else None)
    from qvec.core.checkpoint import Checkpoint
    from qvec.core.schema import META_DONOR
    from qvec.vectors.selection import choose_donor
    from qvec.vectors.vector import QuantVector

    vecs = [QuantVector.load(v) for v in vector]
    ckpt = load_checkpoint(receiver, model)
    if lam.strip().lower() != "auto":
        if donor == "choose":
            raise QvecError("--donor choose needs --lam auto (the donor is chosen by the lambda rule's score)")
        value = parse_lambda(lam)
        vec = vecs[0] if len(vecs) == 1 else QuantVector.mean(vecs)
        patched = vec.apply(ckpt, value, allow_fingerprint_mismatch, inplace=True)
        patched.save(output)
        out.print(f"wrote {output}: {receiver.name} + {value:g} * {vec.meta.get(META_DONOR, 'vector')}")
        return
    for v in vecs:  # the header checks of a plain patch (backbone fingerprint, architecture), before any scoring
        v.apply(Checkpoint(dict(ckpt.state), dict(ckpt.meta), ckpt.path), 0.0, allow_fingerprint_mismatch)
    cands = _candidates(vector, vecs, donor == "choose")
    choice = choose_donor(ckpt, cands, q.config(), rule=rule, probe=probe, probe_size=probe_size,
                          include_mean=donor == "choose", require_choice=donor == "choose", targets=in_proj,
                          calibration=q.calib, calibration_size=q.calib_size)
    _print_choice(choice)
    chosen = cands.get(choice.donor) if choice.donor in cands else QuantVector.mean(cands.values())
    patched = chosen.apply(ckpt, choice.lam, allow_fingerprint_mismatch, inplace=True)
    patched.meta.update(choice.to_meta())
    patched.save(output)
    out.print(f"wrote {output}: {receiver.name} + {choice.lam:g} * {choice.donor} (rule {choice.rule}, "
              f"{choice.seconds:.1f} s to choose)")


def _candidates(paths: list[Path], vecs: list, choose: bool) -> dict:
    """The vectors ``patch --lam auto`` scores, by name: each file (``--donor choose``), or one (their mean)."""
    from qvec.vectors.vector import QuantVector

    if not choose:
        return {"vector" if len(vecs) == 1 else "mean": vecs[0] if len(vecs) == 1 else QuantVector.mean(vecs)}
    cands = {f"{p.stem}": v for p, v in zip(paths, vecs, strict=True)}
    if len(cands) < len(vecs):
        cands = {f"{i}:{p.name}": v for i, (p, v) in enumerate(zip(paths, vecs, strict=True))}
    return cands


def parse_lambda(text: str) -> float:
    """A finite lambda from the command line."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise QvecError(f"--lam must be a number or auto, got {text!r}") from None
    if not math.isfinite(value):
        raise QvecError(f"--lam must be finite, got {text!r}")
    return value


def _print_choice(choice) -> None:
    from rich.table import Table

    t = Table(title=f"lambda rule {choice.rule} ({choice.metric or 'fixed'}; uses {choice.uses or 'nothing'})")
    donors = list(choice.scores)
    lams = sorted({lam for by in choice.scores.values() for lam in by})
    t.add_column("lambda")
    for d in donors:
        t.add_column(d, justify="right")
    for lam in lams:
        cells = []
        for d in donors:
            v = choice.scores[d].get(lam)
            mark = " *" if (d, lam) == (choice.donor, choice.lam) else ""
            cells.append("–" if v is None else f"{v:.4g}{mark}")
        t.add_row(f"{lam:g}", *cells)
    out.print(t)
    out.print(f"chosen: lambda = {choice.lam:g}, donor {choice.donor}"
              + (" (no patch: every candidate scored worse than none)" if choice.lam == 0 else ""))


@app.command()
@takes(q=QuantizerFlags)
def quantize(
    input: Annotated[Path, typer.Argument(help="Checkpoint to quantize.")],
    output: Output,
    q: QuantizerFlags = QuantizerFlags(),
    in_proj: InProj = True,
    model: ModelOpt = None,
) -> None:
    """Post-training quantization with any quantizer (a preset, RTN, clip search, HQQ, or GPTQ with --calib):
    write a fake-quantized float checkpoint."""
    output_file(output, input, q.calib if q.calib != "noise" else None)
    from qvec.quant.ptq import quantize_checkpoint

    spec = q.config()
    quantized = quantize_checkpoint(load_checkpoint(input, model), spec, targets=in_proj,
                                    calibration=q.calib, calibration_size=q.calib_size)
    quantized.save(output)
    out.print(f"wrote {output}: {q.describe(spec)}, {quantized.bits_per_weight():.3f} bits per weight")


@app.command()
@takes(q=QuantizerFlags)
def pack(
    input: Annotated[Path, typer.Argument(help="Checkpoint (float weights) to pack.")],
    output: Output,
    q: QuantizerFlags = QuantizerFlags(),
    in_proj: InProj = True,
    scale_dtype: Annotated[str, typer.Option(help="float16 (default) or float32 (bit-exact with PTQ).")] = "float16",
    model: ModelOpt = None,
) -> None:
    """Write a real low-bit checkpoint: bit-packed integer codes, fp16 scales, other tensors as is."""
    output_file(output, input, q.calib if q.calib != "noise" else None)
    from qvec.quant.pack import pack_checkpoint

    r = pack_checkpoint(load_checkpoint(input, model), q.config(), output, targets=in_proj,
                        scale_dtype=scale_dtype, calibration=q.calib, calibration_size=q.calib_size)
    out.print(
        f"wrote {output}: {_mb(r.packed_bytes)} (fp32 {_mb(r.fp32_bytes)}, fp16 {_mb(r.fp16_bytes)}); "
        f"{r.num_quantized} quantized tensors at {r.bits_per_weight:.3f} bits per weight "
        f"({r.quantized_ratio:.3f} of their fp32 size)"
    )


@app.command()
def unpack(
    input: Annotated[Path, typer.Argument(help="Packed checkpoint.")],
    output: Output,
) -> None:
    """Dequantize a packed checkpoint into a float checkpoint any PyTorch code can load."""
    output_file(output, input)
    from qvec.quant.pack import load_packed

    ckpt = load_packed(input)
    ckpt.save(output)
    out.print(f"wrote {output}")


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="Checkpoint, vector or packed file (.safetensors, .pt, .bin).")],
    limit: Annotated[int, typer.Option(help="Tensors to list (0 = all).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show what a file holds: kind, metadata, keys, shapes, dtypes, norms."""
    from rich.table import Table

    from qvec.core.inspect import describe

    if limit < 0:
        raise QvecError(f"--limit must be at least 0 (0 lists every tensor), got {limit}")
    s = describe(file)
    if as_json:
        print(s.to_json())
        return
    bpw = f", {s.bits_per_weight:.3f} bits per quantized weight" if s.bits_per_weight is not None else ""
    out.print(f"[bold]{s.path}[/]: {s.kind}, {len(s.tensors)} tensors, {s.num_params:,} values, {_mb(s.size_bytes)}"
              f"{bpw}")
    if s.meta:
        meta = Table("metadata", "value", box=None)
        for k, v in sorted(s.meta.items()):
            meta.add_row(k, v if len(v) < 200 else v[:197] + "...")
        out.print(meta)
    table = Table("key", "shape", "dtype", "L2 norm", box=None)
    shown = s.tensors if limit <= 0 else s.tensors[:limit]
    for t in shown:
        norm = "" if t.norm is None else f"{t.norm:.4g}"
        table.add_row(t.key, "x".join(map(str, t.shape)) or "scalar", t.dtype, norm)
    out.print(table)
    if len(shown) < len(s.tensors):
        out.print(f"... {len(s.tensors) - len(shown)} more (use --limit 0)")


@app.command()
def presets(
    bits: Annotated[int, typer.Option("--bits", "-b", help="Bit-width the bits per weight are given at.")] = 3,
    rows: Annotated[int, typer.Option("--rows", help="Input size of the weight the bits per weight are for (a ViT-S "
                                      "MLP weight has 384).")] = 384,
) -> None:
    """List the named quantizers (--preset), with their stored bits per weight."""
    from rich.table import Table

    from qvec.quant.presets import PRESETS

    t = Table("preset", "quantizer", "bits/weight", "data", "what it is", box=None)
    for name, p in PRESETS.items():
        cfg = p.config(bits)
        t.add_row(name, str(cfg), f"{cfg.bits_per_weight([(4 * rows, rows)]):.3f}",
                  "unlabeled images" if cfg.needs_calibration else "none", p.description)
    out.print(t)


@app.command()
def models(family: Annotated[str | None, typer.Argument(help="A family to list architectures of.")] = None) -> None:
    """List model families, or the architectures of one family."""
    from qvec.models import families, get_adapter

    if family is None:
        for f in families():
            out.print(f)
        return
    names = get_adapter(family).names()
    if not names:
        raise QvecError(f"family {family!r} takes any architecture name its library knows")
    for n in names:
        out.print(n)

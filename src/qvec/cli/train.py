"""Training commands: tasks, pretrain, finetune (FT / QAT), eval. Each is one library call plus printing."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qvec.cli import app, make_console, output_file
from qvec.cli.options import QuantizerFlags, takes
from qvec.core.errors import QvecError
from qvec.train.recipe import DEFAULT_PROFILE, PRETRAINED_PROFILES, SMALL_PROFILES, Recipe  # no torch: for --help

if TYPE_CHECKING:  # the library is imported inside the commands: `qvec --help` loads no torch
    from qvec.core.checkpoint import Checkpoint
    from qvec.models import ModelSpec

out = make_console()

DataDir = Annotated[
    Path | None, typer.Option("--data", "-d", help="Folder of task .npz files (default: $QVEC_DATA).")
]
Task = Annotated[str, typer.Option("--task", "-t", help="Task name (qvec tasks lists them); hf:NAME forces HF.")]
Output = Annotated[Path, typer.Option("--output", "-o", help="Output checkpoint (safetensors).")]
Bits = Annotated[int, typer.Option("--bits", "-b", help="Bit-width for QAT / PTQ, 2..8 (paper default 3).")]
Gran = Annotated[str, typer.Option("--granularity", "-g", help="channel (paper default), tensor or group.")]
InProj = Annotated[bool, typer.Option("--in-proj/--no-in-proj", help="Quantize fused MHA in_proj_weight.")]
Epochs = Annotated[int | None, typer.Option(help="Override the recipe's epochs.")]
Lr = Annotated[float | None, typer.Option(help="Override the recipe's learning rate.")]
Batch = Annotated[int | None, typer.Option("--batch-size", help="Override the recipe's batch size.")]
Warmup = Annotated[int | None, typer.Option("--warmup", help="Override the recipe's warm-up steps.")]
Seed = Annotated[int | None, typer.Option(help="Override the recipe's seed (paper: 2038).")]
Limit = Annotated[int | None, typer.Option("--train-limit", help="Train on the first N training examples only.")]
RecipeFile = Annotated[Path | None, typer.Option("--recipe", help="JSON file with Recipe fields (base recipe).")]
Threads = Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Profile = Annotated[str | None, typer.Option("--profile", help="Recipe profile. Built-in ViTs (default "
                                             f"{DEFAULT_PROFILE}): " + "; ".join(f"{k}: {v.about}" for k, v in
                                                                                   SMALL_PROFILES.items())
                                             + ". Pretrained backbones (default paper, SPEC's recipe): "
                                             + "; ".join(f"{k}: {v.about}" for k, v in
                                                         PRETRAINED_PROFILES.items()))]
ImgSize = Annotated[int | None, typer.Option("--img-size", help="Input size in pixels the ViT is built for (a "
                                            "multiple of its patch size); pretrained position embeddings are "
                                            "resampled to it. Default: the model's own.")]
Device = Annotated[str, typer.Option("--device", help="auto (GPU if any), cpu, cuda, cuda:1 ...")]


def _set_threads(n: int | None) -> None:
    if n is not None:
        from qvec.core.limits import check_count, max_threads

        check_count(n, "--threads", 1, max_threads())
        import torch

        torch.set_num_threads(n)


def _recipe(base: Recipe, recipe_file: Path | None, profile: str | None = None, **overrides) -> Recipe:
    """``base`` (the profile's recipe), or the whole recipe of ``recipe_file``, with the flags' overrides."""
    if recipe_file is not None and profile is not None:
        raise QvecError("--recipe FILE replaces the profile's recipe; give --recipe or --profile, not both")
    if recipe_file is not None:
        if not recipe_file.is_file():
            raise QvecError(f"{recipe_file}: no such recipe file")
        base = Recipe.from_json(recipe_file.read_text())
    return base.override(**overrides)


@dataclass(frozen=True)
class RecipeFlags:
    """The options ``qvec pretrain`` and ``qvec finetune`` share: recipe overrides, threads and the progress bar."""

    epochs: Epochs = None
    lr: Lr = None
    batch_size: Batch = None
    warmup: Warmup = None
    seed: Seed = None
    train_limit: Limit = None
    recipe: RecipeFile = None
    threads: Threads = None
    quiet: Quiet = False

    def recipe_for(self, base: Recipe, profile: str | None) -> Recipe:
        """The profile's recipe ``base`` (or the --recipe file's) with the override flags applied."""
        return _recipe(base, self.recipe, profile, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                       warmup_steps=self.warmup, seed=self.seed, train_limit=self.train_limit)


def _model_spec(name: str, pretrained: str | None = None, img_size: int | None = None) -> ModelSpec:
    """Parse --model (and --pretrained, a family's weights tag such as OpenCLIP's ``openai``, and --img-size, the
    input size a ViT is built for)."""
    from qvec.models import parse_model_name

    options: dict = {"pretrained": pretrained} if pretrained else {}
    if img_size is not None:
        if img_size < 1:
            raise QvecError(f"--img-size must be a positive number of pixels, got {img_size}")
        options["img_size"] = img_size
    return parse_model_name(name, **options)


@app.command("tasks")
def tasks_cmd(data: DataDir = None) -> None:
    """List the tasks: local .npz files of the data folder, then the paper's Hugging Face tasks."""
    from rich.table import Table

    from qvec.data.tasks import resolve_data_dir, task_summaries

    table = Table("task", "classes", "train", "test", "paper epochs", "source")
    for r in task_summaries(data):
        table.add_row(r.name, str(r.num_classes), str(r.n_train or "-"), str(r.n_test or "-"),
                      str(r.epochs or "-"), r.source)
    out.print(table)
    if resolve_data_dir(data) is None:
        out.print("no data folder configured (--data or $QVEC_DATA): only Hugging Face tasks are available")


@app.command()
@takes(flags=RecipeFlags)
def pretrain(
    data_file: Annotated[Path, typer.Option("--data-file", help="JPEG corpus .npz (pretrain_cifar10.npz).")],
    output: Output,
    model: Annotated[str, typer.Option("--model", "-m", help="Built-in small ViT.")] = "vit-mini",
    profile: Profile = None,
    device: Device = "auto",
    flags: RecipeFlags = RecipeFlags(),
) -> None:
    """Pretrain theta_0 (the shared backbone) on a JPEG corpus; resumable (rerun the same command)."""
    from qvec.train.trainer import pretrain as _pretrain

    output_file(output, data_file)
    _set_threads(flags.threads)
    spec = _model_spec(model)
    r = flags.recipe_for(Recipe.for_pretraining(spec, profile), profile)
    ck = _pretrain(spec, data_file, r, output, progress=not flags.quiet, device=device)
    _report_training(ck, output)


@app.command()
@takes(flags=RecipeFlags, q=QuantizerFlags)
def finetune(
    model: Annotated[str, typer.Option("--model", "-m", help="Architecture (vit-mini, timm:NAME, ...).")],
    task: Task,
    output: Output,
    init: Annotated[Path | None, typer.Option("--init", help="theta_0 file (pretrained backbone).")] = None,
    pretrained: Annotated[
        str | None, typer.Option("--pretrained", help="Weights tag of the family (OpenCLIP: openai, laion2b_...).")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Local file of the family's pretrained weights (offline use).")
    ] = None,
    img_size: ImgSize = None,
    device: Device = "auto",
    profile: Profile = None,
    qat: Annotated[bool, typer.Option("--qat", help="Quantization-aware training on the deploy quantizer's "
                                      "trainable grid (--preset, or --method and the grid flags), else plain FT.")
                   ] = False,
    q: QuantizerFlags = QuantizerFlags(),
    in_proj: InProj = True,
    ptq_log: Annotated[bool, typer.Option("--ptq-log", help="FT: also log val accuracy after PTQ.")] = False,
    data: DataDir = None,
    flags: RecipeFlags = RecipeFlags(),
) -> None:
    """Fine-tune from theta_0: FT, or QAT with --qat (same recipe and seed); resumable (rerun the same command).

    QAT fake-quantizes on the trainable grid of the quantizer you will deploy: ``--preset hqq-g64`` trains on
    asymmetric groups of 64, the grid HQQ's vector is matched to."""
    from qvec.data.tasks import get_task
    from qvec.train.trainer import finetune as _finetune

    output_file(output, init, weights)
    _set_threads(flags.threads)
    spec = _model_spec(model, pretrained, img_size)
    t = get_task(task, data)
    grid = q.config(calibration=False).trainable_grid
    r = flags.recipe_for(Recipe.for_task(t.name, spec, profile), profile)
    if flags.epochs is not None:  # an explicit --epochs is exact
        r = replace(r, min_examples=None)
    ck = _finetune(spec, t, r, output, init=init, qat=grid if qat else None, targets=in_proj,
                   eval_quant=grid if (qat or ptq_log) else None, progress=not flags.quiet, device=device,
                   weights=weights)
    _report_training(ck, output)


def _report_training(ck: Checkpoint, output: Path) -> None:
    log = json.loads(output.with_suffix(".log.json").read_text())
    last = log["epochs"][-1]
    val = last.get("val_acc")
    msg = f"saved {output} ({ck.meta.get('qvec.kind')}, {float(ck.meta['qvec.train_seconds']):.0f} s training"
    if val is not None:
        msg += f", val top-1 {100 * val:.2f}%"
    if last.get("val_acc_ptq") is not None:
        msg += f", after {last['ptq']} PTQ {100 * last['val_acc_ptq']:.2f}%"
    out.print(msg + f"); log {output.with_suffix('.log.json')}")


@app.command("eval")
@takes(q=QuantizerFlags)
def eval_cmd(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint to evaluate, or an exported .onnx (run in "
                                        "ONNX Runtime).")],
    task: Task,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    q: QuantizerFlags = QuantizerFlags(),
    in_proj: InProj = True,
    arch: Annotated[str | None, typer.Option("--arch", help="Architecture of a checkpoint without qvec header.")]
    = None,
    data: DataDir = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Evaluation batch size (default: 64 on "
                                                   "CPU, 512 on GPU).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate the first N examples only.")] = None,
    threads: Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Top-1 of a checkpoint on a task split, in float or after PTQ with any quantizer (--bits, --preset,
    --method), or of an exported .onnx in ONNX Runtime, with throughput."""
    from qvec.core.checkpoint import Checkpoint
    from qvec.core.limits import check_count
    from qvec.data.tasks import get_task
    from qvec.models import with_model
    from qvec.train.evaluate import EvalResult, check_checkpoint_task
    from qvec.vectors.measure import Bench, measure
    from qvec.vectors.signals import make_signal

    if batch_size is not None:
        check_count(batch_size, "--batch-size", 1)
    if limit is not None:
        check_count(limit, "--limit", 1)
    _set_threads(threads)
    if split not in ("train", "val", "test"):
        raise QvecError(f"unknown split {split!r}; known: train, val, test")
    t = get_task(task, data)
    quant = q.config() if q.given() else None
    if model.suffix == ".onnx":
        if quant is not None or arch:
            raise QvecError(f"{model} is an exported model: it runs as it is (no quantizer options, no --arch)")
        from qvec.deploy.runtime import evaluate_onnx

        res = evaluate_onnx(model, t, split, threads=threads, batch_size=batch_size, limit=limit)
    else:
        ckpt = Checkpoint.load(model)
        if arch:
            ckpt = with_model(ckpt, arch)
        check_checkpoint_task(ckpt, ckpt.model_spec, t)
        bench = Bench(ckpt, t, targets=in_proj, batch_size=batch_size)
        m = measure(bench, make_signal(split, size=limit), quant=quant, calibration=q.calib,
                    calibration_size=q.calib_size)
        res = EvalResult(m["top1"], round(m["top1"] * m.n), m.n, m.seconds)
    if as_json:
        print(json.dumps({"checkpoint": str(model), "task": t.name, "split": split,
                          "quant": str(quant) if quant else None, **res.to_dict()}))
        return
    what = f" after {q.describe(quant)} PTQ" if quant else ""
    out.print(f"{model} on {t.name}/{split}{what}: Top-1 {100 * res.accuracy:.2f}% ({res.correct}/{res.n}); "
              f"{res.images_per_s:.0f} img/s ({res.seconds:.2f} s)")

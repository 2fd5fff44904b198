"""Top-1 evaluation, built to be called thousands of times (the donor x receiver grid) on CPU.

A split is preprocessed once per model input configuration and kept in memory as one float tensor
(:meth:`qvec.tasks.TaskSplit.tensors`), so each call is only the forward passes: large batches under
``torch.inference_mode``. Splits too large to cache are streamed batch by batch.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from qvec.core.checkpoint import META_CLASSES, Checkpoint
from qvec.core.errors import QvecError
from qvec.core.limits import check_batch, check_count
from qvec.data.tasks import Task, normalize
from qvec.models import DataConfig, ModelSpec, get_adapter, load_model
from qvec.quant import QuantizerConfig, quantize_
from qvec.quant.grid import QuantSpec
from qvec.quant.targets import ALL_TARGETS, TargetFilter

SMALL_VIT_MEAN = (0.5, 0.5, 0.5)
# Default evaluation batch: on CPU small batches keep activations in cache and run faster than large ones
# (docs/training.md, "Training and evaluation throughput"); on a GPU large batches fill the device.
CPU_EVAL_BATCH = 64
GPU_EVAL_BATCH = 512


@dataclass(frozen=True)
class EvalResult:
    """Top-1 accuracy as a fraction in [0, 1], with the counts and wall time behind it."""

    accuracy: float
    correct: int
    n: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}

    def __str__(self) -> str:
        return f"top-1 {100 * self.accuracy:.2f}% ({self.correct}/{self.n}), {self.images_per_s:.0f} img/s"


def infer_data_config(model: nn.Module) -> DataConfig:
    """The input configuration of a model when the caller did not give one.

    timm models carry theirs in ``pretrained_cfg``; qvec's built-in ViTs (no hub config) use mean = std = 0.5 at
    their patch-embedding size. Pass ``config=`` explicitly for anything else.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" in cfg and "input_size" in cfg:
        return DataConfig(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                          cfg.get("interpolation", "bicubic"))
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is not None:
        return DataConfig(int(size[0]), SMALL_VIT_MEAN, SMALL_VIT_MEAN, "bilinear")
    raise QvecError(f"cannot tell the input configuration of a {type(model).__name__}; pass config=")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: the GPU when there is one, else the CPU (where runs are bit-for-bit deterministic)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise QvecError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QvecError(f"device {device!r} requested but no CUDA GPU is available")
    return dev


def autocast_for(device: torch.device):
    """bf16 autocast on GPUs (matmuls in bf16, weights and fake quantization in fp32); a no-op on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _num_outputs(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _input_config(model: nn.Module, task: Task, config: DataConfig | ModelSpec | None) -> DataConfig:
    """The model's input configuration (given, resolved from a ModelSpec, or inferred); its head must fit ``task``."""
    if isinstance(config, ModelSpec):
        config = get_adapter(config).data_config(config, model)
    config = config or infer_data_config(model)
    nout = _num_outputs(model)
    if nout is not None and nout != task.num_classes:
        raise QvecError(f"the model has a head for {nout} classes but task {task.name!r} has {task.num_classes}")
    return config


def _batches(ds, n: int, batch_size: int, cached: torch.Tensor | None, config: DataConfig):
    """``(start, end, images)`` of the first ``n`` examples of ``ds`` in batches: slices of the cached split tensor,
    or preprocessed batch by batch when the split was too large to cache."""
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        if cached is not None:
            x = cached[s:e]
        else:
            x = normalize(ds.load(range(s, e), config.image_size, config.interpolation), config.mean, config.std)
        yield s, e, x


@contextlib.contextmanager
def _progress_bar(enabled: bool, title: str, total: int):
    """A transient rich progress bar while the block runs; yields its ``advance(k)`` (a no-op when not enabled)."""
    if not enabled:
        yield lambda k: None
        return
    from rich.progress import Progress

    bar = Progress(transient=True)
    try:
        bar.start()
        job = bar.add_task(title, total=total)
        yield lambda k: bar.update(job, advance=k)
    finally:
        bar.stop()


def evaluate(
    model: nn.Module,
    task: Task,
    split: str = "test",
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    progress: bool = False,
    config: DataConfig | ModelSpec | None = None,
    cache_max_bytes: int = 2 << 30,
) -> EvalResult:
    """Top-1 of ``model`` on a split of ``task`` (first ``limit`` examples if given).

    ``config`` is the model's input configuration (a ModelSpec resolves it through its adapter); by default it is
    inferred from the model. ``batch_size`` defaults to 64 on CPU (faster than large batches there) and 512 on a
    GPU. The model is put in eval mode for the call and its previous mode restored.
    """
    config = _input_config(model, task, config)
    ds = task.split(split)  # type: ignore[arg-type]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise QvecError(f"limit must be a positive number of images, got {limit}")
    if batch_size is not None:
        check_count(batch_size, "--batch-size", 1)
    n = len(ds) if limit is None else min(limit, len(ds))
    labels = ds.labels[:n]
    cached = ds.tensors(config, max_bytes=cache_max_bytes) if n else None
    was_training = model.training
    model.eval()
    device = model_device(model)
    labels = labels.to(device)
    if batch_size is None:
        batch_size = GPU_EVAL_BATCH if device.type == "cuda" else CPU_EVAL_BATCH
    check_batch(min(batch_size, max(n, 1)), config.image_size)  # a batch never holds more than the n images
    correct = 0
    t0 = time.perf_counter()
    try:
        with _progress_bar(progress, f"eval {task.name}/{split}", n) as advance, torch.inference_mode():
            for s, e, x in _batches(ds, n, batch_size, cached, config):
                with autocast_for(device):
                    pred = model(x.to(device, non_blocking=True)).argmax(dim=-1)
                correct += int((pred == labels[s:e]).sum())
                advance(e - s)
    finally:
        model.train(was_training)
    secs = time.perf_counter() - t0
    return EvalResult(correct / n if n else 0.0, correct, n, secs)


def check_checkpoint_task(ckpt: Checkpoint, spec: ModelSpec, task: Task) -> None:
    """A checkpoint's head must match the task: same class count and, when recorded, the same class names."""
    if spec.num_classes != task.num_classes:
        raise QvecError(
            f"{ckpt.name()}: head has {spec.num_classes} classes but task {task.name!r} has {task.num_classes}"
        )
    raw = ckpt.meta.get(META_CLASSES)
    if raw:
        try:
            names = json.loads(raw)
        except ValueError:
            return
        if isinstance(names, list) and [str(c) for c in names] != list(task.classes):
            raise QvecError(
                f"{ckpt.name()}: trained for classes {names[:4]}... but task {task.name!r} has "
                f"{list(task.classes)[:4]}... (another task's head)"
            )


def evaluate_checkpoint(
    ckpt: Checkpoint | str | Path,
    task: Task,
    split: str = "test",
    quant: QuantizerConfig | QuantSpec | None = None,
    targets: TargetFilter | bool = ALL_TARGETS,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    progress: bool = False,
    check_classes: bool = True,
) -> EvalResult:
    """Load a checkpoint, optionally apply PTQ (``quant``) to the adapter's targets, and evaluate it."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint.load(ckpt)
    spec = ckpt.model_spec
    if check_classes:
        check_checkpoint_task(ckpt, spec, task)
    model, adapter, spec = load_model(ckpt, spec)
    if quant is not None:
        quantize_(model, quant, TargetFilter.of(targets).find(model, adapter.head_prefixes))
    return evaluate(model, task, split, batch_size=batch_size, limit=limit, progress=progress,
                    config=adapter.data_config(spec, model))


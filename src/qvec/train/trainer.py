"""Fine-tuning (FT and QAT) and pretraining loops: deterministic, resumable, with a JSON log.

FT and QAT run the same code with the same recipe and seed: same head initialisation, same data order, same
augmentation draws. The only difference is that QAT registers fake quantization on the adapter's targets
(:func:`qvec.qat.prepare_qat`) before training and removes it (:func:`qvec.qat.convert_qat`) before saving, so the
QAT checkpoint holds plain latent weights under the FT keys (SPEC sections 1, 3, 4).

Determinism: the model is initialised under ``torch.manual_seed(recipe.seed)``; every epoch draws its data order
and augmentation from a generator seeded by ``(seed, epoch)``, so nothing depends on how many epochs ran in this
process. Resumability: after every epoch the model, optimizer and log are saved atomically to
``<out>.state.pt``; running the same command again continues after the last finished epoch and ends with the same
weights as an uninterrupted run. The state file is removed once ``out`` is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qvec.core.atomic import check_output, file_kind
from qvec.core.checkpoint import Checkpoint, atomic_path, fingerprint_tensors
from qvec.core.errors import QvecError
from qvec.core.limits import check_batch
from qvec.core.schema import (  # grid.run imports META_RECIPE, META_TRAIN_SECONDS and META_INCLUDE_IN_PROJ from here
    META_CLASSES,
    META_FINGERPRINT,
    META_INCLUDE_IN_PROJ,
    META_INIT,
    META_KIND,
    META_QUANT,
    META_RECIPE,
    META_TASK,
    META_TRAIN_SECONDS,
)
from qvec.data.tasks import Task, TaskSplit, load_jpeg_corpus, normalize
from qvec.models import DataConfig, ModelAdapter, ModelSpec, build_model, checkpoint_from_model, get_adapter
from qvec.models.loading import load_backbone_state
from qvec.quant import QuantizerConfig, quantize_
from qvec.quant.grid import QuantSpec
from qvec.quant.qat import convert_qat, prepare_qat
from qvec.quant.targets import ALL_TARGETS, TargetFilter
from qvec.train.evaluate import autocast_for, evaluate, resolve_device
from qvec.train.recipe import Recipe

STATE_VERSION = 1


def state_path(out: str | Path) -> Path:
    """The per-epoch resume file that lives next to ``out``."""
    return Path(out).with_suffix(".state.pt")


def progress_path(out: str | Path) -> Path:
    """The small JSON file a running training keeps current (step, total, img/s), for grid drivers to show."""
    return Path(out).with_suffix(".progress.json")


class _ProgressFile:
    """Writes ``{"step", "total", "ips", "title"}`` beside the output at most every ``every_s`` seconds."""

    def __init__(self, out: Path, total: int, title: str, every_s: float = 2.0) -> None:
        self.path, self.total, self.title, self.every_s, self.last = progress_path(out), total, title, every_s, 0.0

    def update(self, step: int, ips: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s or step >= self.total:
            self.last = now
            try:
                _write_json(self.path, {"step": step, "total": self.total, "ips": round(ips, 1), "title": self.title})
            except QvecError:
                pass  # progress is a courtesy: a full disk shows up where the checkpoint is written

    def close(self) -> None:
        if file_kind(self.path) is None:  # a regular file (ours) or nothing: never unlink a FIFO or device
            self.path.unlink(missing_ok=True)


def log_path_for(out: str | Path) -> Path:
    """The default JSON log next to ``out``."""
    return Path(out).with_suffix(".log.json")


def lr_at(step: int, total: int, recipe: Recipe) -> float:
    """Linear warm-up over ``warmup_steps`` (capped at the run length), then cosine decay to ``min_lr_ratio``."""
    warm = min(recipe.warmup_steps, max(0, total - 1))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    span = max(1, total - warm)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step + 1 - warm) / span)))
    return recipe.lr * (recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cos)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG of one epoch (data order and augmentation), independent of earlier epochs in this process."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def augment_batch(x: torch.Tensor, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    """Random crop with zero padding of 1/8 of the side (4 px at 32x32), then optional horizontal flips."""
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad))
    offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).tolist()
    out = torch.stack([xp[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs)])
    flips = torch.rand(b, generator=gen) < 0.5
    if hflip and bool(flips.any()):
        out[flips] = out[flips].flip(-1)
    return out


def make_batch(split: TaskSplit, idx: torch.Tensor, config: DataConfig, recipe: Recipe,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One preprocessed (optionally augmented) training batch."""
    x = split.load(idx, config.image_size, config.interpolation)
    if recipe.augment:
        x = augment_batch(x, gen, recipe.hflip)
    return normalize(x, config.mean, config.std), split.labels.index_select(0, idx)


@dataclass
class _Job:
    """Everything one training run needs (shared by finetune and pretrain)."""

    model: nn.Module
    adapter: ModelAdapter
    spec: ModelSpec
    task: Task
    recipe: Recipe
    out: Path
    kind: str
    meta: dict
    qat: QuantSpec | None
    eval_quant: QuantSpec | QuantizerConfig | None
    targets: TargetFilter
    progress: bool
    log_path: Path
    run_key: str
    fingerprint_after: bool = False  # pretraining: fingerprint the trained backbone
    device: torch.device = torch.device("cpu")


def canonical_name(name: str) -> str:
    """A parameter's FT name: ``blocks.0.fc1.parametrizations.weight.original`` -> ``blocks.0.fc1.weight``."""
    return re.sub(r"\.parametrizations\.(\w+)\.original$", r".\1", name)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters sorted by their FT name, so FT and QAT (parametrized) models list them in the same
    order: the optimizer and gradient clipping then do bit-identical arithmetic in both."""
    named = [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    return [p for _, p in sorted(named, key=lambda t: t[0])]


def _run_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def _float_copy(job: _Job) -> nn.Module:
    """A copy of the model computing with its float (latent) weights.

    Parametrized (QAT) modules cannot be deep-copied, so those are rebuilt and given the latent weights.
    """
    if job.qat is None:
        return copy.deepcopy(job.model)
    state = {canonical_name(k): v for k, v in job.model.state_dict().items()}
    with torch.random.fork_rng(devices=[]):
        model = build_model(job.spec, pretrained=False)
    model.load_state_dict(state)
    return model.to(job.device)


def _val_accuracy(job: _Job, quant: QuantSpec | QuantizerConfig | None) -> float | None:
    """Validation top-1 of the float model, or after PTQ with ``quant`` (None when there is no val split)."""
    val = job.task.split("val")
    if len(val) == 0:
        return None
    config = job.adapter.data_config(job.spec, job.model)
    if job.qat is not None and quant == job.qat:
        # The QAT forward already computes with RTN(latent weights) on the targets: that is exactly PTQ.
        model = job.model
    else:
        model = _float_copy(job)
        if quant is not None:
            quantize_(model, quant, job.targets.find(model, job.adapter.head_prefixes))
    return evaluate(model, job.task, "val", batch_size=job.recipe.eval_batch_size, limit=job.recipe.val_limit,
                    config=config).accuracy


def _progress(enabled: bool, total_steps: int, done_steps: int, title: str):
    """A live bar on a terminal; plain lines every so often when stderr is a file or pipe (a log is never silent
    through a long training: :mod:`qvec.core.progress`)."""
    if not enabled:
        return None, None
    from qvec.core.progress import LineProgress, stderr_is_terminal

    if not stderr_is_terminal():
        bar = LineProgress()
        return bar, bar.add_task(title, total=total_steps, completed=done_steps, loss="-", ips="-")
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True))
    bar.start()
    job = bar.add_task(title, total=total_steps, completed=done_steps, loss="-", ips="-")
    return bar, job


@dataclass
class _Plan:
    """The shape of one training run: its examples, input configuration and schedule length."""

    train_split: TaskSplit
    n: int  # training examples used (the first ``train_limit`` of the split)
    config: DataConfig
    steps_per_epoch: int
    epochs: int

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs


def _plan(job: _Job) -> _Plan:
    recipe, task = job.recipe, job.task
    train_split = task.split("train")
    n = len(train_split) if recipe.train_limit is None else min(recipe.train_limit, len(train_split))
    if n == 0:
        raise QvecError(f"task {task.name!r} has no training examples")
    config = job.adapter.data_config(job.spec, job.model)
    check_batch(min(recipe.micro_batch, n), config.image_size, "the training batch (--batch-size)", training=True)
    return _Plan(train_split, n, config, math.ceil(n / recipe.batch_size), recipe.epochs_for(n))


def _load_state(job: _Job, opt: torch.optim.Optimizer, spath: Path) -> tuple[int, float, dict]:
    """Restore model and optimizer from the resume file; returns (epochs done, training seconds, log)."""
    try:
        st = torch.load(spath, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise QvecError(f"{spath}: unreadable resume state ({type(e).__name__}); delete it to start over") from None
    if st.get("run_key") != job.run_key:
        raise QvecError(f"{spath}: resume state of a different run (model, task, recipe, init or quantization "
                        "differ); delete it or rerun the original command")
    job.model.load_state_dict(st["model"])
    opt.load_state_dict(st["optim"])
    return int(st["epoch"]), float(st["train_seconds"]), json.loads(st["log"])


def _save_state(job: _Job, spath: Path, opt: torch.optim.Optimizer, epochs_done: int, train_seconds: float,
                log: dict) -> None:
    with atomic_path(spath) as tmp:
        torch.save({"version": STATE_VERSION, "run_key": job.run_key, "epoch": epochs_done,
                    "model": job.model.state_dict(), "optim": opt.state_dict(),
                    "train_seconds": train_seconds, "log": json.dumps(log)}, tmp)


def _optimizer_step(job: _Job, params: list[nn.Parameter], opt: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor, step: int, total: int) -> float:
    """One optimizer step on a batch, its gradient accumulated over micro-batches; returns the batch's summed loss."""
    recipe = job.recipe
    x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
    batch_loss = 0.0
    for m in range(0, len(y), recipe.micro_batch):
        xm, ym = x[m : m + recipe.micro_batch], y[m : m + recipe.micro_batch]
        with autocast_for(job.device):
            logits = job.model(xm)
        loss = F.cross_entropy(logits.float(), ym, label_smoothing=recipe.label_smoothing)
        (loss * (len(ym) / len(y))).backward()
        batch_loss += loss.item() * len(ym)
    if not math.isfinite(batch_loss):
        raise QvecError(f"training diverged: loss is {batch_loss} at step {step} of {job.task.name}; "
                        "lower the learning rate")
    if recipe.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, total, recipe)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return batch_loss


def _train_epoch(job: _Job, plan: _Plan, params: list[nn.Parameter], opt: torch.optim.Optimizer, epoch: int,
                 step: int, report: Callable[[int, float, float], None]) -> tuple[dict, int, float]:
    """Epoch ``epoch`` (0-based), starting at global step ``step``; ``report(step, mean loss, img/s)`` after every
    step. Returns the epoch's log entry (before validation), the next step and the seconds it took."""
    model, recipe = job.model, job.recipe
    model.train()
    torch.manual_seed(recipe.seed + epoch)  # any stochastic layers (dropout, drop-path)
    gen = epoch_generator(recipe.seed, epoch)
    perm = torch.randperm(plan.n, generator=gen)
    digest = hashlib.sha256(perm.numpy().tobytes())
    t0, loss_sum, seen = time.perf_counter(), 0.0, 0
    for b in range(plan.steps_per_epoch):
        idx = perm[b * recipe.batch_size : (b + 1) * recipe.batch_size]
        x, y = make_batch(plan.train_split, idx, plan.config, recipe, gen)
        digest.update(x.numpy().tobytes()[:4096])
        batch_loss = _optimizer_step(job, params, opt, x, y, step, plan.total)
        step += 1
        loss_sum += batch_loss
        seen += len(idx)
        report(step, batch_loss / len(idx), seen / max(1e-9, time.perf_counter() - t0))
    secs = time.perf_counter() - t0
    entry = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "seconds": round(secs, 3),
             "images_per_s": round(seen / secs, 1), "lr_end": lr_at(step - 1, plan.total, recipe),
             "data_digest": digest.hexdigest()[:16]}
    return entry, step, secs


def _log_epoch(job: _Job, log: dict, entry: dict, train_seconds: float) -> None:
    """Add the validation accuracies (float, and after PTQ with ``eval_quant``) to ``entry``; write the log."""
    entry["val_acc"] = _val_accuracy(job, None)
    if job.eval_quant is not None:
        entry["val_acc_ptq"] = _val_accuracy(job, job.eval_quant)
        entry["ptq"] = str(job.eval_quant)
    log["epochs"].append(entry)
    log["train_seconds"] = round(train_seconds, 3)
    _write_json(job.log_path, log)


def _save_checkpoint(job: _Job, train_seconds: float, log: dict, spath: Path) -> Checkpoint:
    """The trained model as a plain checkpoint (QAT converted back to latent weights) at ``job.out``."""
    model = job.model
    if job.qat is not None:
        convert_qat(model)
    model.eval().cpu()
    meta = dict(job.meta)
    meta[META_RECIPE] = job.recipe.to_json()
    meta[META_TRAIN_SECONDS] = f"{train_seconds:.3f}"
    if job.fingerprint_after:
        state = model.state_dict()
        meta[META_FINGERPRINT] = fingerprint_tensors(state, job.adapter.backbone_keys(state))
    ckpt = checkpoint_from_model(model, job.spec, **meta)
    ckpt.save(job.out)
    log["train_seconds"] = round(train_seconds, 3)
    log["checkpoint"] = str(job.out)
    _write_json(job.log_path, log)
    spath.unlink(missing_ok=True)
    return ckpt


def _train(job: _Job, resume: bool = True, on_epoch: Callable[[int], None] | None = None) -> Checkpoint:
    for path in (job.out, state_path(job.out), job.log_path, progress_path(job.out)):  # before any training
        check_output(path)  # every file the run writes: regular or new (never a FIFO, device or directory)
    recipe, plan = job.recipe, _plan(job)
    job.model.to(job.device)
    params = trainable_parameters(job.model)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    spath = state_path(job.out)
    log = {"task": job.task.name, "kind": job.kind, "recipe": json.loads(recipe.to_json()), "train_examples": plan.n,
           "epochs_run": plan.epochs, "quant": job.qat.to_dict() if job.qat else None, "epochs": []}
    start_epoch, train_seconds = 0, 0.0
    if resume and spath.is_file():
        start_epoch, train_seconds, log = _load_state(job, opt, spath)
    title = f"{job.kind} {job.spec.name} {job.task.name}"
    bar, bar_job = _progress(job.progress, plan.total, start_epoch * plan.steps_per_epoch, title)
    step = start_epoch * plan.steps_per_epoch
    shown = _ProgressFile(job.out, plan.total, title)

    def report(done: int, loss: float, ips: float) -> None:
        shown.update(done, ips)
        if bar is not None:
            bar.update(bar_job, advance=1, loss=f"{loss:.4f}", ips=f"{ips:.0f}")

    try:
        for epoch in range(start_epoch, plan.epochs):
            entry, step, secs = _train_epoch(job, plan, params, opt, epoch, step, report)
            train_seconds += secs
            _log_epoch(job, log, entry, train_seconds)
            if epoch + 1 < plan.epochs:
                _save_state(job, spath, opt, epoch + 1, train_seconds, log)
            if on_epoch is not None:
                on_epoch(epoch + 1)
    finally:
        shown.close()
        if bar is not None:
            bar.stop()
    return _save_checkpoint(job, train_seconds, log, spath)


def _load_init(model: nn.Module, adapter: ModelAdapter, init: str | Path) -> tuple[str, dict]:
    """Load theta_0's backbone into ``model`` (the head stays freshly initialised); return its fingerprint.

    The adapter's checkpoint filter applies, so a backbone file made at another input size is resampled."""
    ck = Checkpoint.load(init)
    load_backbone_state(model, {k: v for k, v in ck.state.items() if not adapter.is_head(k)}, adapter, str(init))
    fp = ck.fingerprint or fingerprint_tensors(ck.state, [k for k in adapter.backbone_keys(ck.state)])
    return fp, ck.meta


def _init_head(model: nn.Module, adapter: ModelAdapter, spec: ModelSpec, task: Task) -> None:
    """A fresh head for ``task`` (or the adapter's own, e.g. CLIP zero-shot), frozen when the adapter says so."""
    adapter.init_head(model, spec, list(task.classes), task.name)
    if not adapter.trainable_head(spec):
        for name, p in model.named_parameters():
            if adapter.is_head(name):
                p.requires_grad_(False)


def _finetune_meta(task: Task, qat: QuantSpec | None, fingerprint: str, targets: TargetFilter,
                   init: str | Path | None) -> dict:
    """The header of a fine-tuned checkpoint (the recipe and training time are added once it is trained)."""
    meta = {META_TASK: task.name, META_KIND: "qat" if qat else "ft", META_FINGERPRINT: fingerprint,
            META_CLASSES: json.dumps(list(task.classes)), META_INCLUDE_IN_PROJ: json.dumps(targets.record())}
    if qat is not None:
        meta[META_QUANT] = json.dumps(qat.to_dict())
    if init is not None:
        meta[META_INIT] = Path(init).name  # a name, not a local path; the weights are identified by the fingerprint
    return meta


def finetune(
    spec: ModelSpec,
    task: Task,
    recipe: Recipe,
    out: str | Path,
    *,
    init: str | Path | None = None,
    qat: QuantSpec | QuantizerConfig | None = None,
    targets: TargetFilter | bool = ALL_TARGETS,
    progress: bool = True,
    log_path: str | Path | None = None,
    eval_quant: QuantSpec | QuantizerConfig | None = None,
    pretrained: bool | None = None,
    resume: bool = True,
    on_epoch: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
    weights: str | Path | None = None,
) -> Checkpoint:
    """Fine-tune ``spec`` on ``task`` from theta_0 (FT, or QAT when ``qat`` is given) and save to ``out``.

    ``init`` is theta_0's file; without it hub-pretrained weights are used (random init for qvec's small ViTs,
    unless ``pretrained`` says otherwise). The head is freshly initialised for the task (or built by the adapter,
    e.g. CLIP zero-shot heads, and frozen when the adapter says so). The JSON log (default ``<out>.log.json``) has
    per-epoch train loss and validation accuracy, and for QAT (or when ``eval_quant`` is given) validation
    accuracy after PTQ. ``on_epoch`` is called after each finished epoch (used by the tests to interrupt a run).
    ``device`` defaults to the GPU when there is one (bf16 autocast there); CPU runs are bit-for-bit deterministic.
    ``weights`` is a local copy of the family's pretrained weights (e.g. an OpenCLIP or timm file from the hub),
    loaded by the adapter, for machines without network access.
    """
    spec = spec.with_classes(task.num_classes)
    adapter = get_adapter(spec)
    targets = TargetFilter.of(targets)
    if isinstance(qat, QuantizerConfig):  # QAT for a quantizer trains on its trainable grid
        qat = qat.trainable_grid
    if pretrained is None:
        pretrained = init is None and adapter.has_hub_weights
    torch.manual_seed(recipe.seed)
    model = build_model(spec, pretrained=pretrained and not weights, weights=str(weights) if weights else None)
    fingerprint, init_meta = None, {}
    if init is not None:
        fingerprint, init_meta = _load_init(model, adapter, init)
    else:
        state = model.state_dict()
        fingerprint = fingerprint_tensors(state, adapter.backbone_keys(state))
    _init_head(model, adapter, spec, task)
    if qat is not None:
        prepare_qat(model, qat, targets.find(model, adapter.head_prefixes))
    meta = _finetune_meta(task, qat, fingerprint, targets, init)
    run_key = _run_key("finetune", spec.to_json(), task.name, task.source, recipe.to_json(),
                       qat.to_dict() if qat else None, targets.record(), fingerprint,
                       eval_quant.to_dict() if eval_quant else None)
    job = _Job(model, adapter, spec, task, recipe, Path(out), meta[META_KIND], meta, qat,
               eval_quant if eval_quant is not None else qat, targets, progress,
               Path(log_path) if log_path else log_path_for(out), run_key, device=resolve_device(device))
    return _train(job, resume=resume, on_epoch=on_epoch)


def pretrain(
    spec: ModelSpec,
    data_file: str | Path,
    recipe: Recipe,
    out: str | Path,
    *,
    progress: bool = True,
    log_path: str | Path | None = None,
    resume: bool = True,
    on_epoch: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
) -> Checkpoint:
    """Train theta_0 from scratch on a JPEG corpus (``pretrain_cifar10.npz``), decoded in memory.

    The corpus's validation split (SPEC rule) is held out and its accuracy logged per epoch. The checkpoint has
    ``qvec.kind = pretrained`` and the fingerprint of its own backbone, which every fine-tune from it inherits.
    """
    task = load_jpeg_corpus(data_file)
    spec = spec.with_classes(task.num_classes)
    adapter = get_adapter(spec)
    torch.manual_seed(recipe.seed)
    model = build_model(spec, pretrained=False)
    meta = {META_TASK: f"pretrain:{Path(data_file).stem}", META_KIND: "pretrained",
            META_CLASSES: json.dumps(list(task.classes))}
    run_key = _run_key("pretrain", spec.to_json(), task.source, recipe.to_json())
    job = _Job(model, adapter, spec, task, recipe, Path(out), "pretrained", meta, None, None, ALL_TARGETS, progress,
               Path(log_path) if log_path else log_path_for(out), run_key, fingerprint_after=True,
               device=resolve_device(device))
    return _train(job, resume=resume, on_epoch=on_epoch)

"""Everything about a study config that can be checked before any work starts, each problem one line naming the
file and the key (:func:`validate`)."""

from __future__ import annotations

import math
from dataclasses import fields

from qvec.core.errors import QvecError
from qvec.data.tasks import PAPER_TASKS, local_task_files, locate_task, resolve_data_dir
from qvec.grid.config_model import GridConfig, PipelineConfig
from qvec.grid.typecheck import describe, field_types, fits
from qvec.models import get_adapter
from qvec.train.recipe import Recipe
from qvec.vectors.vector import COVERAGES

#: when a study measures the test split: at the selected lambdas (1, lambda* and each rule's choice) or at all
TEST_LAMBDAS = ("selected", "all")
#: calibration sources a pipeline may name besides a probe file or folder
CALIBRATION_SOURCES = ("receiver", "noise")


def coverage_names() -> tuple[str, ...]:
    return tuple(COVERAGES)


def validate(cfg: GridConfig, check_tasks: bool = True) -> GridConfig:
    """Check ``cfg`` in place (filling donors and receivers from tasks); raise one-line QvecErrors."""
    src = cfg.source
    if not cfg.name or not all(c.isalnum() or c in "-_." for c in cfg.name):
        raise QvecError(f"{src}: name must be non-empty letters, digits, '-', '_' or '.', got {cfg.name!r}")
    try:
        spec = cfg.model_spec()
        get_adapter(spec).check_spec(spec)
    except QvecError as e:
        key = "model_options" if cfg.model_options else "model"
        raise QvecError(f"{src}: {key}: {e}") from None
    if not cfg.tasks:
        raise QvecError(f"{src}: tasks is empty; list at least one task")
    for key in ("tasks", "donors", "receivers"):
        vals = getattr(cfg, key)
        if len(set(vals)) != len(vals):
            dup = next(v for v in vals if vals.count(v) > 1)
            raise QvecError(f"{src}: {key} lists {dup!r} twice")
    cfg.donors = cfg.donors or list(cfg.tasks)
    cfg.receivers = cfg.receivers or list(cfg.tasks)
    _grid(cfg)
    _eval(cfg)
    _rules(cfg)
    _pipelines(cfg)
    _backbone(cfg)
    _recipes(cfg)
    if check_tasks:
        _tasks(cfg)
    return cfg


def _lambdas(src: str, where: str, lambdas: list) -> list[float]:
    if not lambdas:
        raise QvecError(f"{src}: the lambda grid is empty; give at least one value (SPEC: 0.15 .. 1.5)")
    for lam in lambdas:
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam <= 0:
            raise QvecError(f"{src}: {where} must be positive finite numbers, got {lam!r}")
    if len(set(lambdas)) != len(lambdas):
        raise QvecError(f"{src}: {where} lists a value twice")
    return [float(v) for v in lambdas]


def _grid(cfg: GridConfig) -> None:
    """Bit-widths (the integer grid itself is QuantSpec's to check), the lambda grid, coverages and seeds."""
    src = cfg.source
    if not cfg.bits:
        raise QvecError(f"{src}: bits is empty; give at least one bit-width (2..8)")
    for b in cfg.bits:
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise QvecError(f"{src}: bits must be integers in 2..8, got {b!r}")
    if len(set(cfg.bits)) != len(cfg.bits):
        raise QvecError(f"{src}: bits lists a bit-width twice")
    for b in cfg.bits:  # the grid's checks are QuantSpec's own
        try:
            cfg.quant(b)
        except QvecError as e:
            raise QvecError(f"{src}: quant: {e}") from None
    cfg.lambdas = _lambdas(src, "lambdas", cfg.lambdas)
    bad = [c for c in cfg.coverages if c not in coverage_names()]
    if not cfg.coverages or bad:
        raise QvecError(f"{src}: coverages must be a non-empty list of {', '.join(coverage_names())}, got "
                        f"{cfg.coverages!r}")
    if len(set(cfg.coverages)) != len(cfg.coverages):
        raise QvecError(f"{src}: coverages lists a coverage twice")
    for s in cfg.seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise QvecError(f"{src}: seeds must be non-negative integers, got {s!r}")


def _positive(src: str, where: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise QvecError(f"{src}: {where} must be a positive integer, got {v!r}")


def _eval(cfg: GridConfig) -> None:
    src, ev = cfg.source, cfg.eval
    for key in ("val_limit", "test_limit", "batch_size"):
        _positive(src, f"eval.{key}", getattr(ev, key), allow_none=True)
    if ev.test_lambdas not in TEST_LAMBDAS:
        raise QvecError(f"{src}: eval.test_lambdas must be one of {', '.join(TEST_LAMBDAS)}, got {ev.test_lambdas!r}")


def _rules(cfg: GridConfig) -> None:
    src, rc = cfg.source, cfg.rules
    try:
        rules = rc.rules(cfg.select_lambda)
    except QvecError as e:
        raise QvecError(f"{src}: rules.use: {e}") from None
    for key in ("probe_size", "unlabeled_size"):
        _positive(src, f"rules.{key}", getattr(rc, key))
    if any(r.signal == "probe" for r in rules) and not rc.probe:
        raise QvecError(f"{src}: rules.use names an agree rule but rules.probe is not set (an .npz, a folder "
                        "or 'noise')")
    cfg.probe_path()
    for t in rc.probe_domain:
        if t not in cfg.all_tasks:
            raise QvecError(f"{src}: rules.probe_domain: {t!r} is not one of the grid's tasks")
    if rc.donor_mean and len(cfg.donors) < 3:
        raise QvecError(f"{src}: rules.donor_mean needs at least 3 donors (the mean of the others), got "
                        f"{len(cfg.donors)}")


def _pipelines(cfg: GridConfig) -> None:
    src = cfg.source
    if cfg.is_legacy() and "rtn" not in cfg.quantizers:
        raise QvecError(f"{src}: quantizers must include 'rtn' (the paper's pipeline)")
    for name, p in cfg.pipelines.items():
        where = name if cfg.is_legacy() else f"pipelines.{name}"
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise QvecError(f"{src}: pipeline names are letters, digits, '-' or '_', got {name!r}")
        _pipeline(cfg, where, p)


def _pipeline(cfg: GridConfig, where: str, p: PipelineConfig) -> None:
    src = cfg.source
    extra = [b for b in p.bits if isinstance(b, bool) or b not in cfg.bits]
    if extra:
        raise QvecError(f"{src}: {where}.bits: {extra[0]!r} is not one of the study's bits {cfg.bits}")
    if p.lambdas:
        p.lambdas = _lambdas(src, f"{where}.lambdas", p.lambdas)
    bad = [c for c in p.coverages if c not in coverage_names()]
    if bad or len(set(p.coverages)) != len(p.coverages):
        raise QvecError(f"{src}: {where}.coverages must list each of {', '.join(coverage_names())} at most once, "
                        f"got {p.coverages!r}")
    for b in p.bits or cfg.bits:
        try:
            p.config(cfg.quant(b))
        except (QvecError, TypeError) as e:
            raise QvecError(f"{src}: {where.removeprefix('pipelines.')}: {e}") from None
    if not p.quantizer_type().needs_calibration:
        return
    if isinstance(p.images, bool) or not isinstance(p.images, int) or p.images < 8:
        raise QvecError(f"{src}: {where}.images must be an integer of at least 8, got {p.images!r}")
    if p.calibration not in CALIBRATION_SOURCES:
        cfg.resolve_data_file(p.calibration, f"{where}.calibration")


def _backbone(cfg: GridConfig) -> None:
    src = cfg.source
    adapter = get_adapter(cfg.model_spec())
    if not cfg.backbone:
        if cfg.pretrain is not None:
            cfg.backbone = "pretrain"
        elif not adapter.has_hub_weights:
            raise QvecError(f"{src}: the built-in model {cfg.model!r} has no pretrained weights; add a [pretrain] "
                            "section or set backbone to a weights file")
        else:
            cfg.backbone = "hub"
    if cfg.backbone == "pretrain":
        if cfg.pretrain is None:
            raise QvecError(f"{src}: backbone = 'pretrain' needs a [pretrain] section with data = FILE")
        cfg.pretrain_file()
    elif cfg.backbone == "hub":
        if not adapter.has_hub_weights:
            raise QvecError(f"{src}: the built-in model {cfg.model!r} has no hub weights; use [pretrain]")
    elif not cfg.resolve_path(cfg.backbone).is_file():
        raise QvecError(f"{src}: backbone {cfg.backbone!r} is not 'pretrain', 'hub' or an existing file")


def _recipes(cfg: GridConfig) -> None:
    src = cfg.source
    if cfg.profile is not None:
        try:
            Recipe.for_task(cfg.tasks[0], cfg.model_spec(), cfg.profile)
        except QvecError as e:
            raise QvecError(f"{src}: profile: {e}") from None
    known = {f.name for f in fields(Recipe)}
    types = field_types(Recipe)
    sections = [("recipe", cfg.recipe)] + [(f"recipe.tasks.{t}", r) for t, r in cfg.task_recipes.items()]
    if cfg.pretrain is not None:
        sections.append(("pretrain", cfg.pretrain.recipe))
    for where, overrides in sections:
        for k, v in overrides.items():
            if k not in known:
                raise QvecError(f"{src}: {where}.{k} is not a recipe field; known: {', '.join(sorted(known))}")
            if not fits(v, types[k]):
                raise QvecError(f"{src}: {where}.{k} must be {describe(types[k])}, got {v!r}")
    spec = cfg.model_spec()
    for t in cfg.all_tasks:  # the recipes the plan will build, each checked whole
        where = f"recipe.tasks.{t}" if t in cfg.task_recipes else "recipe"
        try:
            Recipe.for_task(t, spec, cfg.profile).override(**{**cfg.recipe, **cfg.task_recipes.get(t, {})})
        except QvecError as e:
            raise QvecError(f"{src}: {where}: {e}") from None
    if cfg.pretrain is not None:
        try:
            try:
                base = Recipe.for_pretraining(spec, cfg.profile)
            except QvecError:
                base = Recipe()
            base.override(**cfg.pretrain.recipe)
        except QvecError as e:
            raise QvecError(f"{src}: pretrain: {e}") from None
    for t in cfg.task_recipes:
        if t not in cfg.all_tasks:
            raise QvecError(f"{src}: recipe.tasks.{t}: {t!r} is not one of the grid's tasks")


def _tasks(cfg: GridConfig) -> None:
    """Tasks are the data folder's file stems, the paper's task names (Hugging Face unless the folder has them),
    or ``hf:NAME``, exactly as :func:`qvec.data.tasks.get_task` will resolve them in the workers."""
    folder = resolve_data_dir(cfg.data_path())
    local = local_task_files(folder)
    for t in cfg.all_tasks:
        if locate_task(t, folder, local) is not None:
            continue
        where = f"{folder} has: {', '.join(local) or 'no .npz tasks'}; " if folder is not None else (
            "no data folder (--data or $QVEC_DATA); ")
        where += f"paper tasks: {', '.join(PAPER_TASKS)}"
        raise QvecError(f"{cfg.source}: unknown task {t!r} ({where})")

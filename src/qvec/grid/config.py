"""Grid configuration: one TOML or YAML file (or CLI flags) describes a whole donor x receiver study.

Every mistake a user can make in a config (a typo in a key, an unknown task, an empty lambda grid, bits out of
range, a missing pretraining file) is reported as one line naming the file and the key, before any work starts
(:mod:`qvec.grid.config_check`). Tables are checked against the real field types of the dataclasses below
(:mod:`qvec.grid.typecheck`).

Example (``configs/mini.toml`` is the full CPU-scale replication)::

    name = "demo"
    model = "qvec:vit-nano"
    tasks = ["mnist", "fashion_mnist", "gtsrb"]
    bits = [3]

    [pretrain]
    data = "pretrain_cifar10.npz"      # relative to data_dir, or a path
    epochs = 10

    [recipe]                           # overrides of Recipe.for_task for every FT and QAT
    epochs = 3

    [pipelines.paper]                  # each pipeline (a deploy quantizer) drives its own cells
    preset = "paper"
    [pipelines.hqq]
    preset = "hqq-g64"

    [eval]
    val_limit = 500                    # cap on the validation images used to choose lambda*
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from qvec.core.checkpoint import require_file
from qvec.core.errors import QvecError
from qvec.grid.config_check import CALIBRATION_SOURCES, TEST_LAMBDAS, coverage_names, validate
from qvec.grid.config_model import (
    BACKBONE_CHOICES,
    DEFAULT_LAMBDAS,
    EvalConfig,
    GridConfig,
    PipelineConfig,
    PretrainConfig,
    RulesConfig,
)
from qvec.quant import QuantSpec, get_quantizer, quantizer_names
from qvec.quant.presets import get_preset

__all__ = ["BACKBONE_CHOICES", "CALIBRATION_SOURCES", "DEFAULT_LAMBDAS", "TEST_LAMBDAS", "EvalConfig", "GridConfig",
           "PipelineConfig", "PretrainConfig", "RulesConfig", "config_from_dict", "coverage_names", "load_config",
           "validate"]


# ------------------------------------------------------------------------------------------------ loading
#: Keys that are shorthand for a model option (``img_size = 112`` is ``model_options.img_size = 112``).
_MODEL_OPTION_KEYS = ("img_size",)
_TOP_KEYS = ({f.name for f in fields(GridConfig)} - {"source", "task_recipes"}) | set(_MODEL_OPTION_KEYS) | {"quant"}
_EVAL_KEYS = {f.name for f in fields(EvalConfig)}
#: top-level keys that are not plain fields of GridConfig, each read by its own section reader below
_SECTIONS = ("recipe", "pretrain", "eval", "rules", "quant", "model_options", "pipelines")
#: the integer grid: ``[quant]``, or (as older configs do) top-level keys
_GRID_KEYS = ("granularity", "symmetric", "group_size", "full_range")


def _read_file(path: Path) -> dict:
    if path.is_dir():
        raise QvecError(f"{path}: is a folder; give a config file (.toml, .yaml or .yml)")
    require_file(path, "config file")  # a FIFO or device is named as such; the file is an input of the command
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise QvecError(f"{path}: config files are .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise QvecError(f"{path}: not valid {path.suffix[1:].upper()} ({str(e).splitlines()[0]})") from None
    except Exception as e:  # yaml.YAMLError and friends
        if type(e).__module__.startswith("yaml"):
            raise QvecError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        raise
    if not isinstance(data, dict):
        raise QvecError(f"{path}: the top level must be a table of keys")
    return data


def config_from_dict(raw: Mapping[str, Any], source: str = "<flags>") -> GridConfig:
    """Build (not yet validate) a GridConfig from parsed TOML/YAML; unknown keys are an error.

    Plain keys are checked against the types of GridConfig's fields; each table by its own dataclass."""
    from qvec.grid.typecheck import checked, field_types, table
    from qvec.train.recipe import Recipe  # noqa: F401  (recipe fields are checked in config_check)

    raw = dict(raw)
    tables = [q for q in quantizer_names() if q != "rtn"]
    for k in raw:
        if k not in _TOP_KEYS and k not in tables:
            raise QvecError(f"{source}: unknown key {k!r}; known: {', '.join(sorted(_TOP_KEYS))}")
    for req in ("model", "tasks"):
        if req not in raw:
            raise QvecError(f"{source}: missing required key {req!r}")
    types_ = field_types(GridConfig)
    kw: dict[str, Any] = {k: checked(source, k, v, types_[k]) for k, v in raw.items()
                          if k in types_ and k not in _SECTIONS}
    kw.update(_model_options(source, raw))
    kw.update(_grid_table(source, raw))
    if "recipe" in raw:
        rec = checked(source, "recipe", raw["recipe"], dict)
        per_task = checked(source, "recipe.tasks", rec.pop("tasks", {}), dict)
        kw["recipe"] = rec
        kw["task_recipes"] = {t: checked(source, f"recipe.tasks.{t}", r, dict) for t, r in per_task.items()}
    if "pretrain" in raw:
        pre = checked(source, "pretrain", raw["pretrain"], dict)
        if "data" not in pre:
            raise QvecError(f"{source}: [pretrain] needs data = FILE (the JPEG corpus, e.g. pretrain_cifar10.npz)")
        data = str(checked(source, "pretrain.data", pre.pop("data"), str))
        kw["pretrain"] = PretrainConfig(data, pre)
    if "eval" in raw:
        kw["eval"] = EvalConfig(**table(source, "eval", raw["eval"], EvalConfig))
    if "rules" in raw:
        rules = raw["rules"]  # `rules = ["agree", ...]` is short for `[rules] use = [...]`
        kw["rules"] = RulesConfig(**table(source, "rules", {"use": rules} if isinstance(rules, list) else rules,
                                          RulesConfig))
    kw["pipelines"] = _pipelines(source, raw, tables)
    if "name" not in kw:
        kw["name"] = Path(source).stem if source != "<flags>" else "grid"
    cfg = GridConfig(source=source, **kw)
    cfg._legacy = "pipelines" not in raw  # type: ignore[attr-defined]
    return cfg


def _pipelines(source: str, raw: Mapping[str, Any], tables: list[str]) -> dict[str, PipelineConfig]:
    """``[pipelines.NAME]`` tables; or, for older configs, ``quantizers = ["rtn", NAME]`` with ``[NAME]`` tables."""
    from qvec.grid.typecheck import checked

    if "pipelines" in raw:
        if "quantizers" in raw:
            raise QvecError(f"{source}: give either [pipelines.NAME] tables or quantizers = [...], not both")
        named = checked(source, "pipelines", raw["pipelines"], dict)
        if not named:
            raise QvecError(f"{source}: [pipelines] is empty; name at least one pipeline")
        return {name: _pipeline_table(source, f"pipelines.{name}", t) for name, t in named.items()}
    names = checked(source, "quantizers", raw.get("quantizers", ["rtn"]), list[str])
    for q in names:
        try:
            get_quantizer(q)
        except QvecError as e:
            raise QvecError(f"{source}: quantizers: {e}") from None
    out = {}
    for q in dict.fromkeys([*names, *(t for t in tables if t in raw)]):
        body = dict(raw.get(q, {})) if isinstance(raw.get(q, {}), dict) else raw.get(q)
        if isinstance(body, dict):
            body.setdefault("quantizer", q)
        out[q] = _pipeline_table(source, q, body)
    return out


def _pipeline_table(source: str, where: str, raw: Any) -> PipelineConfig:
    """A pipeline table: PipelineConfig's keys, and the quantizer's own knobs (its config's fields)."""
    from qvec.grid.typecheck import checked, table

    raw = checked(source, where, raw, dict)
    method = raw.get("quantizer", "rtn")
    if raw.get("preset"):
        method = get_preset(str(raw["preset"])).method
    try:
        knobs = get_quantizer(str(method), f"{where}.quantizer").knobs()
    except QvecError as e:
        raise QvecError(f"{source}: {e}") from None
    tab = table(source, where, raw, PipelineConfig, extra=knobs)
    if "options" in tab:
        raise QvecError(f"{source}: {where}: give the quantizer's options as keys of [{where}] itself")
    return PipelineConfig(**{k: v for k, v in tab.items() if k not in knobs},
                          options={k: v for k, v in tab.items() if k in knobs})


def _model_options(source: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``model_options`` and its top-level shorthands (``img_size = 112``)."""
    from qvec.grid.typecheck import checked

    opts = dict(checked(source, "model_options", raw["model_options"], dict)) if "model_options" in raw else {}
    for key in _MODEL_OPTION_KEYS:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise QvecError(f"{source}: {key} must be an integer (pixels), got {value!r}")
            if value < 1:
                raise QvecError(f"{source}: {key} must be a positive number of pixels, got {value}")
            opts[key] = value
    return {"model_options": opts} if opts else {}


def _grid_table(source: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The study's integer grid: a ``[quant]`` table of QuantSpec's fields (bits are the study's list), or the same
    keys at the top level; QuantSpec itself validates the values."""
    from qvec.grid.typecheck import table

    if "quant" not in raw:
        return {}
    flat = [k for k in _GRID_KEYS if k in raw]
    if flat:
        raise QvecError(f"{source}: {flat[0]} is given both at the top level and in [quant]; keep one")
    grid = table(source, "quant", raw["quant"], QuantSpec)
    if "bits" in grid:
        raise QvecError(f"{source}: quant.bits: the bit-widths are the top-level bits list")
    return grid


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    check_tasks: bool = True,
) -> GridConfig:
    """Read a TOML/YAML grid config, apply ``overrides`` (CLI flags; None values ignored), validate it."""
    raw: dict[str, Any] = {}
    source = "<flags>"
    if path is not None:
        p = Path(path).resolve()
        raw = _read_file(p)
        source = str(p)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k in _EVAL_KEYS:
            raw.setdefault("eval", {})[k] = v
        else:
            raw[k] = v
    return validate(config_from_dict(raw, source), check_tasks=check_tasks)


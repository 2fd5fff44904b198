"""Grid configuration: one TOML or YAML file (or CLI flags) describes a whole donor x receiver study.

Every mistake a user can make in a config (a typo in a key, an unknown task, an empty lambda grid, bits out of
range, a missing pretraining file) is reported as one line naming the file and the key, before any work starts.

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

    [recipe.tasks.mnist]               # per-task overrides
    epochs = 2

    [eval]
    val_limit = 500                    # cap on the validation images used to choose lambda*
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qvec.core.errors import QvecError
from qvec.data.tasks import PAPER_TASKS, local_task_files, locate_task, resolve_data_dir
from qvec.models import ModelSpec, get_adapter
from qvec.quant import QuantSpec, get_quantizer, quantizer_names
from qvec.train.recipe import Recipe
from qvec.vectors.rules import DEFAULT_LAMBDAS, get_rule

TEST_LAMBDAS = ("selected", "all")
BACKBONE_CHOICES = ("pretrain", "hub")


@dataclass
class EvalConfig:
    """How cells are measured. Limits cap the images per split (None: the whole split)."""

    val_limit: int | None = None
    test_limit: int | None = None
    #: "selected": test only at lambda = 1 and lambda* (val picks lambda*); "all": test at every lambda too.
    test_lambdas: str = "selected"
    #: None: ``qvec.evaluate``'s device default (64 on CPU, where small batches are faster).
    batch_size: int | None = None


@dataclass
class RulesConfig:
    """The lambda rules a study measures (:mod:`qvec.rules`) and the images the label-free ones score on.

    Every rule's choice is tested on the test split, so each gets its own row in the report. ``one`` (and ``val``
    while ``select_lambda`` is on) are always measured.
    """

    use: list[str] = field(default_factory=list)
    #: generic probe for the ``agree`` rules: an .npz or image folder (relative to data_dir, or a path)
    probe: str = ""
    probe_size: int = 1000
    #: how many of the receiver's own unlabeled validation inputs the ``agree-unlabeled`` rules score on
    unlabeled_size: int = 500
    #: the mean of every other donor's vector is a donor of its own (``mean``), per receiver
    donor_mean: bool = False
    #: receivers whose domain the generic probe shares (the report shows them apart)
    probe_domain: list[str] = field(default_factory=list)

    def rules(self, select_lambda: bool = True) -> list:
        names = ["one", *(["val"] if select_lambda else []), *self.use]
        out: dict[str, object] = {}
        for n in names:
            r = get_rule(n)
            out.setdefault(r.name, r)
        return list(out.values())


@dataclass
class PipelineConfig:
    """A PTQ pipeline measured beside the cells' RTN: ``quantizers = ["rtn", NAME]`` and its optional ``[NAME]``
    table, for any quantizer registered in :mod:`qvec.quant`.

    The table takes the quantizer config's own knobs (``options``: GPTQ's ``damp``, ``block_size``, ``act_order``,
    validated by that config class), ``bits`` (a subset of the study's; empty: all) and, for calibrated quantizers,
    ``calibration``: ``receiver`` (the receiver's own unlabeled training inputs), ``noise``, or a generic probe
    (.npz or image folder; relative to data_dir, or a path), of which ``images`` are used. Results record which.
    """

    calibration: str = "receiver"
    images: int = 128
    bits: list[int] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    @staticmethod
    def quantizer(name: str):
        return get_quantizer(name)

    def config(self, name: str, quant: QuantSpec):
        """The quantizer config of pipeline ``name`` on the grid ``quant``."""
        return self.quantizer(name).from_grid(quant, **self.options)




@dataclass
class PretrainConfig:
    """Pretraining of theta_0 from scratch on a JPEG corpus (``backbone = "pretrain"``)."""

    data: str
    recipe: dict = field(default_factory=dict)


@dataclass
class GridConfig:
    """A donor x receiver study: model, backbone, tasks, quantizer, lambda grid, recipe overrides, evaluation."""

    name: str
    model: str
    tasks: list[str]
    donors: list[str] = field(default_factory=list)
    receivers: list[str] = field(default_factory=list)
    bits: list[int] = field(default_factory=lambda: [3])
    granularity: str = "channel"
    symmetric: bool = True
    group_size: int = 128
    lambdas: list[float] = field(default_factory=lambda: list(DEFAULT_LAMBDAS))
    select_lambda: bool = True
    self_pairs: bool = True
    seeds: list[int] = field(default_factory=list)
    include_in_proj: bool = True
    #: QAT's own in_proj switch (None: same as ``include_in_proj``). ``include_in_proj = false`` with this true is
    #: the authors' OpenCLIP setting: QAT quantized the fused in_proj_weight, their PTQ left it in float.
    qat_include_in_proj: bool | None = None
    model_options: dict = field(default_factory=dict)
    #: "pretrain" (train theta_0, see ``pretrain``), "hub" (the family's pretrained weights) or a weights file.
    backbone: str = ""
    pretrain: PretrainConfig | None = None
    #: Recipe profile of the built-in ViTs (``quality`` or ``fast``; None: qvec.recipe.DEFAULT_PROFILE), the base
    #: that ``recipe`` and ``pretrain`` override.
    profile: str | None = None
    recipe: dict = field(default_factory=dict)
    task_recipes: dict[str, dict] = field(default_factory=dict)
    data_dir: str | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    #: the PTQ pipelines compared: RTN (the paper's, always) and any other registered quantizer (``pipelines``)
    quantizers: list[str] = field(default_factory=lambda: ["rtn"])
    #: per non-RTN quantizer of ``quantizers``: its ``[NAME]`` table
    pipelines: dict[str, PipelineConfig] = field(default_factory=dict)
    source: str = "<flags>"

    # ------------------------------------------------------------------------------------------ derived
    @property
    def all_tasks(self) -> list[str]:
        """Tasks that need an FT and a QAT model: donors and receivers, in config order."""
        seen: dict[str, None] = {}
        for t in [*self.tasks, *self.donors, *self.receivers]:
            seen[t] = None
        return list(seen)

    def quant(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, symmetric=self.symmetric, granularity=self.granularity, group_size=self.group_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        if d["rules"] == asdict(RulesConfig()):  # studies without rules keep the fingerprint they always had
            d.pop("rules")
        if d["quantizers"] == ["rtn"]:
            d.pop("quantizers")
            d.pop("pipelines")
        return d

    def pipeline(self, name: str) -> PipelineConfig:
        """The table of pipeline ``name`` (defaults when the config has none)."""
        return self.pipelines.get(name) or PipelineConfig()

    @property
    def extra_quantizers(self) -> list[str]:
        """The pipelines beside the cells' RTN, in config order."""
        return [q for q in self.quantizers if q != "rtn"]

    def resolve_data_file(self, p: str, where: str) -> Path:
        """A file or folder named in the config: a path, else relative to the config, else inside data_dir."""
        cand = self.resolve_path(p)
        if not cand.exists() and not os.path.isabs(p):
            folder = resolve_data_dir(self.data_path())
            if folder is not None and (Path(folder) / p).exists():
                cand = Path(folder) / p
        if not cand.exists():
            raise QvecError(f"{self.source}: {where} {p!r}: no such file or folder")
        return cand.resolve()

    def probe_path(self) -> Path | None:
        """The generic probe: 'noise', a path, or a file or folder inside the data folder; None without one."""
        p = self.rules.probe
        if not p or p == "noise":
            return None
        return self.resolve_data_file(p, "rules.probe")

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def model_spec(self):
        return ModelSpec.parse(self.model, **self.model_options)

    def resolve_path(self, p: str) -> Path:
        """A path from the config: absolute, else relative to the config file's folder (or the cwd for flags)."""
        path = Path(os.path.expanduser(p))
        if path.is_absolute():
            return path
        base = Path(self.source).parent if self.source != "<flags>" else Path.cwd()
        return (base / path).resolve()

    def qat_in_proj(self) -> bool:
        """Whether QAT fake-quantizes the fused ``in_proj_weight`` (PTQ follows ``include_in_proj``)."""
        return self.include_in_proj if self.qat_include_in_proj is None else self.qat_include_in_proj

    def data_path(self) -> Path | None:
        return self.resolve_path(self.data_dir) if self.data_dir else None

    def pretrain_file(self) -> Path:
        """The pretraining corpus: a path, or a file name inside the data folder."""
        assert self.pretrain is not None
        cand = self.resolve_path(self.pretrain.data)
        if not cand.is_file() and not os.path.isabs(self.pretrain.data):
            inside = Path(resolve_data_dir(self.data_path())) / self.pretrain.data
            if inside.is_file():
                return inside
        if not cand.is_file():
            raise QvecError(f"{self.source}: pretrain.data {self.pretrain.data!r}: no such file")
        return cand

    # --------------------------------------------------------------------------------------- validation
    def validate(self, check_tasks: bool = True) -> GridConfig:
        """Check everything that can be checked without training; raise one-line QvecErrors. Returns self."""
        src = self.source
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise QvecError(f"{src}: name must be non-empty letters, digits, '-', '_' or '.', got {self.name!r}")
        try:
            spec = self.model_spec()
            get_adapter(spec).check_spec(spec)
        except QvecError as e:
            key = "model_options" if self.model_options else "model"
            raise QvecError(f"{src}: {key}: {e}") from None
        if not self.tasks:
            raise QvecError(f"{src}: tasks is empty; list at least one task")
        for key in ("tasks", "donors", "receivers"):
            vals = getattr(self, key)
            if len(set(vals)) != len(vals):
                dup = next(v for v in vals if vals.count(v) > 1)
                raise QvecError(f"{src}: {key} lists {dup!r} twice")
        if not self.donors:
            self.donors = list(self.tasks)
        if not self.receivers:
            self.receivers = list(self.tasks)
        self._validate_grid()
        self._validate_eval()
        self._validate_rules()
        self._validate_quantizers()
        self._validate_backbone()
        self._validate_recipes()
        if check_tasks:
            self._validate_tasks()
        return self

    def _validate_grid(self) -> None:
        """Bit-widths (the integer grid itself is QuantSpec's to check), the lambda grid and the seeds."""
        src = self.source
        if not self.bits:
            raise QvecError(f"{src}: bits is empty; give at least one bit-width (2..8)")
        for b in self.bits:
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
                raise QvecError(f"{src}: bits must be integers in 2..8, got {b!r}")
        if len(set(self.bits)) != len(self.bits):
            raise QvecError(f"{src}: bits lists a bit-width twice")
        for b in self.bits:  # the grid's checks are QuantSpec's own
            try:
                self.quant(b)
            except QvecError as e:
                raise QvecError(f"{src}: quant: {e}") from None
        if not self.lambdas:
            raise QvecError(f"{src}: the lambda grid is empty; give at least one value (SPEC: 0.15 .. 1.5)")
        for lam in self.lambdas:
            if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam <= 0:
                raise QvecError(f"{src}: lambdas must be positive finite numbers, got {lam!r}")
        self.lambdas = [float(v) for v in self.lambdas]
        if len(set(self.lambdas)) != len(self.lambdas):
            raise QvecError(f"{src}: lambdas lists a value twice")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise QvecError(f"{src}: seeds must be non-negative integers, got {s!r}")

    def _validate_eval(self) -> None:
        src = self.source
        ev = self.eval
        for key in ("val_limit", "test_limit"):
            v = getattr(ev, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise QvecError(f"{src}: eval.{key} must be a positive integer, got {v!r}")
        if ev.test_lambdas not in TEST_LAMBDAS:
            choices = ", ".join(TEST_LAMBDAS)
            raise QvecError(f"{src}: eval.test_lambdas must be one of {choices}, got {ev.test_lambdas!r}")
        if ev.batch_size is not None and (isinstance(ev.batch_size, bool) or not isinstance(ev.batch_size, int)
                                          or ev.batch_size < 1):
            raise QvecError(f"{src}: eval.batch_size must be a positive integer, got {ev.batch_size!r}")

    def _adapter(self):
        return get_adapter(self.model_spec())

    def _validate_rules(self) -> None:
        src, rc = self.source, self.rules
        try:
            rules = rc.rules(self.select_lambda)
        except QvecError as e:
            raise QvecError(f"{src}: rules.use: {e}") from None
        for key in ("probe_size", "unlabeled_size"):
            v = getattr(rc, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QvecError(f"{src}: rules.{key} must be a positive integer, got {v!r}")
        if any(r.signal == "probe" for r in rules) and not rc.probe:
            raise QvecError(f"{src}: rules.use names an agree rule but rules.probe is not set (an .npz, a folder "
                            "or 'noise')")
        self.probe_path()
        for t in rc.probe_domain:
            if t not in self.all_tasks:
                raise QvecError(f"{src}: rules.probe_domain: {t!r} is not one of the grid's tasks")
        if rc.donor_mean and len(self.donors) < 3:
            raise QvecError(f"{src}: rules.donor_mean needs at least 3 donors (the mean of the others), got "
                            f"{len(self.donors)}")

    def _validate_quantizers(self) -> None:
        src = self.source
        bad = [q for q in self.quantizers if q not in quantizer_names()]
        if bad:
            raise QvecError(f"{src}: quantizers: unknown quantizer {bad[0]!r}; known: {', '.join(quantizer_names())}")
        if "rtn" not in self.quantizers:
            raise QvecError(f"{src}: quantizers must include 'rtn' (the paper's pipeline, the cells' quantizer)")
        for name in dict.fromkeys([*self.pipelines, *self.extra_quantizers]):  # a table is checked even unused
            self._validate_pipeline(name, self.pipeline(name))

    def _validate_pipeline(self, name: str, g: PipelineConfig) -> None:
        src = self.source
        extra = [b for b in g.bits if isinstance(b, bool) or b not in self.bits]
        if extra:
            raise QvecError(f"{src}: {name}.bits: {extra[0]!r} is not one of the study's bits {self.bits}")
        for b in g.bits or self.bits:
            try:
                g.config(name, self.quant(b))
            except (QvecError, TypeError) as e:
                raise QvecError(f"{src}: {name}: {e}") from None
        if not g.quantizer(name).needs_calibration:
            return
        if isinstance(g.images, bool) or not isinstance(g.images, int) or g.images < 8:
            raise QvecError(f"{src}: {name}.images must be an integer of at least 8, got {g.images!r}")
        if g.calibration not in ("receiver", "noise"):
            self.resolve_data_file(g.calibration, f"{name}.calibration")

    def _validate_backbone(self) -> None:
        src = self.source
        if not self.backbone:
            if self.pretrain is not None:
                self.backbone = "pretrain"
            elif not self._adapter().has_hub_weights:
                raise QvecError(
                    f"{src}: the built-in model {self.model!r} has no pretrained weights; add a [pretrain] section "
                    "or set backbone to a weights file"
                )
            else:
                self.backbone = "hub"
        if self.backbone == "pretrain":
            if self.pretrain is None:
                raise QvecError(f"{src}: backbone = 'pretrain' needs a [pretrain] section with data = FILE")
            self.pretrain_file()
        elif self.backbone == "hub":
            if not self._adapter().has_hub_weights:
                raise QvecError(f"{src}: the built-in model {self.model!r} has no hub weights; use [pretrain]")
        elif not self.resolve_path(self.backbone).is_file():
            raise QvecError(f"{src}: backbone {self.backbone!r} is not 'pretrain', 'hub' or an existing file")

    def _validate_recipes(self) -> None:
        if self.profile is not None:
            try:
                Recipe.for_task(self.tasks[0], self.model_spec(), self.profile)
            except QvecError as e:
                raise QvecError(f"{self.source}: profile: {e}") from None
        known = {f.name for f in fields(Recipe)}
        sections = [("recipe", self.recipe)]
        sections += [(f"recipe.tasks.{t}", r) for t, r in self.task_recipes.items()]
        if self.pretrain is not None:
            sections.append(("pretrain", self.pretrain.recipe))
        types = {f.name: str(f.type) for f in fields(Recipe)}
        for where, overrides in sections:
            for k, v in overrides.items():
                if k not in known:
                    names = ", ".join(sorted(known))
                    raise QvecError(f"{self.source}: {where}.{k} is not a recipe field; known: {names}")
                if not _matches_type(v, types[k]):
                    raise QvecError(f"{self.source}: {where}.{k} must be {_TYPE_WORDS.get(types[k], types[k])}, "
                                    f"got {v!r}")
        for where, build in self._composed_recipes():  # the recipes the plan will build, each checked whole
            try:
                build()
            except QvecError as e:
                raise QvecError(f"{self.source}: {where}: {e}") from None
        for t in self.task_recipes:
            if t not in self.all_tasks:
                raise QvecError(f"{self.source}: recipe.tasks.{t}: {t!r} is not one of the grid's tasks")

    def _composed_recipes(self):
        """(section, thunk) pairs that build each recipe as the plan does: the profile's base, then ``[recipe]``,
        then the task's own section; the pretraining recipe from its base and ``[pretrain]``."""
        spec = self.model_spec()
        out = []
        for t in self.all_tasks:
            where = f"recipe.tasks.{t}" if t in self.task_recipes else "recipe"
            out.append((where, lambda t=t: Recipe.for_task(t, spec, self.profile).override(
                **{**self.recipe, **self.task_recipes.get(t, {})})))
        if self.pretrain is not None:
            def pre():
                try:
                    base = Recipe.for_pretraining(spec, self.profile)
                except QvecError:
                    base = Recipe()
                return base.override(**self.pretrain.recipe)
            out.append(("pretrain", pre))
        return out

    def _validate_tasks(self) -> None:
        """Tasks are the data folder's file stems, the paper's task names (Hugging Face unless the folder has them),
        or ``hf:NAME``, exactly as :func:`qvec.tasks.get_task` will resolve them in the workers."""
        folder = resolve_data_dir(self.data_path())
        local = local_task_files(folder)
        for t in self.all_tasks:
            if locate_task(t, folder, local) is not None:
                continue
            where = f"{folder} has: {', '.join(local) or 'no .npz tasks'}; " if folder is not None else (
                "no data folder (--data or $QVEC_DATA); ")
            where += f"paper tasks: {', '.join(PAPER_TASKS)}"
            raise QvecError(f"{self.source}: unknown task {t!r} ({where})")


_TYPE_WORDS = {"float": "a number", "int": "an integer", "bool": "true or false", "int | None": "an integer",
               "str": "a string", "str | None": "a string", "dict": "a table", "list[str]": "a list of names",
               "list[int]": "a list", "list[float]": "a list", "dict[str, dict]": "a table"}


def _matches_type(value: Any, type_name: str) -> bool:
    """Whether a config value fits a dataclass field annotated ``type_name`` (bool is not a number here).

    Lists of numbers are only checked to be lists: ``validate`` checks their values, with their ranges."""
    if value is None:
        return type_name.endswith("| None")
    base = type_name.removesuffix(" | None")
    if base == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if base == "int":
        return isinstance(value, int)
    if base == "float":
        return isinstance(value, int | float) and math.isfinite(value)
    if base == "str":
        return isinstance(value, str)
    if base.startswith("dict"):
        return isinstance(value, dict)
    if base == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if base.startswith("list"):
        return isinstance(value, list)
    return True


def _checked(source: str, where: str, value: Any, type_name: str) -> Any:
    """``value`` if it fits the field type ``type_name``, else one line naming the key and what it must be."""
    if not _matches_type(value, type_name):
        raise QvecError(f"{source}: {where} must be {_TYPE_WORDS.get(type_name, type_name)}, got {value!r}")
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def _table(source: str, where: str, raw: Any, cls: type, extra: Sequence[str] = ()) -> dict[str, Any]:
    """A config table checked against the fields of dataclass ``cls`` (plus ``extra`` keys, returned unchecked):
    unknown keys and values of the wrong type are one-line errors naming ``where.key``."""
    table = _checked(source, where, raw, "dict")
    types = {f.name: str(f.type) for f in fields(cls)}
    out = {}
    for k, v in table.items():
        if k in types:
            out[k] = _checked(source, f"{where}.{k}", v, types[k])
        elif k in extra:
            out[k] = v
        else:
            raise QvecError(f"{source}: unknown key {where}.{k}; known: {', '.join(sorted([*types, *extra]))}")
    return out


# ------------------------------------------------------------------------------------------------ loading
#: Keys that are shorthand for a model option (``img_size = 112`` is ``model_options.img_size = 112``).
_MODEL_OPTION_KEYS = ("img_size",)
_TOP_KEYS = ({f.name for f in fields(GridConfig)} - {"source", "task_recipes", "pipelines"}) | set(
    _MODEL_OPTION_KEYS) | {"quant"}
_EVAL_KEYS = {f.name for f in fields(EvalConfig)}


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise QvecError(f"{path}: no such config file")
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


def _expect(src: str, key: str, value: Any, kind: type, what: str) -> Any:
    # bool is an int subclass: `bits = [true]` must not pass as a bit-width.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise QvecError(f"{src}: {key} must be {what}, got {value!r}")
    return value


#: top-level keys that are not plain fields of GridConfig, each read by its own section reader below
_SECTIONS = ("recipe", "pretrain", "eval", "rules", "quant", "model_options", "pipelines")
#: the integer grid: ``[quant]``, or (as older configs do) top-level keys
_GRID_KEYS = ("granularity", "symmetric", "group_size")


def config_from_dict(raw: Mapping[str, Any], source: str = "<flags>") -> GridConfig:
    """Build (not yet validate) a GridConfig from parsed TOML/YAML; unknown keys are an error.

    Plain keys are checked against the types of GridConfig's fields; each table by its own dataclass."""
    raw = dict(raw)
    tables = [q for q in quantizer_names() if q != "rtn"]
    for k in raw:
        if k not in _TOP_KEYS and k not in tables:
            raise QvecError(f"{source}: unknown key {k!r}; known: {', '.join(sorted(_TOP_KEYS))}")
    for req in ("model", "tasks"):
        if req not in raw:
            raise QvecError(f"{source}: missing required key {req!r}")
    types = {f.name: str(f.type) for f in fields(GridConfig)}
    kw: dict[str, Any] = {k: _checked(source, k, v, types[k]) for k, v in raw.items()
                          if k in types and k not in _SECTIONS}
    kw.update(_model_options(source, raw))
    kw.update(_grid_table(source, raw))
    if "recipe" in raw:
        rec = _checked(source, "recipe", raw["recipe"], "dict")
        per_task = _checked(source, "recipe.tasks", rec.pop("tasks", {}), "dict")
        kw["recipe"] = rec
        kw["task_recipes"] = {t: _checked(source, f"recipe.tasks.{t}", r, "dict") for t, r in per_task.items()}
    if "pretrain" in raw:
        pre = _checked(source, "pretrain", raw["pretrain"], "dict")
        if "data" not in pre:
            raise QvecError(f"{source}: [pretrain] needs data = FILE (the JPEG corpus, e.g. pretrain_cifar10.npz)")
        data = str(_checked(source, "pretrain.data", pre.pop("data"), "str"))
        kw["pretrain"] = PretrainConfig(data, pre)
    if "eval" in raw:
        kw["eval"] = EvalConfig(**_table(source, "eval", raw["eval"], EvalConfig))
    if "rules" in raw:
        rules = raw["rules"]  # `rules = ["agree", ...]` is short for `[rules] use = [...]`
        kw["rules"] = RulesConfig(**_table(source, "rules", {"use": rules} if isinstance(rules, list) else rules,
                                           RulesConfig))
    kw["pipelines"] = {q: _pipeline_table(source, q, raw[q]) for q in tables if q in raw}
    if "name" not in kw:
        kw["name"] = Path(source).stem if source != "<flags>" else "grid"
    return GridConfig(source=source, **kw)


def _model_options(source: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``model_options`` and its top-level shorthands (``img_size = 112``)."""
    opts = dict(_checked(source, "model_options", raw["model_options"], "dict")) if "model_options" in raw else {}
    for key in _MODEL_OPTION_KEYS:
        if key in raw:
            value = _expect(source, key, raw[key], int, "an integer (pixels)")
            if value < 1:
                raise QvecError(f"{source}: {key} must be a positive number of pixels, got {value}")
            opts[key] = value
    return {"model_options": opts} if opts else {}


def _grid_table(source: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The integer grid shared by every quantizer: a ``[quant]`` table of QuantSpec's fields (bits are the
    study's list), or the same keys at the top level; QuantSpec itself validates the values."""
    if "quant" not in raw:
        return {}
    flat = [k for k in _GRID_KEYS if k in raw]
    if flat:
        raise QvecError(f"{source}: {flat[0]} is given both at the top level and in [quant]; keep one")
    grid = _table(source, "quant", raw["quant"], QuantSpec)
    if "bits" in grid:
        raise QvecError(f"{source}: quant.bits: the bit-widths are the top-level bits list")
    return grid


def _pipeline_table(source: str, name: str, raw: Any) -> PipelineConfig:
    """A ``[NAME]`` pipeline table: PipelineConfig's keys, and the quantizer config's own knobs as ``options``."""
    knobs = PipelineConfig.quantizer(name).knobs()
    table = _table(source, name, raw, PipelineConfig, extra=knobs)
    if "options" in table:
        raise QvecError(f"{source}: {name}: give the quantizer's options as keys of [{name}] itself")
    return PipelineConfig(**{k: v for k, v in table.items() if k not in knobs},
                          options={k: v for k, v in table.items() if k in knobs})


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
    return config_from_dict(raw, source).validate(check_tasks=check_tasks)

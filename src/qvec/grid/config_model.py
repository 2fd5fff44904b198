"""What a study is, as dataclasses: the model, backbone, tasks, pipelines, lambda grid, recipes, evaluation and
lambda rules of one donor x receiver study. :mod:`qvec.grid.config` reads them from a file and
:mod:`qvec.grid.config_check` checks them; this module reads and checks nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qvec.core.errors import QvecError
from qvec.data.tasks import check_data_dir, resolve_data_dir
from qvec.models import ModelSpec
from qvec.quant import QuantizerConfig, QuantSpec, get_quantizer
from qvec.quant.presets import get_preset
from qvec.quant.targets import TargetFilter
from qvec.vectors.rules import DEFAULT_LAMBDAS, LambdaRule, rule_list

BACKBONE_CHOICES = ("pretrain", "hub")


@dataclass
class EvalConfig:
    """How cells are measured. Limits cap the images per split (None: the whole split)."""

    val_limit: int | None = None
    test_limit: int | None = None
    #: "selected": test only at lambda = 1 and lambda* (val picks lambda*); "all": test at every lambda too.
    test_lambdas: str = "selected"
    #: None: ``qvec.train.evaluate``'s device default (64 on CPU, where small batches are faster).
    batch_size: int | None = None


@dataclass
class RulesConfig:
    """The lambda rules a study measures (:mod:`qvec.vectors.rules`) and the images the label-free ones score on.

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

    def rules(self, select_lambda: bool = True) -> list[LambdaRule]:
        return rule_list(self.use, select_lambda)


@dataclass
class PipelineConfig:
    """A deploy quantizer the study measures alone (on FT, and on the receiver's matched QAT) and with the matched
    vector (its own cells: lambda* and every rule scored with this quantizer). A ``[pipelines.NAME]`` table.

    ``coverages`` (empty: the study's) are the vector coverages its cells measure. The quantizer is a ``preset``
    (``paper``, ``g64``, ``hqq-g64``, ``gptq``...) or a registered ``quantizer`` on the study's ``[quant]`` grid;
    ``symmetric``, ``granularity``, ``group_size`` and ``full_range`` override the grid, the quantizer's own
    knobs are keys of the table (``options``). A calibrated quantizer (GPTQ) reads
    ``images`` of ``calibration``: ``receiver`` (the receiver's own unlabeled training inputs), ``noise``, or a
    probe file or folder (relative to data_dir, or a path). ``bits`` is a subset of the study's (empty: all),
    ``lambdas`` the lambda grid of its cells (empty: the study's), and ``vector = false`` measures it alone only.
    """

    quantizer: str = "rtn"
    preset: str = ""
    symmetric: bool | None = None
    granularity: str | None = None
    group_size: int | None = None
    full_range: bool | None = None
    calibration: str = "receiver"
    images: int = 128
    bits: list[int] = field(default_factory=list)
    lambdas: list[float] = field(default_factory=list)
    #: the vector coverages of its cells (empty: the study's ``coverages``)
    coverages: list[str] = field(default_factory=list)
    vector: bool = True
    options: dict = field(default_factory=dict)

    def method(self) -> str:
        return get_preset(self.preset).method if self.preset else self.quantizer

    def quantizer_type(self) -> type[QuantizerConfig]:
        return get_quantizer(self.method())

    def config(self, grid: QuantSpec) -> QuantizerConfig:
        """The quantizer of this pipeline at ``grid.bits``: the preset's (or the study's) grid with this table's
        overrides, and the knobs."""
        knobs = dict(self.options)
        if self.preset:
            p = get_preset(self.preset)
            grid = p.grid(grid.bits)
            knobs = {**p.knobs, **knobs}
        over = {k: getattr(self, k) for k in ("symmetric", "granularity", "group_size", "full_range")
                if getattr(self, k) is not None}
        return self.quantizer_type().from_grid(replace(grid, **over), **knobs)


@dataclass
class PretrainConfig:
    """Pretraining of theta_0 from scratch on a JPEG corpus (``backbone = "pretrain"``)."""

    data: str
    recipe: dict = field(default_factory=dict)


@dataclass
class GridConfig:
    """A donor x receiver study: model, backbone, tasks, pipelines, lambda grid, recipe overrides, evaluation."""

    name: str
    model: str
    tasks: list[str]
    donors: list[str] = field(default_factory=list)
    receivers: list[str] = field(default_factory=list)
    bits: list[int] = field(default_factory=lambda: [3])
    granularity: str = "channel"
    symmetric: bool = True
    group_size: int = 128
    full_range: bool = False
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
    #: Recipe profile of the built-in ViTs (``quality`` or ``fast``; None: qvec.train.recipe.DEFAULT_PROFILE), the
    #: base that ``recipe`` and ``pretrain`` override.
    profile: str | None = None
    recipe: dict = field(default_factory=dict)
    task_recipes: dict[str, dict] = field(default_factory=dict)
    data_dir: str | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    #: the vector coverages the cells measure (``all``: every float backbone tensor, the paper's; ``quantized``:
    #: the quantized weights only)
    coverages: list[str] = field(default_factory=lambda: ["all"])
    #: shorthand of older configs: ``["rtn", NAME, ...]``, each a pipeline with its ``[NAME]`` table
    quantizers: list[str] = field(default_factory=lambda: ["rtn"])
    #: the pipelines, by name, in config order; the first is the study's primary one (the paper's tables)
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
        """The study's ``[quant]`` grid at ``bits`` (the default grid of its pipelines)."""
        return QuantSpec(bits, self.symmetric, self.granularity, self.group_size, self.full_range)  # type: ignore[arg-type]

    def targets(self) -> TargetFilter:
        """The weights PTQ quantizes."""
        return TargetFilter(self.include_in_proj)

    def qat_targets(self) -> TargetFilter:
        """The weights QAT fake-quantizes (see ``qat_include_in_proj``)."""
        return TargetFilter(self.include_in_proj if self.qat_include_in_proj is None else self.qat_include_in_proj)

    def pipeline_names(self) -> list[str]:
        return list(self.pipelines)

    def pipeline_bits(self, name: str) -> list[int]:
        return self.pipelines[name].bits or list(self.bits)

    def pipeline_config(self, name: str, bits: int) -> QuantizerConfig:
        """The quantizer of pipeline ``name`` at ``bits``."""
        return self.pipelines[name].config(self.quant(bits))

    def pipeline_lambdas(self, name: str) -> list[float]:
        return [float(v) for v in self.pipelines[name].lambdas] or list(self.lambdas)

    def pipeline_coverages(self, name: str) -> list[str]:
        return list(self.pipelines[name].coverages) or list(self.coverages)

    def all_coverages(self) -> list[str]:
        """Every coverage some pipeline measures, the study's first, in order."""
        return list(dict.fromkeys([*self.coverages, *(c for p in self.pipelines for c in self.pipeline_coverages(p))]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        if d["rules"] == asdict(RulesConfig()):  # studies without rules keep the fingerprint they always had
            d.pop("rules")
        if not self.full_range:
            d.pop("full_range")
        if self.coverages == ["all"]:
            d.pop("coverages")
        if self.is_legacy():
            d.pop("pipelines")
            if d["quantizers"] == ["rtn"]:
                d.pop("quantizers")
        else:
            d.pop("quantizers")
            for t in d["pipelines"].values():
                if not t["coverages"]:
                    t.pop("coverages")
            d["pipeline_order"] = list(self.pipelines)  # stored configs are JSON with sorted keys
        return d

    def is_legacy(self) -> bool:
        """A study written before pipelines (``quantizers`` only): its fingerprint keeps the old form."""
        return not self.pipelines or getattr(self, "_legacy", False)

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

    def data_path(self) -> Path | None:
        return self.resolve_path(self.data_dir) if self.data_dir else None

    def pretrain_file(self) -> Path:
        """The pretraining corpus: a path, or a file name inside the data folder."""
        assert self.pretrain is not None
        cand = self.resolve_path(self.pretrain.data)
        if not cand.is_file() and not os.path.isabs(self.pretrain.data):
            folder = resolve_data_dir(self.data_path())
            if folder is not None:  # a missing data folder is the fault, not the file name inside it
                check_data_dir(folder)
            inside = Path(folder) / self.pretrain.data
            if inside.is_file():
                return inside
        if not cand.is_file():
            raise QvecError(f"{self.source}: pretrain.data {self.pretrain.data!r}: no such file")
        return cand

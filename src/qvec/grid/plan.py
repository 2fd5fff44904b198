"""The job graph of a study: a pure function of its config (:func:`build_plan`), nothing computed.

Jobs, in dependency order (SPEC sections 1 and 7):

* ``pretrain`` theta_0, when the backbone is trained here (``backbone = "pretrain"``);
* ``finetune`` FT per task (and seed), and QAT per task, *trainable grid* (and seed), both from theta_0: every
  pipeline's vector is matched to its quantizer (QAT on its trainable grid), and pipelines that share a grid (the
  paper's RTN, clip search and GPTQ; asymmetric g64 RTN and HQQ) share the QAT run;
* ``vector`` tau_D = theta_QAT^D - theta_FT^D per donor, grid and coverage (all float tensors, or the quantized
  weights only), and the mean of the other donors' vectors per receiver when asked;
* ``baseline`` per receiver: FT and theta_0 in float; per pipeline and bit-width: the pipeline's quantizer on FT
  and on the receiver's matched QAT (and, for the primary pipeline, on theta_0 under the receiver's head);
* ``cells`` per (pipeline, bits, coverage, donor, receiver): Q(theta_FT^R + lam * tau_D) with the pipeline's
  quantizer Q on the receiver's validation split at every lam of the grid (lambda*), every label-free rule's
  scores, and the test split at lam = 1 and at every rule's choice.

Every job and every result row has a content key (:mod:`qvec.grid.keys`): "what is already done" is answered by
the artifact store and the results database.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from qvec.data.probe import NOISE
from qvec.data.tasks import local_task_files, resolve_data_dir
from qvec.grid.artifacts import ArtifactStore, content_key, file_digest
from qvec.grid.config import CALIBRATION_SOURCES, GridConfig
from qvec.grid.keys import FLOAT_BASELINES, PTQ_BASELINES
from qvec.grid.params import BaselineParams, CellsParams, JobParams
from qvec.models import ModelSpec
from qvec.quant import QuantizerConfig, QuantSpec
from qvec.train.recipe import Recipe
from qvec.vectors.rules import MEAN_DONOR, signals_of

KIND_ORDER = ("pretrain", "finetune", "vector", "baseline", "cells")


@dataclass(frozen=True)
class Job:
    """One unit of work. ``params`` is JSON-able and holds everything a worker needs (absolute paths included);
    its keys per kind are typed in :mod:`qvec.grid.params`."""

    id: str
    kind: str
    key: str
    deps: tuple[str, ...] = ()
    params: JobParams = field(default_factory=dict, hash=False, compare=False)  # type: ignore[assignment]

    @property
    def artifact(self) -> str | None:
        """The file this job produces (training and vector jobs), else None."""
        return self.params.get("out")


@dataclass
class Plan:
    """The job graph of a study in topological order, with the config and artifact store it was built for."""

    config: GridConfig
    artifacts: ArtifactStore
    jobs: list[Job]

    def __post_init__(self) -> None:
        self.by_id = {j.id: j for j in self.jobs}

    def counts(self) -> dict[str, int]:
        c = Counter(j.kind for j in self.jobs)
        return {k: c[k] for k in [*KIND_ORDER, *sorted(set(c) - set(KIND_ORDER))] if c[k]}

    def cells(self) -> int:
        """How many (donor, receiver, bits, lambda) validation cells the grid has."""
        return sum(len(j.params["lambdas"]) for j in self.jobs if j.kind == "cells")


# ------------------------------------------------------------------------------------------ quantizer records
def quant_record(cfg: QuantizerConfig, calib: Mapping | None) -> dict:
    """What a row's number depends on beyond the weights: the quantizer record (RTN's is its grid, as before the
    registry) and the calibration set of a calibrated quantizer."""
    return {**cfg.to_dict(), **({"calibration": calib["id"], "images": calib["images"]} if calib else {})}


def quant_label(cfg: QuantizerConfig, calib: Mapping | None) -> str:
    """How a row names its quantizer: ``hqq-w3-asym-group64``, ``gptq-w3-sym-channel calib=receiver:128``."""
    if not calib:
        return str(cfg)
    source = calib["source"] if calib["source"] in CALIBRATION_SOURCES else Path(calib["source"]).name
    return f"{cfg} calib={source}:{calib['images']}"


def calibration_set(config: GridConfig, name: str) -> dict | None:
    """Pipeline ``name``'s calibration set (None for a quantizer that needs no data)."""
    p = config.pipelines[name]
    if not p.quantizer_type().needs_calibration:
        return None
    if p.calibration in CALIBRATION_SOURCES:
        return {"source": p.calibration, "id": p.calibration, "images": p.images}
    path = config.resolve_data_file(p.calibration, f"pipelines.{name}.calibration")
    return {"source": str(path), "id": _probe_identity(path), "images": p.images}


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class _Build:
    """What every stage of :func:`build_plan` shares: the config, the store, theta_0 and the per-seed loops."""

    config: GridConfig
    store: ArtifactStore
    spec: ModelSpec
    data_dir: Path | None
    common: dict
    seeds: list
    theta0: dict = field(default_factory=dict)
    theta0_deps: tuple = ()

    @staticmethod
    def suffix(seed: int | None) -> str:
        return "" if seed is None else f"/s{seed}"

    def grids(self) -> list[QuantSpec]:
        """The distinct trainable grids of every pipeline at every bit-width, in pipeline order."""
        out: dict[str, QuantSpec] = {}
        for name in self.config.pipelines:
            for bits in self.config.pipeline_bits(name):
                g = self.config.pipeline_config(name, bits).trainable_grid
                out.setdefault(json.dumps(g.to_dict(), sort_keys=True), g)
        return list(out.values())

    def pipe(self, name: str) -> str:
        """How job ids name a pipeline: not at all when the study has only one (ids as before pipelines)."""
        return f"{name}/" if len(self.config.pipelines) > 1 else ""

    def tag(self, grid: QuantSpec) -> str:
        """How job ids name a grid: ``w3`` for the study's own ``[quant]`` grid, else the grid (``w3-asym-group64``)."""
        return f"w{grid.bits}" if grid == self.config.quant(grid.bits) else str(grid)


def build_plan(config: GridConfig, artifacts_root: str | Path) -> Plan:
    """The full job graph of ``config`` (validated) against an artifact store; pure, does no work."""
    spec: ModelSpec = config.model_spec()
    # Absolute, and $QVEC_DATA resolved here, so that workers on other processes read the same folder.
    data_dir = resolve_data_dir(config.data_path())
    data_dir = data_dir.resolve() if data_dir is not None else None
    common = {"model": spec.to_json(), "data_dir": str(data_dir) if data_dir is not None else None,
              "include_in_proj": config.targets().record()}
    ctx = _Build(config, ArtifactStore(artifacts_root), spec, data_dir, common, config.seeds or [None])
    jobs = _theta0_jobs(ctx)
    ft, qat = _training_jobs(ctx, jobs)
    vec = _vector_jobs(ctx, ft, qat, jobs)
    ev = config.eval
    eval_common = {**common, "test_limit": ev.test_limit, "val_limit": ev.val_limit, "batch_size": ev.batch_size,
                   "theta0_key": ctx.theta0["key"], "theta0": ctx.theta0["path"]}
    jobs += _baseline_jobs(ctx, ft, qat, eval_common)
    if config.rules.donor_mean:
        jobs += _mean_vector_jobs(ctx, vec)
    jobs += _cell_jobs(ctx, ft, vec, eval_common)
    return Plan(config, ctx.store, jobs)


def _task_identity(name: str, data_dir: Path | None) -> str:
    """What a task's data is: the digest of its local file, or its Hugging Face name."""
    path = local_task_files(data_dir).get(name)
    return file_digest(path) if path is not None else name


def _recipe(base, *overrides: Mapping):
    """``base`` with the config's overrides; an explicit ``epochs`` is exact (it switches ``min_examples`` off,
    as ``qvec finetune --epochs`` does), unless ``min_examples`` is given too."""
    merged: dict = {}
    for o in overrides:
        merged.update(o)
    recipe = base.override(**merged)
    if "epochs" in merged and "min_examples" not in merged:
        recipe = replace(recipe, min_examples=None)
    return recipe


def _theta0_jobs(ctx: _Build) -> list[Job]:
    """theta_0: a pretraining job, the family's hub weights, or a weights file (sets ``ctx.theta0``)."""
    config, spec = ctx.config, ctx.spec
    if config.backbone == "hub":
        ctx.theta0 = {"key": content_key("hub", {"model": spec.to_json()}), "path": None}
        return []
    if config.backbone != "pretrain":
        path = config.resolve_path(config.backbone)
        ctx.theta0 = {"key": file_digest(path), "path": str(path)}
        return []
    assert config.pretrain is not None
    data_file = config.pretrain_file()
    recipe = _recipe(Recipe.for_pretraining(spec, config.profile), config.pretrain.recipe)
    key = content_key("pretrain", {"model": spec.to_json(), "data": file_digest(data_file),
                                   "recipe": recipe.to_json()})
    out = ctx.store.path("pretrain", key)
    job = Job(f"pretrain/{spec.name}", "pretrain", key, (), {
        **ctx.common, "data_file": str(data_file), "recipe": recipe.to_json(), "out": str(out),
        "label": f"pretrain {spec} on {data_file.name}"})
    ctx.theta0, ctx.theta0_deps = {"key": key, "path": str(out)}, (job.id,)
    return [job]


def _training_jobs(ctx: _Build, jobs: list[Job]) -> tuple[dict[tuple, Job], dict[tuple, Job]]:
    """Per (task, seed): FT, and QAT on every trainable grid; appended to ``jobs`` and returned by
    (task, None, seed) and (task, grid tag, seed)."""
    config, spec = ctx.config, ctx.spec
    task_ids = {t: _task_identity(t, ctx.data_dir) for t in config.all_tasks}
    qat_targets = config.qat_targets().record()
    ft: dict[tuple, Job] = {}
    qat: dict[tuple, Job] = {}
    for seed in ctx.seeds:
        sfx = ctx.suffix(seed)
        for task in config.all_tasks:
            base = Recipe.for_task(task, spec, config.profile)
            recipe = _recipe(base, config.recipe, config.task_recipes.get(task, {}))
            if seed is not None:
                recipe = recipe.override(seed=seed)
            for grid in [None, *ctx.grids()]:
                q = grid.to_dict() if grid is not None else None
                inputs = {"model": spec.to_json(), "theta0": ctx.theta0["key"], "task": task, "data": task_ids[task],
                          "recipe": recipe.to_json(), "qat": q, "in_proj": qat_targets if q else None}
                key = content_key("finetune", inputs)
                tag = ctx.tag(grid) if grid is not None else None
                job = Job(f"{'ft' if grid is None else f'qat/{tag}'}/{task}{sfx}", "finetune", key, ctx.theta0_deps, {
                    **ctx.common, "include_in_proj": qat_targets, "task": task, "recipe": recipe.to_json(),
                    "init": ctx.theta0["path"], "qat": q, "seed": recipe.seed,
                    "bits": grid.bits if grid is not None else None, "out": str(ctx.store.path("finetune", key)),
                    "label": f"{'FT' if grid is None else f'QAT {tag}'} {task}{sfx}"})
                jobs.append(job)
                if grid is None:
                    ft[(task, None, seed)] = job
                else:
                    qat[(task, tag, seed)] = job
    return ft, qat


def _vector_jobs(ctx: _Build, ft: dict, qat: dict, jobs: list[Job]) -> dict[tuple, Job]:
    """Per (donor, grid, coverage, seed): tau = theta_QAT - theta_FT; appended to ``jobs``, returned by that key."""
    vec: dict[tuple, Job] = {}
    for seed in ctx.seeds:
        sfx = ctx.suffix(seed)
        for grid in ctx.grids():
            tag = ctx.tag(grid)
            for cov in ctx.config.all_coverages():
                cv = "" if cov == "all" else f"/{cov}"
                for donor in ctx.config.donors:
                    f, q = ft[(donor, None, seed)], qat[(donor, tag, seed)]
                    key = content_key("vector", {"ft": f.key, "qat": q.key, **({"coverage": cov} if cv else {})})
                    job = Job(f"vector/{tag}{cv}/{donor}{sfx}", "vector", key, (f.id, q.id), {
                        "ft": f.params["out"], "qat": q.params["out"], "coverage": cov,
                        "targets": ctx.common["include_in_proj"], "out": str(ctx.store.path("vector", key)),
                        "label": f"vector {tag}{cv} {donor}{sfx}"})
                    jobs.append(job)
                    vec[(donor, tag, cov, seed)] = job
    return vec


def _mean_vector_jobs(ctx: _Build, vec: dict[tuple, Job]) -> list[Job]:
    """The mean of every other donor's vector, per receiver: a donor of its own (``mean``); adds them to ``vec``."""
    jobs = []
    config = ctx.config
    for seed in ctx.seeds:
        sfx = ctx.suffix(seed)
        for grid in ctx.grids():
            tag = ctx.tag(grid)
            for cov in config.all_coverages():
                cv = "" if cov == "all" else f"/{cov}"
                for recv in config.receivers:
                    parts = [vec[(d, tag, cov, seed)] for d in config.donors if d != recv]
                    key = content_key("vector-mean", {"vectors": [j.key for j in parts]})
                    params = {"sources": [j.params["out"] for j in parts], "out": str(ctx.store.path("vector", key)),
                              "label": f"vector {tag}{cv} mean of {len(parts)} donors for {recv}{sfx}"}
                    job = Job(f"vector/{tag}{cv}/{MEAN_DONOR}->{recv}{sfx}", "vector", key,
                              tuple(j.id for j in parts), params)
                    jobs.append(job)
                    vec[(f"{MEAN_DONOR}->{recv}", tag, cov, seed)] = job
    return jobs


def _pipeline_params(ctx: _Build, name: str, bits: int) -> tuple[dict, str]:
    """What a pipeline's jobs at ``bits`` carry about its quantizer, and the tag of its trainable grid."""
    cfg = ctx.config.pipeline_config(name, bits)
    calib = calibration_set(ctx.config, name)
    params = {"pipeline": name, "bits": bits, "quant": quant_record(cfg, calib), "quantizer": cfg.to_dict(),
              "quant_label": quant_label(cfg, calib), **({"calib": calib} if calib else {})}
    return params, ctx.tag(cfg.trainable_grid)


def _baseline_jobs(ctx: _Build, ft: dict, qat: dict, eval_common: dict) -> list[Job]:
    """Per receiver: the float baselines, and every pipeline's quantizer on FT, matched QAT and theta_0."""
    jobs = []
    for seed in ctx.seeds:
        sfx = ctx.suffix(seed)
        for recv in ctx.config.receivers:
            f = ft[(recv, None, seed)]
            base = {**eval_common, "receiver": recv, "seed": f.params["seed"], "receiver_ft": f.params["out"],
                    "receiver_ft_key": f.key}
            key = content_key("baseline", {**base, "kinds": FLOAT_BASELINES})
            jobs.append(Job(f"baseline/float/{recv}{sfx}", "baseline", key, (*ctx.theta0_deps, f.id), {
                **base, "kinds": list(FLOAT_BASELINES), "bits": None, "quant": None,
                "label": f"baselines float {recv}{sfx}"}))
            for i, name in enumerate(ctx.config.pipelines):
                # theta_0 under PTQ (the paper's "pretrained + PTQ") is the primary pipeline's alone
                kinds = PTQ_BASELINES if i == 0 else tuple(k for k in PTQ_BASELINES if k != "pretrained_ptq")
                for bits in ctx.config.pipeline_bits(name):
                    pp, tag = _pipeline_params(ctx, name, bits)
                    q = qat[(recv, tag, seed)]
                    params: BaselineParams = {  # type: ignore[typeddict-item]
                        **base, **pp, "kinds": list(kinds), "qat": q.params["out"], "qat_key": q.key,
                        "label": f"baselines {name} w{bits} {recv}{sfx}"}
                    key = content_key("baseline", {k: v for k, v in params.items() if k != "label"})
                    jobs.append(Job(f"baseline/{ctx.pipe(name)}w{bits}/{recv}{sfx}", "baseline", key,
                                    (*ctx.theta0_deps, f.id, q.id), params))
    return jobs


def _cell_jobs(ctx: _Build, ft: dict[tuple, Job], vec: dict[tuple, Job], eval_common: dict) -> list[Job]:
    """One cells job per (pipeline, bits, coverage, donor, receiver, seed), grouped so that a sequential worker
    keeps one receiver hot."""
    config, ev = ctx.config, ctx.config.eval
    rules = config.rules.rules(config.select_lambda)
    signals = _signals(config, rules)
    jobs = []
    for seed in ctx.seeds:
        sfx = ctx.suffix(seed)
        for name in config.pipelines:
            if not config.pipelines[name].vector:
                continue
            for bits in config.pipeline_bits(name):
                pp, tag = _pipeline_params(ctx, name, bits)
                for cov in config.pipeline_coverages(name):
                    cv = "" if cov == "all" else f"/{cov}"
                    for recv in config.receivers:
                        f = ft[(recv, None, seed)]
                        donors = [d for d in config.donors if d != recv or config.self_pairs]
                        for donor in donors + ([MEAN_DONOR] if config.rules.donor_mean else []):
                            vj = vec[(f"{MEAN_DONOR}->{recv}" if donor == MEAN_DONOR else donor, tag, cov, seed)]
                            params: CellsParams = {  # type: ignore[typeddict-item]
                                **eval_common, **pp, "donor": donor, "receiver": recv, "seed": f.params["seed"],
                                "receiver_ft": f.params["out"], "receiver_ft_key": f.key, "vector": vj.params["out"],
                                "vector_key": vj.key, "coverage": cov, "lambdas": config.pipeline_lambdas(name),
                                "select_lambda": config.select_lambda, "test_lambdas": ev.test_lambdas,
                                "rules": [r.name for r in rules], "signals": signals,
                                "label": f"cells {name} w{bits}{cv} {donor} -> {recv}{sfx}"}
                            key = content_key("cells", {k: v for k, v in params.items() if k != "label"})
                            jobs.append(Job(f"cells/{ctx.pipe(name)}w{bits}{cv}/{donor}->{recv}{sfx}", "cells", key,
                                            (f.id, vj.id), params))
    return jobs


def _probe_identity(path: Path) -> str:
    """A probe file's digest, or a folder's listing (names and sizes): what the probe scores depend on."""
    if path.is_file():
        return file_digest(path)
    listing = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
    return content_key("folder", {"files": listing})


def _signals(config: GridConfig, rules) -> dict[str, dict]:
    """What each label-free signal the rules need is measured on: source, its identity and its size."""
    rc = config.rules
    out: dict[str, dict] = {}
    for sig in signals_of(rules):
        if sig == "probe":
            path = config.probe_path()
            out[sig] = ({"path": NOISE, "id": NOISE, "size": rc.probe_size} if path is None else
                        {"path": str(path), "id": _probe_identity(path), "size": rc.probe_size})
        elif sig == "unlabeled":
            out[sig] = {"id": "val", "size": rc.unlabeled_size}
        elif sig == "noise":
            out[sig] = {"id": NOISE, "size": rc.probe_size}
        elif sig == "weight":
            out[sig] = {"id": "weights"}
        else:  # a plugin's signal: it names its own source
            out[sig] = {"id": sig, "size": rc.probe_size}
    return out


def describe_plan(plan: Plan, status: Mapping[str, str] | None = None) -> str:
    """A readable listing of the job graph (``qvec grid plan``): counts per kind, then every job and its inputs."""
    c = plan.config
    lines = [
        f"study {c.name}: model {c.model}, backbone {c.backbone}, {len(c.donors)} donors x {len(c.receivers)} "
        f"receivers, bits {c.bits}, pipelines {', '.join(c.pipelines)}, {len(c.lambdas)} lambdas"
        + (", lambda* on val" if c.select_lambda else ", lambda = 1 only"),
        "jobs: " + ", ".join(f"{n} {k}" for k, n in plan.counts().items()) + f"; {plan.cells()} validation cells",
    ]
    for job in plan.jobs:
        state = f" [{status[job.id]}]" if status and job.id in status else ""
        deps = f"  <- {', '.join(job.deps)}" if job.deps else ""
        lines.append(f"  {job.id}{state}{deps}")
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    """The job graph as JSON (ids, kinds, keys, deps), for tools."""
    return json.dumps([{"id": j.id, "kind": j.kind, "key": j.key, "deps": list(j.deps)} for j in plan.jobs],
                      indent=1)

"""The job graph of a study, and the protocol rules that both the workers and the reports apply.

Jobs, in dependency order (SPEC sections 1 and 7):

* ``pretrain`` theta_0, when the backbone is trained here (``backbone = "pretrain"``);
* ``finetune`` FT per task (and seed), and QAT per task, bit-width (and seed), both from theta_0;
* ``vector`` tau_D = theta_QAT^D - theta_FT^D per donor and bit-width;
* ``baseline`` per receiver: FT and pretrained in float (one job), and per bit-width FT+PTQ, QAT+PTQ and
  pretrained+PTQ (the "pretrained" model is theta_0's backbone under the receiver's own head);
* ``cells`` per (donor, receiver, bit-width): PTQ(theta_FT^R + lam * tau_D) on the receiver's validation split for
  every lam of the grid, lambda* chosen there, and the test split at lam = 1 (zero-shot) and at lambda* (which used
  receiver data). One job per pair keeps a pair's selection and its test numbers together and lets a worker keep
  the receiver's model and data hot across lambdas.

Every job and every result row has a content key (see :mod:`qvec.grid.artifacts`): the plan is a pure function
of the config, and "what is already done" is answered by the artifact store and the results database.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from qvec.data.probe import NOISE
from qvec.data.tasks import local_task_files, resolve_data_dir
from qvec.grid.artifacts import ArtifactStore, content_key, file_digest
from qvec.grid.config import GridConfig
from qvec.grid.params import BaselineParams, CellsParams, JobParams, PipelineParams
from qvec.models import ModelSpec
from qvec.quant import QuantSpec
from qvec.train.recipe import Recipe
from qvec.vectors.rules import MEAN_DONOR, SIGNALS, LambdaRule, get_rule, lam_key, select_lambda, signals_of  # noqa: F401  (select_lambda: re-exported)

KIND_ORDER = ("pretrain", "finetune", "vector", "baseline", "cells")
FLOAT_BASELINES = ("ft", "pretrained")
PTQ_BASELINES = ("ft_ptq", "qat_ptq", "pretrained_ptq")


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


# ------------------------------------------------------------------------------------------ protocol rules
def lambdas_on_test(params: Mapping, choices: Mapping[str, float] | float | None) -> list[float]:
    """The lambdas a pair is evaluated at on test: 1 (zero-shot), every rule's choice (lambda* included), and
    every lambda of the grid if asked. lambda = 0 is never tested: it is the FT+PTQ baseline."""
    if choices is None:
        choices = {}
    elif not isinstance(choices, Mapping):  # a bare lambda*
        choices = {"val": float(choices)}
    lams = {lam_key(1.0): 1.0}
    lams.update({lam_key(v): float(v) for v in choices.values() if float(v) != 0.0})
    if params["test_lambdas"] == "all":
        lams.update({lam_key(v): float(v) for v in params["lambdas"]})
    return sorted(lams.values())


def pair_rules(params: Mapping) -> list[LambdaRule]:
    """The rules a cells job measures (``one`` and ``val`` for jobs planned before rules existed)."""
    names = params.get("rules") or ["one", *(["val"] if params["select_lambda"] else [])]
    return [get_rule(n) for n in names]


def score_lambdas(params: Mapping) -> list[float]:
    """The lambdas the label-free signals are measured at: 0 (no patch) and the grid."""
    return sorted({0.0, *map(float, params["lambdas"])}) if params.get("signals") else []


def score_key(params: Mapping, signal: str, measure: str, lam: float) -> str:
    """Key of one label-free score of PTQ(theta_FT^R + lam * tau_D) against FT (see :mod:`qvec.selection`)."""
    src = params["signals"][signal]
    return content_key("result", {
        "kind": "score", "state": params["receiver_ft_key"], "quant": params["quant"],
        "in_proj": params["include_in_proj"], "signal": signal, "measure": measure, "source": src.get("id", ""),
        "limit": src.get("size"), "vector": params["vector_key"], "lam": lam_key(lam)})


def score_keys(params: Mapping) -> dict[str, tuple[str, float]]:
    """Every score key of a cells job -> (metric, lambda)."""
    out = {}
    for signal in params.get("signals", {}):
        for measure in SIGNALS[signal]:
            for lam in score_lambdas(params):
                out[score_key(params, signal, measure, lam)] = (f"{signal}.{measure}", lam)
    return out


def pair_choices(rules: Iterable[LambdaRule], val: Mapping[float, float],
                 scores: Mapping[str, Mapping[float, float]]) -> dict[str, float]:
    """Each rule's lambda for one pair, from its validation accuracies and label-free scores (workers, plan and
    report all call this, so they agree on what was chosen)."""
    out = {}
    for r in rules:
        if r.metric is None:
            out[r.name] = r.choose()
        elif r.signal == "val":
            if val:
                out[r.name] = r.choose(val)
        else:
            by = scores.get(r.metric, {})
            if by:
                out[r.name] = r.choose(by)
    return out


def result_key(kind: str, *, state: str, head: str, quant: dict | None, in_proj: bool, split: str,
               limit: int | None, vector: str = "", lam: float | None = None) -> str:
    """The content key of one result row: everything that determines the number, nothing else."""
    return content_key("result", {
        "kind": kind, "state": state, "head": head, "quant": quant, "in_proj": in_proj, "split": split,
        "limit": limit, "vector": vector, "lam": None if lam is None else lam_key(lam),
    })


def cell_key(params: Mapping, lam: float, split: str) -> str:
    """Key of the patched result PTQ(theta_FT^R + lam * tau_D) on ``split`` for a ``cells`` job."""
    limit = params["val_limit"] if split == "val" else params["test_limit"]
    return result_key("patched", state=params["receiver_ft_key"], head=params["receiver_ft_key"],
                      quant=params["quant"], in_proj=params["include_in_proj"], split=split, limit=limit,
                      vector=params["vector_key"], lam=lam)


def baseline_items(params: Mapping) -> list[dict]:
    """The rows a ``baseline`` job produces: kind, the state it evaluates, and the row key."""
    items = []
    sources = {"ft": params["receiver_ft_key"], "pretrained": params["theta0_key"],
               "ft_ptq": params["receiver_ft_key"], "qat_ptq": params.get("qat_key", ""),
               "pretrained_ptq": params["theta0_key"]}
    for kind in params["kinds"]:
        quant = params["quant"] if kind.endswith("_ptq") else None
        key = result_key(kind, state=sources[kind], head=params["receiver_ft_key"], quant=quant,
                         in_proj=params["include_in_proj"], split="test", limit=params["test_limit"])
        items.append({"kind": kind, "key": key, "quant": quant})
    return items


def job_result_keys(job: Job, lookup: Callable[[Iterable[str]], Mapping[str, float]]) -> list[str] | None:
    """Every result key an evaluation job stands for, or None while it is not knowable yet.

    ``lookup(keys)`` returns the stored value of each key that exists. A ``cells`` job's test lambdas depend on
    its validation results, so its keys are known only once every validation cell is stored.
    """
    p = job.params
    if job.kind == "baseline":
        return [it["key"] for it in baseline_items(p)]
    if is_pipeline(job):
        return pipeline_result_keys(p, lookup)
    if job.kind != "cells":
        return []
    val_keys = {cell_key(p, lam, "val"): lam for lam in p["lambdas"]} if p["select_lambda"] else {}
    sk = score_keys(p)
    have = lookup([*val_keys, *sk])
    if len(have) < len(val_keys) + len(sk):
        return None
    val = {lam: have[k] for k, lam in val_keys.items()}
    scores: dict[str, dict[float, float]] = {}
    for k, (metric, lam) in sk.items():
        scores.setdefault(metric, {})[lam] = have[k]
    choices = pair_choices(pair_rules(p), val, scores)
    return [*val_keys, *sk, *(cell_key(p, lam, "test") for lam in lambdas_on_test(p, choices))]


def missing_keys(job: Job, lookup: Callable[[Iterable[str]], Mapping[str, float]]) -> list[str] | None:
    """Result keys an evaluation job still has to produce (None: not knowable yet, see :func:`job_result_keys`)."""
    keys = job_result_keys(job, lookup)
    if keys is None:
        return None
    have = lookup(keys)
    return [k for k in keys if k not in have]


def candidate_keys(job: Job) -> list[str]:
    """Every row key an evaluation job might produce (all lambdas on val and test): what a worker may reuse."""
    p = job.params
    if job.kind == "baseline":
        return [it["key"] for it in baseline_items(p)]
    if is_pipeline(job):
        return pipeline_candidate_keys(p)
    if job.kind != "cells":
        return []
    lams = [*p["lambdas"], 1.0]
    return ([cell_key(p, lam, "val") for lam in p["lambdas"]] + list(score_keys(p))
            + [cell_key(p, lam, "test") for lam in lams])


# ------------------------------------------------------------------------------------------ other pipelines
# A pipeline job runs one registered quantizer other than RTN (GPTQ, or any plugin) per (receiver, bits, seed):
# on FT, on QAT, and on FT + lam tau_D for every donor at lambda = 1 and at each rule's choice. Its rows are
# ``<quantizer>:ft_ptq``, ``<quantizer>:qat_ptq`` and ``<quantizer>:patched``. Params hold the quantizer's
# config under its own name (``params["gptq"]``) and, when it is calibrated, the calibration set (``calib``).
PIPELINE_KINDS = ("ft_ptq", "qat_ptq", "patched")


def is_pipeline(job: Job) -> bool:
    """Whether ``job`` is a pipeline job: its kind is the quantizer's name (``gptq``)."""
    return job.params.get("quantizer") == job.kind


def pipeline_quant(params: Mapping) -> dict:
    """What a pipeline row's number depends on beyond the weights: the config and any calibration set."""
    q = params["quantizer"]
    calib = params.get("calib")
    return {**params[q], **({"calibration": calib["id"], "images": calib["images"]} if calib else {})}


def pipeline_key(params: Mapping, kind: str, state: str, vector: str = "", lam: float | None = None) -> str:
    """Key of one pipeline row: ``<q>:ft_ptq`` (the quantizer on FT), ``<q>:qat_ptq`` or ``<q>:patched``."""
    return result_key(f"{params['quantizer']}:{kind}", state=state, head=params["receiver_ft_key"],
                      quant=pipeline_quant(params), in_proj=params["include_in_proj"], split="test",
                      limit=params["test_limit"], vector=vector, lam=lam)


def pipeline_pair_params(params: Mapping, pair: Mapping) -> dict:
    """The cells-job view of one donor of a pipeline job (to look up its validation rows and scores)."""
    return {**params, "donor": pair["donor"], "vector": pair["vector"], "vector_key": pair["vector_key"]}


def pipeline_lambdas(params: Mapping, lookup: Callable[[Iterable[str]], Mapping[str, float]]
                     ) -> dict[str, list[float]] | None:
    """Per donor, the lambdas the pipeline is measured at: 1 and every rule's choice (None: not known yet)."""
    out = {}
    for pair in params["pairs"]:
        cp = pipeline_pair_params(params, pair)
        val_keys = {cell_key(cp, lam, "val"): lam for lam in cp["lambdas"]} if cp["select_lambda"] else {}
        sk = score_keys(cp)
        have = lookup([*val_keys, *sk])
        if len(have) < len(val_keys) + len(sk):
            return None
        scores: dict[str, dict[float, float]] = {}
        for k, (metric, lam) in sk.items():
            scores.setdefault(metric, {})[lam] = have[k]
        choices = pair_choices(pair_rules(cp), {lam: have[k] for k, lam in val_keys.items()}, scores)
        out[pair["donor"]] = lambdas_on_test({**cp, "test_lambdas": "selected"}, choices)
    return out


def pipeline_result_keys(params: Mapping, lookup: Callable[[Iterable[str]], Mapping[str, float]]
                         ) -> list[str] | None:
    lams = pipeline_lambdas(params, lookup)
    if lams is None:
        return None
    keys = [pipeline_key(params, "ft_ptq", params["receiver_ft_key"]),
            pipeline_key(params, "qat_ptq", params["qat_key"])]
    for pair in params["pairs"]:
        keys += [pipeline_key(params, "patched", params["receiver_ft_key"], pair["vector_key"], lam)
                 for lam in lams[pair["donor"]]]
    return keys


def pipeline_candidate_keys(params: Mapping) -> list[str]:
    """The cells' validation and score keys (to choose lambda) and every row the pipeline job might produce."""
    keys = [pipeline_key(params, "ft_ptq", params["receiver_ft_key"]),
            pipeline_key(params, "qat_ptq", params["qat_key"])]
    for pair in params["pairs"]:
        cp = pipeline_pair_params(params, pair)
        keys += [cell_key(cp, lam, "val") for lam in cp["lambdas"]] + list(score_keys(cp))
        keys += [pipeline_key(params, "patched", params["receiver_ft_key"], pair["vector_key"], lam)
                 for lam in {*cp["lambdas"], 1.0}]
    return keys


def _calibration_set(config: GridConfig, name: str) -> dict | None:
    """The named calibration set of a calibrated pipeline (None for one that needs no data)."""
    g = config.pipeline(name)
    if not g.quantizer(name).needs_calibration:
        return None
    if g.calibration in ("receiver", "noise"):
        return {"source": g.calibration, "id": g.calibration, "images": g.images}
    path = config.resolve_data_file(g.calibration, f"{name}.calibration")
    return {"source": str(path), "id": _probe_identity(path), "images": g.images}


def _pipeline_jobs(config: GridConfig, name: str, seeds: list, quants: dict, ft: dict, qat: dict,
                   cells: list[Job]) -> list[Job]:
    """Per (receiver, bits, seed): the quantizer on FT, on QAT, and on FT + lam tau_D for every donor at
    lambda = 1 and at each rule's choice (read from the receiver's cells, which it therefore follows)."""
    g = config.pipeline(name)
    calib = _calibration_set(config, name)
    jobs = []
    for seed in seeds:
        sfx = "" if seed is None else f"/s{seed}"
        for bits in g.bits or config.bits:
            for recv in config.receivers:
                mine = [j for j in cells if j.params["bits"] == bits and j.params["receiver"] == recv
                        and j.params["seed"] == ft[(recv, None, seed)].params["seed"]
                        and j.params["donor"] not in (recv, MEAN_DONOR)]
                if not mine:
                    continue
                f, q = ft[(recv, None, seed)], qat[(recv, bits, seed)]
                base = {k: v for k, v in mine[0].params.items()
                        if k not in ("donor", "vector", "vector_key", "label")}
                params: PipelineParams = {**base, "qat": q.params["out"], "qat_key": q.key,  # type: ignore[misc]
                          name: g.config(name, quants[bits]).to_dict(), **({"calib": calib} if calib else {}),
                          "pairs": [{"donor": j.params["donor"], "vector": j.params["vector"],
                                     "vector_key": j.params["vector_key"]} for j in mine]}
                key = content_key(name, params)  # the GPTQ jobs' keys of before the registry, unchanged
                params.update(quantizer=name, label=f"{name} w{bits} {recv}{sfx} ({len(mine)} donors)")
                jobs.append(Job(f"{name}/w{bits}/{recv}{sfx}", name, key,
                                (f.id, q.id, *(j.id for j in mine)), params))
    return jobs


# ------------------------------------------------------------------------------------------------ planning
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


def _mean_vector_jobs(config: GridConfig, store: ArtifactStore, seeds: list, vec: dict[tuple, Job]) -> list[Job]:
    """The mean of every other donor's vector, per receiver: a donor of its own (``mean``); adds them to ``vec``."""
    jobs = []
    for seed in seeds:
        sfx = "" if seed is None else f"/s{seed}"
        for bits in config.bits:
            for recv in config.receivers:
                parts = [vec[(d, bits, seed)] for d in config.donors if d != recv]
                key = content_key("vector-mean", {"vectors": [j.key for j in parts]})
                job = Job(f"vector/w{bits}/{MEAN_DONOR}->{recv}{sfx}", "vector", key, tuple(j.id for j in parts), {
                    "sources": [j.params["out"] for j in parts], "out": str(store.path("vector", key)),
                    "label": f"vector w{bits} mean of {len(parts)} donors for {recv}{sfx}"})
                jobs.append(job)
                vec[(f"{MEAN_DONOR}->{recv}", bits, seed)] = job
    return jobs


def _cell_jobs(config: GridConfig, seeds: list, quants: dict, ft: dict[tuple, Job], vec: dict[tuple, Job],
               eval_common: dict) -> list[Job]:
    """One cells job per (donor, receiver, bits, seed), grouped by (seed, bits, receiver) so that a sequential
    worker keeps one receiver hot."""
    ev = config.eval
    rules = config.rules.rules(config.select_lambda)
    signals = _signals(config, rules)
    jobs = []
    for seed in seeds:
        sfx = "" if seed is None else f"/s{seed}"
        for bits in config.bits:
            for recv in config.receivers:
                f = ft[(recv, None, seed)]
                donors = [d for d in config.donors if d != recv or config.self_pairs]
                for donor in donors + ([MEAN_DONOR] if config.rules.donor_mean else []):
                    vj = vec[(f"{MEAN_DONOR}->{recv}" if donor == MEAN_DONOR else donor, bits, seed)]
                    params: CellsParams = {
                              **eval_common, "donor": donor, "receiver": recv, "bits": bits, "seed": f.params["seed"],
                              "quant": quants[bits].to_dict(), "receiver_ft": f.params["out"],
                              "receiver_ft_key": f.key, "vector": vj.params["out"], "vector_key": vj.key,
                              "lambdas": list(config.lambdas), "select_lambda": config.select_lambda,
                              "test_lambdas": ev.test_lambdas, "label": f"cells w{bits} {donor} -> {recv}{sfx}"}
                    if signals or len(rules) > 1 + config.select_lambda:  # older plans keep their job keys
                        params.update({"rules": [r.name for r in rules], "signals": signals})
                    key = content_key("cells", {k: v for k, v in params.items() if k != "label"})
                    jobs.append(Job(f"cells/w{bits}/{donor}->{recv}{sfx}", "cells", key, (f.id, vj.id), params))
    return jobs


@dataclass
class _Build:
    """What every stage of :func:`build_plan` shares: the config, the store, theta_0 and the per-seed loops."""

    config: GridConfig
    store: ArtifactStore
    spec: ModelSpec
    data_dir: Path | None
    common: dict
    seeds: list
    quants: dict
    theta0: dict = field(default_factory=dict)
    theta0_deps: tuple = ()

    @staticmethod
    def suffix(seed: int | None) -> str:
        return "" if seed is None else f"/s{seed}"


def build_plan(config: GridConfig, artifacts_root: str | Path) -> Plan:
    """The full job graph of ``config`` (validated) against an artifact store; pure, does no work."""
    spec: ModelSpec = config.model_spec()
    # Absolute, and $QVEC_DATA resolved here, so that workers on other processes read the same folder.
    data_dir = resolve_data_dir(config.data_path())
    data_dir = data_dir.resolve() if data_dir is not None else None
    common = {"model": spec.to_json(), "data_dir": str(data_dir) if data_dir is not None else None,
              "include_in_proj": config.include_in_proj}
    ctx = _Build(config, ArtifactStore(artifacts_root), spec, data_dir, common, config.seeds or [None],
                 {b: config.quant(b) for b in config.bits})
    jobs = _theta0_jobs(ctx)
    ft, qat = _training_jobs(ctx, jobs)
    vec = _vector_jobs(ctx, ft, qat, jobs)
    ev = config.eval
    eval_common = {**common, "test_limit": ev.test_limit, "val_limit": ev.val_limit, "batch_size": ev.batch_size,
                   "theta0_key": ctx.theta0["key"], "theta0": ctx.theta0["path"]}
    jobs += _baseline_jobs(ctx, ft, qat, eval_common)
    if config.rules.donor_mean:
        jobs += _mean_vector_jobs(config, ctx.store, ctx.seeds, vec)
    cells = _cell_jobs(config, ctx.seeds, ctx.quants, ft, vec, eval_common)
    jobs += cells
    for name in config.extra_quantizers:
        jobs += _pipeline_jobs(config, name, ctx.seeds, ctx.quants, ft, qat, cells)
    return Plan(config, ctx.store, jobs)


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
    """Per (task, seed): FT, and QAT at every bit-width; appended to ``jobs`` and returned by (task, bits, seed)."""
    config, spec = ctx.config, ctx.spec
    task_ids = {t: _task_identity(t, ctx.data_dir) for t in config.all_tasks}
    ft: dict[tuple, Job] = {}
    qat: dict[tuple, Job] = {}
    for seed in ctx.seeds:
        sfx = ctx.suffix(seed)
        for task in config.all_tasks:
            base = Recipe.for_task(task, spec, config.profile)
            recipe = _recipe(base, config.recipe, config.task_recipes.get(task, {}))
            if seed is not None:
                recipe = recipe.override(seed=seed)
            for bits in [None, *config.bits]:
                q = ctx.quants[bits].to_dict() if bits is not None else None
                inputs = {"model": spec.to_json(), "theta0": ctx.theta0["key"], "task": task, "data": task_ids[task],
                          "recipe": recipe.to_json(), "qat": q,
                          "in_proj": config.qat_in_proj() if q else None}
                key = content_key("finetune", inputs)
                kind_name = "ft" if bits is None else f"qat/w{bits}"
                job = Job(f"{kind_name}/{task}{sfx}", "finetune", key, ctx.theta0_deps, {
                    **ctx.common, "include_in_proj": config.qat_in_proj(), "task": task, "recipe": recipe.to_json(),
                    "init": ctx.theta0["path"], "qat": q,
                    "seed": recipe.seed, "bits": bits, "out": str(ctx.store.path("finetune", key)),
                    "label": f"{'FT' if bits is None else f'QAT w{bits}'} {task}{sfx}"})
                jobs.append(job)
                (ft if bits is None else qat)[(task, bits, seed)] = job
    return ft, qat


def _vector_jobs(ctx: _Build, ft: dict, qat: dict, jobs: list[Job]) -> dict[tuple, Job]:
    """Per (donor, bits, seed): tau = theta_QAT - theta_FT; appended to ``jobs`` and returned by that key."""
    vec: dict[tuple, Job] = {}
    for seed in ctx.seeds:
        sfx = ctx.suffix(seed)
        for bits in ctx.config.bits:
            for donor in ctx.config.donors:
                f, q = ft[(donor, None, seed)], qat[(donor, bits, seed)]
                key = content_key("vector", {"ft": f.key, "qat": q.key})
                job = Job(f"vector/w{bits}/{donor}{sfx}", "vector", key, (f.id, q.id), {
                    "ft": f.params["out"], "qat": q.params["out"], "out": str(ctx.store.path("vector", key)),
                    "label": f"vector w{bits} {donor}{sfx}"})
                jobs.append(job)
                vec[(donor, bits, seed)] = job
    return vec


def _baseline_jobs(ctx: _Build, ft: dict, qat: dict, eval_common: dict) -> list[Job]:
    """Per receiver: the float baselines, and the PTQ baselines at every bit-width."""
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
            for bits in ctx.config.bits:
                q = qat[(recv, bits, seed)]
                params: BaselineParams = {
                          **base, "kinds": list(PTQ_BASELINES), "bits": bits, "quant": ctx.quants[bits].to_dict(),
                          "qat": q.params["out"], "qat_key": q.key, "label": f"baselines w{bits} {recv}{sfx}"}
                key = content_key("baseline", {k: v for k, v in params.items() if k != "label"})
                jobs.append(Job(f"baseline/w{bits}/{recv}{sfx}", "baseline", key,
                                (*ctx.theta0_deps, f.id, q.id), params))
    return jobs


def _probe_identity(path: Path) -> str:
    """A probe file's digest, or a folder's listing (names and sizes): what the probe scores depend on."""
    if path.is_file():
        return file_digest(path)
    listing = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
    return content_key("folder", {"files": listing})


def _signals(config: GridConfig, rules: Sequence[LambdaRule]) -> dict[str, dict]:
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
    return out


def describe_plan(plan: Plan, status: Mapping[str, str] | None = None) -> str:
    """A readable listing of the job graph (``qvec grid plan``): counts per kind, then every job and its inputs."""
    c = plan.config
    lines = [
        f"study {c.name}: model {c.model}, backbone {c.backbone}, {len(c.donors)} donors x {len(c.receivers)} "
        f"receivers, bits {c.bits}, {len(c.lambdas)} lambdas"
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


def quant_of(params: Mapping) -> QuantSpec | None:
    return QuantSpec.from_dict(params["quant"]) if params.get("quant") else None

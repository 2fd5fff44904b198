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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import QvecError
from ..models import ModelSpec
from ..quant import QuantSpec
from .artifacts import ArtifactStore, content_key, file_digest
from .config import GridConfig

KIND_ORDER = ("pretrain", "finetune", "vector", "baseline", "cells")
FLOAT_BASELINES = ("ft", "pretrained")
PTQ_BASELINES = ("ft_ptq", "qat_ptq", "pretrained_ptq")


@dataclass(frozen=True)
class Job:
    """One unit of work. ``params`` is JSON-able and holds everything a worker needs (absolute paths included)."""

    id: str
    kind: str
    key: str
    deps: tuple[str, ...] = ()
    params: dict = field(default_factory=dict, hash=False, compare=False)

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
        return {k: c[k] for k in KIND_ORDER if c[k]}

    def cells(self) -> int:
        """How many (donor, receiver, bits, lambda) validation cells the grid has."""
        return sum(len(j.params["lambdas"]) for j in self.jobs if j.kind == "cells")


# ------------------------------------------------------------------------------------------ protocol rules
def lam_key(lam: float) -> str:
    """Canonical text of a lambda (so 0.3 and 0.30000000000000004 are one cell)."""
    return f"{float(lam):.6g}"


def select_lambda(val: Mapping[float, float]) -> float:
    """lambda* = the lambda with the best validation accuracy; ties go to the one closest to 1, then the smaller.

    Preferring lambda = 1 on ties keeps the selection from moving away from the zero-shot setting on noise.
    """
    if not val:
        raise QvecError("cannot choose lambda*: no validation results")
    return min(val, key=lambda lam: (-val[lam], abs(lam - 1.0), lam))


def lambdas_on_test(params: Mapping, lam_star: float | None) -> list[float]:
    """The lambdas a pair is evaluated at on test: 1 (zero-shot), lambda* if selected, every lambda if asked."""
    lams = {lam_key(1.0): 1.0}
    if lam_star is not None:
        lams[lam_key(lam_star)] = float(lam_star)
    if params["test_lambdas"] == "all":
        lams.update({lam_key(v): float(v) for v in params["lambdas"]})
    return sorted(lams.values())


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
    if job.kind != "cells":
        return []
    keys, lam_star = [], None
    if p["select_lambda"]:
        val_keys = {lam_key(lam): cell_key(p, lam, "val") for lam in p["lambdas"]}
        have = lookup(val_keys.values())
        if len(have) < len(val_keys):
            return None
        keys += list(val_keys.values())
        lam_star = select_lambda({lam: have[val_keys[lam_key(lam)]] for lam in p["lambdas"]})
    return keys + [cell_key(p, lam, "test") for lam in lambdas_on_test(p, lam_star)]


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
    if job.kind != "cells":
        return []
    lams = [*p["lambdas"], 1.0]
    return [cell_key(p, lam, "val") for lam in p["lambdas"]] + [cell_key(p, lam, "test") for lam in lams]


# ------------------------------------------------------------------------------------------------ planning
def _task_identity(name: str, data_dir: Path | None) -> str:
    """What a task's data is: the digest of its local file, or its Hugging Face name."""
    from ..tasks import local_task_files

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


def build_plan(config: GridConfig, artifacts_root: str | Path) -> Plan:
    """The full job graph of ``config`` (validated) against an artifact store; pure, does no work."""
    from ..recipe import Recipe
    from ..tasks import resolve_data_dir

    store = ArtifactStore(artifacts_root)
    spec: ModelSpec = config.model_spec()
    # Absolute, and $QVEC_DATA resolved here, so that workers on other processes read the same folder.
    data_dir = resolve_data_dir(config.data_path())
    data_dir = data_dir.resolve() if data_dir is not None else None
    data_str = str(data_dir) if data_dir is not None else None
    jobs: list[Job] = []
    common = {"model": spec.to_json(), "data_dir": data_str, "include_in_proj": config.include_in_proj}

    # theta_0
    theta0_job: str | None = None
    if config.backbone == "pretrain":
        assert config.pretrain is not None
        data_file = config.pretrain_file()
        recipe = _recipe(Recipe.for_pretraining(spec, config.profile), config.pretrain.recipe)
        key = content_key("pretrain", {"model": spec.to_json(), "data": file_digest(data_file),
                                       "recipe": recipe.to_json()})
        out = store.path("pretrain", key)
        theta0_job = f"pretrain/{spec.name}"
        jobs.append(Job(theta0_job, "pretrain", key, (), {
            **common, "data_file": str(data_file), "recipe": recipe.to_json(), "out": str(out),
            "label": f"pretrain {spec} on {data_file.name}"}))
        theta0 = {"key": key, "path": str(out)}
    elif config.backbone == "hub":
        theta0 = {"key": content_key("hub", {"model": spec.to_json()}), "path": None}
    else:
        path = config.resolve_path(config.backbone)
        theta0 = {"key": file_digest(path), "path": str(path)}
    theta0_deps = (theta0_job,) if theta0_job else ()

    seeds = config.seeds or [None]
    quants = {b: config.quant(b) for b in config.bits}
    task_ids = {t: _task_identity(t, data_dir) for t in config.all_tasks}
    ft: dict[tuple, Job] = {}
    qat: dict[tuple, Job] = {}
    for seed in seeds:
        sfx = "" if seed is None else f"/s{seed}"
        for task in config.all_tasks:
            base = Recipe.for_task(task, spec, config.profile)
            recipe = _recipe(base, config.recipe, config.task_recipes.get(task, {}))
            if seed is not None:
                recipe = recipe.override(seed=seed)
            for bits in [None, *config.bits]:
                q = quants[bits].to_dict() if bits is not None else None
                inputs = {"model": spec.to_json(), "theta0": theta0["key"], "task": task, "data": task_ids[task],
                          "recipe": recipe.to_json(), "qat": q,
                          "in_proj": config.qat_in_proj() if q else None}
                key = content_key("finetune", inputs)
                kind_name = "ft" if bits is None else f"qat/w{bits}"
                job = Job(f"{kind_name}/{task}{sfx}", "finetune", key, theta0_deps, {
                    **common, "include_in_proj": config.qat_in_proj(), "task": task, "recipe": recipe.to_json(),
                    "init": theta0["path"], "qat": q,
                    "seed": recipe.seed, "bits": bits, "out": str(store.path("finetune", key)),
                    "label": f"{'FT' if bits is None else f'QAT w{bits}'} {task}{sfx}"})
                jobs.append(job)
                (ft if bits is None else qat)[(task, bits, seed)] = job

    vec: dict[tuple, Job] = {}
    for seed in seeds:
        sfx = "" if seed is None else f"/s{seed}"
        for bits in config.bits:
            for donor in config.donors:
                f, q = ft[(donor, None, seed)], qat[(donor, bits, seed)]
                key = content_key("vector", {"ft": f.key, "qat": q.key})
                job = Job(f"vector/w{bits}/{donor}{sfx}", "vector", key, (f.id, q.id), {
                    "ft": f.params["out"], "qat": q.params["out"], "out": str(store.path("vector", key)),
                    "label": f"vector w{bits} {donor}{sfx}"})
                jobs.append(job)
                vec[(donor, bits, seed)] = job

    ev = config.eval
    eval_common = {**common, "test_limit": ev.test_limit, "val_limit": ev.val_limit, "batch_size": ev.batch_size,
                   "theta0_key": theta0["key"], "theta0": theta0["path"]}
    for seed in seeds:
        sfx = "" if seed is None else f"/s{seed}"
        for recv in config.receivers:
            f = ft[(recv, None, seed)]
            base = {**eval_common, "receiver": recv, "seed": f.params["seed"], "receiver_ft": f.params["out"],
                    "receiver_ft_key": f.key}
            key = content_key("baseline", {**base, "kinds": FLOAT_BASELINES})
            jobs.append(Job(f"baseline/float/{recv}{sfx}", "baseline", key, (*theta0_deps, f.id), {
                **base, "kinds": list(FLOAT_BASELINES), "bits": None, "quant": None,
                "label": f"baselines float {recv}{sfx}"}))
            for bits in config.bits:
                q = qat[(recv, bits, seed)]
                params = {**base, "kinds": list(PTQ_BASELINES), "bits": bits, "quant": quants[bits].to_dict(),
                          "qat": q.params["out"], "qat_key": q.key, "label": f"baselines w{bits} {recv}{sfx}"}
                key = content_key("baseline", {k: v for k, v in params.items() if k != "label"})
                jobs.append(Job(f"baseline/w{bits}/{recv}{sfx}", "baseline", key, (*theta0_deps, f.id, q.id),
                                params))

    # Cells last, grouped by (seed, bits, receiver) so a sequential worker keeps one receiver hot.
    for seed in seeds:
        sfx = "" if seed is None else f"/s{seed}"
        for bits in config.bits:
            for recv in config.receivers:
                f = ft[(recv, None, seed)]
                for donor in config.donors:
                    if donor == recv and not config.self_pairs:
                        continue
                    vj = vec[(donor, bits, seed)]
                    params = {**eval_common, "donor": donor, "receiver": recv, "bits": bits, "seed": f.params["seed"],
                              "quant": quants[bits].to_dict(), "receiver_ft": f.params["out"],
                              "receiver_ft_key": f.key, "vector": vj.params["out"], "vector_key": vj.key,
                              "lambdas": list(config.lambdas), "select_lambda": config.select_lambda,
                              "test_lambdas": ev.test_lambdas, "label": f"cells w{bits} {donor} -> {recv}{sfx}"}
                    key = content_key("cells", {k: v for k, v in params.items() if k != "label"})
                    jobs.append(Job(f"cells/w{bits}/{donor}->{recv}{sfx}", "cells", key, (f.id, vj.id), params))
    return Plan(config, store, jobs)


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

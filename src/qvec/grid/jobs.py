"""What each job kind does, in whichever process runs it (a local worker, a Ray worker, or the driver itself).

Every kind is a library call: training and vector jobs call :func:`qvec.train.finetune` / :func:`qvec.train.pretrain`
and :meth:`qvec.vectors.QuantVector.from_checkpoints` and write one content-addressed artifact; evaluation jobs
measure candidates through the measurement core (:class:`qvec.vectors.measure.Bench`) and return result rows (the
driver alone writes the database). This module only turns a job's parameters into those calls, keeps what a
process loaded (a receiver's bench, vectors, theta_0) for the next job, and turns measurements into rows.

Job kinds are a registry (:data:`JOB_KINDS`): each says how it runs, which result rows it stands for, and which
stored rows a worker may reuse.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.core.registry import Registry
from qvec.data.tasks import get_task
from qvec.grid.keys import (
    Lookup,
    baseline_items,
    cell_candidate_keys,
    cell_choices,
    cell_key,
    cell_result_keys,
    lambdas_on_test,
    pair_rules,
    score_keys,
    score_lambdas,
)
from qvec.grid.params import BaselineParams, CellsParams, ReceiverParams
from qvec.grid.plan import Job
from qvec.grid.store import Result
from qvec.models import ModelSpec, build_model
from qvec.quant import RTN, QuantizerConfig, QuantSpec, quantizer_from_record
from qvec.quant.targets import TargetFilter
from qvec.train import finetune, pretrain
from qvec.train.recipe import Recipe
from qvec.vectors.measure import Bench, Measurement
from qvec.vectors.rules import choices, lam_key
from qvec.vectors.signals import make_signal, measures_of
from qvec.vectors.vector import QuantVector


@dataclass
class JobOutput:
    """What a job hands back to the driver."""

    job_id: str
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""
    reused: bool = False
    eval_seconds: float = 0.0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _LRU(OrderedDict):
    """A tiny least-recently-used cache (benches, vectors and states of a few MB to a few hundred MB each)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key, make: Callable):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class _Loaded:
    """What this process has loaded, kept for the next job: receivers' benches, vectors, checkpoints, theta_0."""

    def __init__(self) -> None:
        self.benches = _LRU(6)
        self.vectors = _LRU(32)
        self.states = _LRU(4)
        self.theta0s: dict[tuple, dict[str, torch.Tensor]] = {}

    def bench(self, p: ReceiverParams) -> Bench:
        targets = TargetFilter.of(p["include_in_proj"])
        task = get_task(p["receiver"], p["data_dir"])
        key = (p["receiver_ft"], json.dumps(targets.to_dict(), sort_keys=True), p.get("batch_size"))
        return self.benches.get_or(key, lambda: Bench(p["receiver_ft"], task, targets=targets,
                                                      batch_size=p.get("batch_size")))

    def vector(self, path: str) -> QuantVector:
        return self.vectors.get_or(path, lambda: QuantVector.load(path))

    def state(self, path: str) -> dict[str, torch.Tensor]:
        return self.states.get_or(path, lambda: Checkpoint.load(path).state)

    def theta0(self, path: str | None, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """theta_0's state: its checkpoint through the family's loader (which adapts it to this model, e.g.
        resamples its position embedding), or the family's hub weights when it has no file."""
        name = (path, spec.with_classes(0).to_json())  # one copy per backbone, whatever the receiver's head
        if name not in self.theta0s:
            self.theta0s[name] = build_model(spec, pretrained=path is None, weights=path).state_dict()
        return self.theta0s[name]


_LOADED: _Loaded | None = None


def loaded() -> _Loaded:
    """This process's loaded state (created on first use; lives as long as the worker process)."""
    global _LOADED
    if _LOADED is None:
        _LOADED = _Loaded()
    return _LOADED


# -------------------------------------------------------------------------------------------- evaluation
def _quantizer(p: Mapping) -> QuantizerConfig | None:
    """The job's quantizer (jobs planned before the registry hold only RTN's grid)."""
    if p.get("quantizer"):
        return quantizer_from_record(p["quantizer"])
    return RTN(QuantSpec.from_dict(p["quant"])) if p.get("quant") else None


def _calibration(p: Mapping) -> tuple[str | None, int]:
    c = p.get("calib")
    return (c["source"], int(c["images"])) if c else (None, 128)


def _row(p: Mapping, key: str, kind: str, split: str, m: Measurement, bench: Bench, *, donor: str = "",
         lam: float | None = None, quant: QuantizerConfig | None = None, metric: str = "top1",
         value: float | None = None, extra: Mapping | None = None) -> Result:
    inputs = {k: v for k, v in p.items() if k not in ("label", "known")}
    correct = round(m.values["top1"] * m.n) if "top1" in m.values else 0
    bpw = quant.bits_per_weight(tuple(w.shape) for w in bench.target_weights().values()) if quant else None
    return Result(
        key=key, kind=kind, model=str(ModelSpec.from_json(p["model"])), backbone=p["theta0_key"],
        receiver=p["receiver"], split=split, value=m.values[metric] if value is None else value, correct=correct,
        n=m.n, donor=donor, bits=quant.bits if quant else None,
        quant=p.get("quant_label") or (str(quant) if quant else ""), lam=lam, seed=int(p["seed"]), metric=metric,
        eval_seconds=m.seconds, patch_seconds=m.patch_seconds, ptq_seconds=m.ptq_seconds, worker=worker_name(),
        inputs=json.dumps({**inputs, "lam": lam, **(extra or {})}, sort_keys=True, default=str),
        pipeline=p.get("pipeline", "") if quant else "", coverage=p.get("coverage", ""), bits_per_weight=bpw,
    )


def run_baseline(p: BaselineParams) -> list[Result]:
    """FT and theta_0 in float, or a pipeline's quantizer on FT, on the receiver's matched QAT and on theta_0, all
    on the test split (the receiver's own head throughout)."""
    ld = loaded()
    known = p.get("known", {})
    bench = ld.bench(p)
    quant = _quantizer(p)
    calib, n = _calibration(p)
    bases = {"ft": lambda: None, "ft_ptq": lambda: None, "qat_ptq": lambda: ld.state(p["qat"]),
             "pretrained": lambda: ld.theta0(p["theta0"], bench.spec),
             "pretrained_ptq": lambda: ld.theta0(p["theta0"], bench.spec)}
    test = make_signal("test", size=p["test_limit"])
    rows = []
    for it in baseline_items(p):
        if it["key"] in known:
            continue
        q = quant if it["quant"] is not None else None
        m = bench.measure(test, quant=q, base=bases[it["kind"]](), calibration=calib, calibration_size=n)["test"]
        rows.append(_row(p, it["key"], it["kind"], "test", m, bench, quant=q))
    return rows


def run_cells(p: CellsParams) -> list[Result]:
    """One (pipeline, bits, coverage, donor, receiver): at every lambda the validation accuracy and the label-free
    scores the rules need, all with the pipeline's quantizer; then each rule's choice (lambda* among them), and the
    test split at 1 and at every choice.

    ``p["known"]`` holds values already in the database (a resumed or widened run): those are not measured again,
    and known values still count for the choices.
    """
    ld = loaded()
    known: dict[str, float] = p.get("known", {})
    bench, vec, quant = ld.bench(p), ld.vector(p["vector"]), _quantizer(p)
    calib, n = _calibration(p)
    signals = {name: make_signal(name, src.get("path"), src.get("size")) for name, src in p["signals"].items()}
    val_signal = make_signal("val", size=p["val_limit"])
    val_lams = set(p["lambdas"]) if p["select_lambda"] else set()
    sk = {(metric, lam_key(lam)): k for k, (metric, lam) in score_keys(p).items()}
    rows: list[Result] = []
    for lam in sorted(val_lams | set(score_lambdas(p))):
        need = [signals[s] for s in signals
                if any(sk[(f"{s}.{m}", lam_key(lam))] not in known for m in measures_of(s))]
        vk = cell_key(p, lam, "val") if lam in val_lams else None
        if vk is not None and vk not in known:
            need.append(val_signal)
        if not need:
            continue
        ms = bench.measure(need, vector=vec if lam else None, lam=lam, quant=quant, calibration=calib,
                           calibration_size=n)
        for name, m in ms.items():
            if name == "val":
                rows.append(_row(p, vk, "patched", "val", m, bench, donor=p["donor"], lam=lam, quant=quant))
                continue
            for measure, value in m.values.items():
                key = sk[(f"{name}.{measure}", lam_key(lam))]
                rows.append(_row(p, key, "score", name, m, bench, donor=p["donor"], lam=lam, quant=quant,
                                 metric=measure, value=value, extra={"signal": name, "measure": measure}))
    stored = {**known, **{r.key: r.value for r in rows}}
    val, scores, _ = cell_choices(p, lambda keys: {k: stored[k] for k in keys if k in stored})
    test = make_signal("test", size=p["test_limit"])
    for lam in lambdas_on_test(p, choices(pair_rules(p), val, scores)):
        key = cell_key(p, lam, "test")
        if key in known:
            continue
        m = bench.measure(test, vector=vec, lam=lam, quant=quant, calibration=calib, calibration_size=n)["test"]
        rows.append(_row(p, key, "patched", "test", m, bench, donor=p["donor"], lam=lam, quant=quant))
    return rows


# -------------------------------------------------------------------------------------------- artifacts
def run_training(job: Job, progress: bool) -> bool:
    """Pretrain or fine-tune into the job's artifact; False when the artifact already exists (nothing done)."""
    p = job.params
    out = Path(p["out"])
    if out.is_file():
        return False
    spec = ModelSpec.from_json(p["model"])
    recipe = Recipe.from_json(p["recipe"])
    if job.kind == "pretrain":
        pretrain(spec, p["data_file"], recipe, out, progress=progress)
    else:
        qat = QuantSpec.from_dict(p["qat"]) if p["qat"] else None
        finetune(spec, get_task(p["task"], p["data_dir"]), recipe, out, init=p["init"], qat=qat,
                 targets=TargetFilter.of(p["include_in_proj"]), progress=progress)
    return True


def run_vector(job: Job) -> bool:
    """A donor's vector from its FT and QAT checkpoints, or the mean of several donors' vectors (``sources``)."""
    p = job.params
    out = Path(p["out"])
    if out.is_file():
        return False
    if "sources" in p:
        vec = QuantVector.mean(QuantVector.load(v) for v in p["sources"])
    else:
        vec = QuantVector.from_checkpoints(Checkpoint.load(p["ft"]), Checkpoint.load(p["qat"]),
                                           coverage=p.get("coverage", "all"),
                                           targets=TargetFilter.of(p.get("targets", True)))
    vec.save(out)
    return True


# -------------------------------------------------------------------------------------------- job kinds
@dataclass(frozen=True)
class JobKind:
    """How a kind of job runs and what it stands for. Artifact kinds are done when their file exists; evaluation
    kinds when every row of ``result_keys`` is stored."""

    name: str
    #: evaluation kinds: params -> result rows
    evaluate: Callable[[dict], list[Result]] | None = None
    #: artifact kinds: (job, progress) -> True when it produced the file now
    make: Callable[[Job, bool], bool] | None = None
    #: every result key the job stands for (None: not knowable yet)
    result_keys: Callable[[Mapping, Lookup], list[str] | None] = lambda p, lookup: []
    #: every row key the job might produce, which a worker may reuse
    candidate_keys: Callable[[Mapping], list[str]] = lambda p: []

    @property
    def artifact(self) -> bool:
        return self.make is not None


JOB_KINDS: Registry[JobKind] = Registry("job kind", builtins=("qvec.grid.jobs",))


def register_job_kind(kind: JobKind) -> JobKind:
    JOB_KINDS.register(kind.name, kind)
    return kind


def _baseline_keys(p: Mapping, lookup: Lookup) -> list[str]:
    return [it["key"] for it in baseline_items(p)]


for _kind in (
    JobKind("pretrain", make=run_training),
    JobKind("finetune", make=run_training),
    JobKind("vector", make=lambda job, progress: run_vector(job)),
    JobKind("baseline", evaluate=run_baseline, result_keys=_baseline_keys,
            candidate_keys=lambda p: _baseline_keys(p, lambda keys: {})),
    JobKind("cells", evaluate=run_cells, result_keys=cell_result_keys, candidate_keys=cell_candidate_keys),
):
    register_job_kind(_kind)


def job_result_keys(job: Job, lookup: Lookup) -> list[str] | None:
    """Every result key an evaluation job stands for (None while not knowable; [] for artifact jobs)."""
    return JOB_KINDS.get(job.kind).result_keys(job.params, lookup)


def missing_keys(job: Job, lookup: Lookup) -> list[str] | None:
    """Result keys an evaluation job still has to produce (None: not knowable yet)."""
    keys = job_result_keys(job, lookup)
    if keys is None:
        return None
    have = lookup(keys)
    return [k for k in keys if k not in have]


def candidate_keys(job: Job) -> list[str]:
    return JOB_KINDS.get(job.kind).candidate_keys(job.params)


def is_artifact(job: Job) -> bool:
    return JOB_KINDS.get(job.kind).artifact


def execute_job(job: Job, progress: bool = False) -> JobOutput:
    """Run one job in this process and return its output (rows for evaluation jobs)."""
    t0 = time.perf_counter()
    out = JobOutput(job.id, worker=worker_name())
    kind = JOB_KINDS.get(job.kind, "job kind")
    if kind.make is not None:
        out.reused = not kind.make(job, progress)
    elif kind.evaluate is not None:
        out.results = kind.evaluate(job.params)
    else:
        raise QvecError(f"job kind {job.kind!r} neither makes an artifact nor evaluates")
    out.seconds = time.perf_counter() - t0
    out.eval_seconds = sum(r.eval_seconds for r in out.results)
    return out

"""What each job does, in whichever process runs it (a local worker, a Ray worker, or the driver itself).

Training and vector jobs call the library (:func:`qvec.train.pretrain`, :func:`qvec.train.finetune`,
:meth:`qvec.vector.QuantVector.from_checkpoints`) and write one content-addressed artifact; they return no rows.
Evaluation jobs return result rows and write nothing: the driver alone writes the database.

Evaluation is the hot path (thousands of cells), so a process keeps an :class:`EvalBench`: one model per
architecture, reused for every cell; the receiver's FT checkpoint, theta_0 and the donor vectors loaded once;
each cell only writes ``torch.add(ft, tau, alpha=lam)`` into the model's backbone parameters, quantizes them in
place with :func:`qvec.quant.quantize_` and evaluates on the split tensors that :mod:`qvec.tasks` caches.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.data.probe import NOISE, ProbeSet, load_probe, noise_probe, receiver_probe
from qvec.data.tasks import get_task
from qvec.grid.params import BaselineParams, CellsParams, PipelineParams, ReceiverParams
from qvec.grid.plan import (
    Job,
    baseline_items,
    cell_key,
    is_pipeline,
    lambdas_on_test,
    pair_choices,
    pair_rules,
    pipeline_key,
    pipeline_lambdas,
    quant_of,
    score_keys,
    score_lambdas,
)
from qvec.grid.store import Result
from qvec.models import ModelSpec, build_model, get_adapter
from qvec.models.loading import load_state_strict
from qvec.quant import get_quantizer, quantize_
from qvec.quant.targets import TargetFilter
from qvec.train.evaluate import evaluate
from qvec.train.recipe import Recipe
from qvec.train.trainer import finetune, pretrain
from qvec.vectors.rules import IMAGE_SIGNALS, SIGNALS, lam_key
from qvec.vectors.selection import agreement, ptq_errors, reference, weight_errors, weight_score
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
    """A tiny least-recently-used cache (checkpoints and vectors of a few MB to a few hundred MB each)."""

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


@dataclass
class _Slot:
    """A live model of one architecture, with direct handles on its backbone tensors."""

    model: torch.nn.Module
    spec: ModelSpec
    targets: list
    backbone: dict[str, torch.Tensor]
    config: object
    head_of: str | None = None


class EvalBench:
    """Per-process evaluation state: reused models and loaded checkpoints/vectors (see the module docstring)."""

    def __init__(self, state_cache: int = 6, vector_cache: int = 32) -> None:
        self._slots: dict[tuple, _Slot] = {}
        self._ckpts = _LRU(state_cache)
        self._vectors = _LRU(vector_cache)
        self._hub: dict[str, dict[str, torch.Tensor]] = {}
        self._probes = _LRU(4)
        #: FT outputs on probes, and PTQ weight errors of FT, per receiver (see run_cells)
        self.refs: _LRU = _LRU(16)
        self.errs0: _LRU = _LRU(16)

    def probe(self, path: str, n: int) -> ProbeSet:
        return self._probes.get_or((path, n), lambda: load_probe(path, n))

    def checkpoint(self, path: str) -> Checkpoint:
        return self._ckpts.get_or(path, lambda: Checkpoint.load(path))

    def vector(self, path: str) -> QuantVector:
        return self._vectors.get_or(path, lambda: QuantVector.load(path))

    def theta0(self, path: str | None, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """theta_0's state: its checkpoint, or the family's hub weights when it has no file."""
        name = (path, spec.with_classes(0).to_json())  # one copy per backbone, whatever the receiver's head
        if name not in self._hub:
            # A file goes through the adapter's loader, which adapts it to this model (e.g. resamples its
            # position embedding to the study's input size); the hub weights of the family otherwise.
            model = build_model(spec, pretrained=path is None, weights=path)
            self._hub[name] = model.state_dict()
        return self._hub[name]

    def slot(self, receiver_ft: str, include_in_proj: bool) -> _Slot:
        """The model for a receiver, with the receiver's FT weights (and head) loaded."""
        ck = self.checkpoint(receiver_ft)
        spec = ck.model_spec
        sk = (spec.to_json(), include_in_proj)
        s = self._slots.get(sk)
        if s is None:
            adapter = get_adapter(spec)
            model = adapter.build(spec, pretrained=False).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            live = model.state_dict(keep_vars=True)
            keys = adapter.backbone_keys({k: v.detach() for k, v in live.items()})
            targets = TargetFilter.of(include_in_proj).find(model, adapter.head_prefixes)
            outside = [t.key for t in targets if t.key not in keys]
            if outside:
                raise QvecError(f"quantization target {outside[0]!r} is not a backbone tensor of {spec}")
            s = _Slot(model, spec, targets, {k: live[k].detach() for k in keys},
                      adapter.data_config(spec, model))
            self._slots[sk] = s
        if s.head_of != receiver_ft:
            load_state_strict(s.model, ck.state, receiver_ft)
            s.head_of = receiver_ft
        return s

    @torch.no_grad()
    def set_backbone(self, s: _Slot, state: dict[str, torch.Tensor], vec: QuantVector | None = None,
                     lam: float = 0.0) -> None:
        """Backbone <- ``state`` (+ ``lam`` * ``vec``); the head is left as the receiver's."""
        for k, dst in s.backbone.items():
            if k not in state:
                raise QvecError(f"backbone tensor {k!r} is missing from the source checkpoint")
            if vec is not None and lam and k in vec.tensors:
                torch.add(state[k], vec.tensors[k], alpha=lam, out=dst)
            else:
                dst.copy_(state[k])


_BENCH: EvalBench | None = None


def bench() -> EvalBench:
    """This process's evaluation bench (created on first use; lives as long as the worker process)."""
    global _BENCH
    if _BENCH is None:
        _BENCH = EvalBench()
    return _BENCH


def _measure(s: _Slot, task, split: str, limit: int | None, batch_size: int, quant, set_weights: Callable[[], None]):
    """Set the weights, PTQ them if ``quant``, evaluate; returns (EvalResult, patch_s, ptq_s)."""
    t0 = time.perf_counter()
    set_weights()
    t1 = time.perf_counter()
    if quant is not None:
        quantize_(s.model, quant, s.targets)
    t2 = time.perf_counter()
    r = evaluate(s.model, task, split, batch_size=batch_size, limit=limit, config=s.config)
    return r, t1 - t0, t2 - t1


def _row(p: ReceiverParams, key: str, kind: str, split: str, r, patch_s: float, ptq_s: float, *, donor: str = "",
         lam: float | None = None, quant: dict | None = None) -> Result:
    q = quant_of({"quant": quant}) if quant else None
    inputs = {k: v for k, v in p.items() if k not in ("label", "known")}
    return Result(
        key=key, kind=kind, model=str(ModelSpec.from_json(p["model"])), backbone=p["theta0_key"],
        receiver=p["receiver"], split=split, value=r.accuracy, correct=r.correct, n=r.n, donor=donor,
        bits=q.bits if q else None, quant=str(q) if q else "", lam=lam, seed=int(p["seed"]),
        eval_seconds=r.seconds, patch_seconds=patch_s, ptq_seconds=ptq_s, worker=worker_name(),
        inputs=json.dumps({**inputs, "lam": lam}, sort_keys=True, default=str),
    )


def run_baseline(p: BaselineParams) -> list[Result]:
    """FT / pretrained in float, or FT+PTQ / QAT+PTQ / pretrained+PTQ at one bit-width, on the test split."""
    b = bench()
    known = p.get("known", {})
    task = get_task(p["receiver"], p["data_dir"])
    s = b.slot(p["receiver_ft"], p["include_in_proj"])
    spec = s.spec
    sources = {
        "ft": lambda: b.checkpoint(p["receiver_ft"]).state,
        "ft_ptq": lambda: b.checkpoint(p["receiver_ft"]).state,
        "qat_ptq": lambda: b.checkpoint(p["qat"]).state,
        "pretrained": lambda: b.theta0(p["theta0"], spec),
        "pretrained_ptq": lambda: b.theta0(p["theta0"], spec),
    }
    rows = []
    for it in baseline_items(p):
        if it["key"] in known:
            continue
        state = sources[it["kind"]]()
        r, patch_s, ptq_s = _measure(s, task, "test", p["test_limit"], p["batch_size"], quant_of(it),
                                     lambda state=state: b.set_backbone(s, state))
        rows.append(_row(p, it["key"], it["kind"], "test", r, patch_s, ptq_s, quant=it["quant"]))
    return rows


def run_cells(p: CellsParams) -> list[Result]:
    """One (donor, receiver, bits) pair: at every lambda the validation accuracy and the label-free scores its
    rules need, then each rule's choice (lambda* among them), then the test split at 1 and at every choice.

    ``p["known"]`` holds values already in the database (a resumed or widened run): those cells are not measured
    again, and known values still count for the choices.
    """
    b = bench()
    known: dict[str, float] = p.get("known", {})
    task = get_task(p["receiver"], p["data_dir"])
    s = b.slot(p["receiver_ft"], p["include_in_proj"])
    ft_state = b.checkpoint(p["receiver_ft"]).state
    vec = b.vector(p["vector"])
    quant = quant_of(p)
    rows: list[Result] = []
    val: dict[float, float] = {}
    scores: dict[str, dict[float, float]] = {}
    val_lams = set(p["lambdas"]) if p["select_lambda"] else set()
    sk = {(metric, lam_key(lam)): k for k, (metric, lam) in score_keys(p).items()}
    for lam in sorted(val_lams | set(score_lambdas(p))):
        vk = cell_key(p, lam, "val") if lam in val_lams else None
        keys = [k for (_, lk), k in sk.items() if lk == lam_key(lam)]
        if vk is not None and vk in known:
            val[lam] = known[vk]
        for (metric, lk), k in sk.items():
            if lk == lam_key(lam) and k in known:
                scores.setdefault(metric, {})[lam] = known[k]
        if all(k in known for k in keys) and (vk is None or vk in known):
            continue
        refs = _references(b, s, p, task, ft_state)
        t0 = time.perf_counter()
        b.set_backbone(s, ft_state, vec, lam)
        t1 = time.perf_counter()
        quantize_(s.model, quant, s.targets)
        cost = (t1 - t0, time.perf_counter() - t1)
        if vk is not None and vk not in known:
            r = evaluate(s.model, task, "val", batch_size=p["batch_size"], limit=p["val_limit"], config=s.config)
            rows.append(_row(p, vk, "patched", "val", r, *cost, donor=p["donor"], lam=lam, quant=p["quant"]))
            val[lam] = r.accuracy
        for signal in p.get("signals", {}):
            if all(sk[(f"{signal}.{m}", lam_key(lam))] in known for m in SIGNALS[signal]):
                continue
            t2 = time.perf_counter()
            got = _signal(b, s, p, signal, refs, ft_state, quant)
            secs = time.perf_counter() - t2
            for measure, value in got.items():
                metric = f"{signal}.{measure}"
                n = len(refs[signal].logp) if signal in refs else len(s.targets)
                rows.append(_score_row(p, sk[(metric, lam_key(lam))], signal, measure, value, n, secs, cost, lam))
                scores.setdefault(metric, {})[lam] = value
    choices = pair_choices(pair_rules(p), val, scores)
    return rows + _test_choices(b, s, p, task, ft_state, vec, quant, lambdas_on_test(p, choices), known)


def _test_choices(b: EvalBench, s: _Slot, p: CellsParams, task, ft_state, vec, quant, lams, known
                  ) -> list[Result]:
    """The test split at lambda = 1 and at every rule's choice (those not already known)."""
    rows = []
    for lam in lams:
        key = cell_key(p, lam, "test")
        if key in known:
            continue
        r, patch_s, ptq_s = _measure(s, task, "test", p["test_limit"], p["batch_size"], quant,
                                     lambda lam=lam: b.set_backbone(s, ft_state, vec, lam))
        rows.append(_row(p, key, "patched", "test", r, patch_s, ptq_s, donor=p["donor"], lam=lam, quant=p["quant"]))
    return rows


def _references(b: EvalBench, s: _Slot, p: CellsParams, task, ft_state) -> dict:
    """The receiver's full-precision FT outputs on each image signal's probe (computed once per process)."""
    refs = {}
    for signal, src in p.get("signals", {}).items():
        if signal not in IMAGE_SIGNALS:
            continue
        name = (p["receiver_ft"], signal, src.get("id"), src.get("size"), s.spec.to_json())

        def make(signal=signal, src=src):
            if signal == "unlabeled":
                probe = receiver_probe(task, src["size"])
            elif signal == "noise" or src.get("path") == NOISE:
                probe = noise_probe(src["size"], s.config.image_size)
            else:
                probe = b.probe(src["path"], src["size"])
            b.set_backbone(s, ft_state)
            return reference(s.model, probe, s.config, p["batch_size"] or 64)

        refs[signal] = b.refs.get_or(name, make)
    return refs


def _signal(b: EvalBench, s: _Slot, p: CellsParams, signal: str, refs: dict, ft_state, quant) -> dict[str, float]:
    """One label-free signal of the (patched, quantized) model in the slot: see :mod:`qvec.selection`."""
    if signal in IMAGE_SIGNALS:
        return agreement(s.model, refs[signal], p["batch_size"] or 64)
    if signal == "weight":
        keys = [t.key for t in s.targets]
        name = (p["receiver_ft"], json.dumps(p["quant"], sort_keys=True), tuple(keys))
        errs0 = b.errs0.get_or(name, lambda: ptq_errors(ft_state, keys, quant))
        return {"err": weight_score(weight_errors({k: s.backbone[k] for k in keys}, ft_state), errs0)}
    raise QvecError(f"unknown signal {signal!r} in a cells job")


def _score_row(p: CellsParams, key: str, signal: str, measure: str, value: float, n: int, secs: float,
               cost: tuple[float, float], lam: float) -> Result:
    q = quant_of(p)
    inputs = {k: v for k, v in p.items() if k not in ("label", "known")}
    return Result(
        key=key, kind="score", model=str(ModelSpec.from_json(p["model"])), backbone=p["theta0_key"],
        receiver=p["receiver"], split=signal, value=float(value), correct=0, n=n, donor=p["donor"],
        bits=q.bits if q else None, quant=str(q) if q else "", lam=lam, seed=int(p["seed"]), metric=measure,
        eval_seconds=secs, patch_seconds=cost[0], ptq_seconds=cost[1], worker=worker_name(),
        inputs=json.dumps({**inputs, "lam": lam, "signal": signal, "measure": measure}, sort_keys=True,
                          default=str))


def run_pipeline(p: PipelineParams) -> list[Result]:
    """A registered quantizer other than RTN on the receiver's FT and QAT models and on FT + lam * tau_D for each
    donor, at lambda = 1 and at each rule's choice (re-derived from the cells' rows in ``known``, as the plan
    does), on the test split."""
    b = bench()
    known: dict[str, float] = p.get("known", {})
    lams = pipeline_lambdas(p, lambda keys: {k: known[k] for k in keys if k in known})
    if lams is None:
        raise QvecError(f"{p['label']}: the receiver's cells are not all measured yet")
    name = p["quantizer"]
    cls = get_quantizer(name)
    cfg = cls.from_dict(p[name])
    task = get_task(p["receiver"], p["data_dir"])
    s = b.slot(p["receiver_ft"], p["include_in_proj"])
    x = _calibration(b, s, p, task) if cls.needs_calibration else None
    ft_state = b.checkpoint(p["receiver_ft"]).state
    items = [("ft_ptq", p["receiver_ft_key"], ft_state, None, "", None),
             ("qat_ptq", p["qat_key"], b.checkpoint(p["qat"]).state, None, "", None)]
    for pair in p["pairs"]:
        vec = b.vector(pair["vector"])
        items += [("patched", p["receiver_ft_key"], ft_state, vec, pair, lam) for lam in lams[pair["donor"]]]
    calib = f" calib={p['calib']['source']}:{p['calib']['images']}" if x is not None else ""
    rows = []
    for kind, state_key, state, vec, pair, lam in items:
        key = pipeline_key(p, kind, state_key, pair["vector_key"] if pair else "", lam)
        if key in known:
            continue
        t0 = time.perf_counter()
        b.set_backbone(s, state, vec, lam or 0.0)
        t1 = time.perf_counter()
        quantize_(s.model, cfg, s.targets, x)
        t2 = time.perf_counter()
        r = evaluate(s.model, task, "test", batch_size=p["batch_size"], limit=p["test_limit"], config=s.config)
        row = _row(p, key, f"{name}:{kind}", "test", r, t1 - t0, t2 - t1, donor=pair["donor"] if pair else "",
                   lam=lam, quant=p["quant"])
        row.quant = f"{cfg}{calib}"
        rows.append(row)
    return rows


def _calibration(b: EvalBench, s: _Slot, p: PipelineParams, task) -> torch.Tensor:
    """A calibrated pipeline's images, preprocessed for the slot's model: the receiver's unlabeled training inputs,
    noise, or a generic probe (cached per process)."""
    c = p["calib"]
    name = ("calib", p["receiver_ft"], c["id"], c["images"], s.spec.to_json())

    def make() -> torch.Tensor:
        if c["source"] == "receiver":
            probe = receiver_probe(task, c["images"], split="train")
        elif c["source"] == NOISE:
            probe = noise_probe(c["images"], s.config.image_size)
        else:
            probe = b.probe(c["source"], c["images"])
        return probe.tensors(s.config)

    return b.refs.get_or(name, make)


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
        task = get_task(p["task"], p["data_dir"])
        finetune(spec, task, recipe, out, init=p["init"], qat=quant_of({"quant": p["qat"]}),
                 targets=p["include_in_proj"], progress=progress)
    return True


def run_vector(job: Job) -> bool:
    """A donor's vector from its FT and QAT checkpoints, or the mean of several donors' vectors (``sources``)."""
    out = Path(job.params["out"])
    if out.is_file():
        return False
    if "sources" in job.params:
        vec = QuantVector.mean(QuantVector.load(v) for v in job.params["sources"])
    else:
        vec = QuantVector.from_checkpoints(Checkpoint.load(job.params["ft"]), Checkpoint.load(job.params["qat"]))
    vec.save(out)
    return True


def execute_job(job: Job, progress: bool = False) -> JobOutput:
    """Run one job in this process and return its output (rows for evaluation jobs)."""
    t0 = time.perf_counter()
    out = JobOutput(job.id, worker=worker_name())
    if job.kind in ("pretrain", "finetune"):
        out.reused = not run_training(job, progress)
    elif job.kind == "vector":
        out.reused = not run_vector(job)
    elif job.kind == "baseline":
        out.results = run_baseline(job.params)
    elif job.kind == "cells":
        out.results = run_cells(job.params)
    elif is_pipeline(job):
        out.results = run_pipeline(job.params)
    else:
        raise QvecError(f"unknown job kind {job.kind!r}")
    out.seconds = time.perf_counter() - t0
    out.eval_seconds = sum(r.eval_seconds for r in out.results)
    return out

"""Proposition 1 checked on a finished study: predicted lambda* and recovered share under H = I and under the
receiver's diagonal Fisher (:mod:`qvec.fisher`), against the empirical lambda* and recovery of the report.

It reads the study's FT checkpoints and vectors from the artifact store (via the plan) and a few training
examples per receiver; it writes ``theory_w<bits>.md/.csv`` and returns the Spearman correlations. It uses the
receiver's own QAT vector and data: a check of the theory, not a zero-shot rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from qvec.core.atomic import make_folder
from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.data.tasks import get_task
from qvec.grid.config import GridConfig
from qvec.grid.plan import build_plan
from qvec.grid.render import Table
from qvec.grid.report_data import load_study
from qvec.grid.store import ResultStore
from qvec.models import load_model
from qvec.vectors.fisher import diagonal_fisher, predict, spearman
from qvec.vectors.vector import QuantVector


@dataclass
class TheoryCheck:
    """Spearman correlations of Proposition 1's predictions with the study, per metric, at one bit-width."""

    bits: int
    pairs: int
    rho_lam: dict[str, float]
    rho_recovery: dict[str, float]
    table: Table


def _artifacts(config: GridConfig, artifacts: Path) -> tuple[dict[str, str], dict[tuple[str, int], str]]:
    plan = build_plan(config, artifacts)
    ft = {j.params["task"]: j.params["out"] for j in plan.jobs if j.kind == "finetune" and not j.params.get("qat")}
    vec = {(j.id.split("/")[2], int(j.id.split("/")[1][1:])): j.params["out"] for j in plan.jobs
           if j.kind == "vector" and "sources" not in j.params}  # ids: vector/w<bits>/<donor>[/s<seed>]
    for path in [*ft.values(), *vec.values()]:
        if not Path(path).is_file():
            raise QvecError(f"{path}: artifact missing; run the study first (qvec grid run)")
    return ft, vec


def fisher_check(config: GridConfig, db: str | Path, artifacts: str | Path, bits: int, *, examples: int = 64,
                 batch_size: int = 1, out_dir: str | Path | None = None) -> TheoryCheck:
    """Predict lambda* and recovery for every transfer pair at ``bits`` with H = I and H = diag Fisher of the
    receiver (``examples`` receiver training images), and correlate them with the study's results."""
    if bits not in config.bits:
        raise QvecError(f"{config.source}: the study has bits {config.bits}, not {bits}")
    with ResultStore(db, create=False) as store:
        data = load_study(store, config.name)
    ft_paths, vec_paths = _artifacts(config, Path(artifacts))
    pairs = [p for p in data.pairs_at(bits) if not math.isnan(p.lam_star)]
    if not pairs:
        raise QvecError(f"study {config.name!r} has no transfer pair with lambda* at {bits} bits")
    vecs = {k: QuantVector.load(v) for k, v in vec_paths.items() if k[1] == bits}
    rows, pred = [], {"I": [], "Fisher": []}
    for recv in sorted({p.receiver for p in pairs}):
        ck = Checkpoint.load(ft_paths[recv])
        model, adapter, spec = load_model(ck)
        task = get_task(recv, config.data_path())
        x = task.split("train").tensors(adapter.data_config(spec, model))
        if x is None:
            raise QvecError(f"task {recv!r} is too large to cache for the Fisher estimate")
        rho_r = vecs[(recv, bits)].tensors
        h = diagonal_fisher(model, x[:examples], [k for k in rho_r if k in dict(model.named_parameters())],
                            batch_size=batch_size)
        for p in (q for q in pairs if q.receiver == recv):
            rho_d = vecs[(p.donor, bits)].tensors
            pi, pf = predict(rho_d, rho_r), predict(rho_d, rho_r, h)
            rec = p.recovery(p.delta_star)
            pred["I"].append((pi, p.lam_star, rec))
            pred["Fisher"].append((pf, p.lam_star, rec))
            rows.append([p.donor, recv, p.lam_star, pi.lam, pf.lam, rec, pi.cos2, pf.cos2])
    rho_lam = {m: spearman([a.lam for a, _, _ in v], [b for _, b, _ in v]) for m, v in pred.items()}
    rho_rec = {m: spearman([a.cos2 for a, _, _ in v], [c for _, _, c in v]) for m, v in pred.items()}
    table = Table(
        f"theory_w{bits}", f"Proposition 1 at {bits}-bit: predicted against empirical λ* and recovery",
        ["Donor", "Receiver", "λ* (val)", "λ pred (H = I)", "λ pred (Fisher)", "Recovery λ*", "cos² (I)",
         "cos² (Fisher)"], rows,
        f"λ pred = ⟨ρ_D, ρ_R⟩_H / ‖ρ_D‖²_H and cos²_H(ρ_D, ρ_R), ρ = the task's own quantization vector; H = I or "
        f"the receiver FT model's diagonal Fisher on {examples} training images (labels sampled from the model). "
        f"Spearman with λ*: I {rho_lam['I']:+.2f}, Fisher {rho_lam['Fisher']:+.2f}; cos² with recovery: "
        f"I {rho_rec['I']:+.2f}, Fisher {rho_rec['Fisher']:+.2f} ({len(rows)} pairs). Uses the receiver's own "
        "QAT and data: a check of the theory, not a zero-shot rule.", digits=3)
    if out_dir is not None:
        make_folder(out_dir)
        table.write(Path(out_dir))
    return TheoryCheck(bits, len(rows), rho_lam, rho_rec, table)

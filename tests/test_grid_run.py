"""A tiny real study end to end (vit-nano on two generated tasks): results, content addressing, reuse, report."""

from __future__ import annotations

import shutil

import pytest
import torch

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.data.tasks import get_task
from qvec.grid import build_plan, job_status, load_config, run_grid
from qvec.grid.executors import make_executor
from qvec.grid.report import write_report
from qvec.grid.run import adopt_checkpoints
from qvec.grid.store import ResultStore
from qvec.models import get_adapter, load_model
from qvec.quant import QuantSpec, find_targets, quantize_
from qvec.train.evaluate import evaluate
from qvec.vectors.vector import QuantVector

from .grid_helpers import TINY_TASKS, table, write_tiny_config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One uninterrupted run of the tiny study (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("study")
    cfg = load_config(write_tiny_config(root))
    summary = run_grid(cfg, db=root / "tiny.db", artifacts=root / "artifacts")
    return root, cfg, summary


def test_every_job_runs_once_and_every_row_is_there(study):
    root, cfg, summary = study
    plan = build_plan(cfg, root / "artifacts")
    assert summary.executed == len(plan.jobs) == 15 and summary.skipped == 0
    with ResultStore(root / "tiny.db") as store:
        rows = store.results("tiny")
        assert all(s == "done" for s in job_status(plan, store).values())
        log = [j.key for j in store.jobs("tiny")]
    assert sorted(log) == sorted(j.key for j in plan.jobs)
    kinds = [r.kind for r in rows]
    assert kinds.count("ft") == kinds.count("pretrained") == 2
    assert kinds.count("ft_ptq") == kinds.count("qat_ptq") == kinds.count("pretrained_ptq") == 2
    val = [r for r in rows if r.kind == "patched" and r.split == "val"]
    test = [r for r in rows if r.kind == "patched" and r.split == "test"]
    assert len(val) == 4 * 2 and all(r.n == 24 for r in val)  # 4 pairs x 2 lambdas, val capped at 24
    assert 4 <= len(test) <= 8 and all(r.n == 48 for r in test)  # lambda = 1 and lambda* per pair
    assert summary.new_rows == len(rows)


def test_self_pair_at_lambda_1_is_the_qat_ceiling(study):
    root, _, _ = study
    with ResultStore(root / "tiny.db") as store:
        rows = store.results("tiny")
    for t in TINY_TASKS:
        own = next(r for r in rows if r.kind == "patched" and r.donor == t == r.receiver and r.lam == 1.0
                   and r.split == "test")
        qat = next(r for r in rows if r.kind == "qat_ptq" and r.receiver == t)
        assert own.correct == qat.correct


def test_a_cell_equals_patch_then_ptq_done_by_hand(study):
    """The grid's fast path (in-place add into a reused model) gives the library's patch + PTQ result."""
    root, cfg, _ = study
    plan = build_plan(cfg, root / "artifacts")
    job = plan.by_id["cells/w3/syn_glyphs->syn_shapes"]
    receiver = Checkpoint.load(job.params["receiver_ft"])
    patched = QuantVector.load(job.params["vector"]).apply(receiver, 1.0)
    model, adapter, spec = load_model(patched)
    quantize_(model, QuantSpec(3), find_targets(model, adapter.head_prefixes))
    acc = evaluate(model, get_task("syn_shapes", cfg.data_path()), "test", limit=48,
                   config=get_adapter(spec).data_config(spec, model))
    with ResultStore(root / "tiny.db") as store:
        row = next(r for r in store.results("tiny") if r.kind == "patched" and r.donor == "syn_glyphs"
                   and r.receiver == "syn_shapes" and r.lam == 1.0 and r.split == "test")
    assert row.correct == acc.correct and row.n == acc.n == 48
    assert torch.isfinite(torch.tensor(row.patch_seconds + row.ptq_seconds))


def test_second_run_does_nothing(study):
    root, cfg, _ = study
    before = table(root / "tiny.db")
    again = run_grid(cfg, db=root / "tiny.db", artifacts=root / "artifacts")
    assert again.executed == 0 and again.new_rows == 0 and again.skipped == 15
    assert table(root / "tiny.db") == before


def test_widened_grid_reuses_artifacts_and_cells(study, tmp_path):
    """More lambdas and another study name: no training, no vector, no baseline; old cells are not re-measured."""
    root, _, _ = study
    db = tmp_path / "wide.db"
    shutil.copy(root / "tiny.db", db)
    cfg = load_config(write_tiny_config(root, name="wide", lambdas="[0.5, 1.0, 1.5]"))
    summary = run_grid(cfg, db=db, artifacts=root / "artifacts", executor=make_executor("local", workers=1))
    with ResultStore(db) as store:
        executed = [j.kind for j in store.jobs("wide")]
        wide = store.results("wide")
    assert set(executed) == {"cells"} and len(executed) == 4
    new_val = [r for r in wide if r.split == "val" and r.lam == 1.5]
    assert len(new_val) == 4 and len([r for r in wide if r.split == "val"]) == 12
    assert summary.new_rows == 4 + sum(r.split == "test" and r.lam == 1.5 for r in wide)
    old = {r[0] for r in table(root / "tiny.db")}
    assert old <= {r.key for r in wide}  # the study links every earlier row it needs


def test_report_from_a_real_run(study, tmp_path):
    root, _, _ = study
    path = write_report(root / "tiny.db", tmp_path / "report")
    text = path.read_text()
    assert "syn_glyphs" in text and (tmp_path / "report" / "heatmap_w3.png").is_file()
    with ResultStore(root / "tiny.db") as store:
        assert {t.task for t in store.trainings("tiny") if t.kind == "qat"} == set(TINY_TASKS)


def test_adopt_checkpoints_trained_outside_the_grid(study, tmp_path):
    """Checkpoints whose headers record a job's exact inputs are reused; anything else is refused."""
    root, cfg, _ = study
    plan = build_plan(cfg, root / "artifacts")
    outside = {}
    for jid in ("pretrain/vit-nano", "ft/syn_glyphs", "qat/w3/syn_shapes"):
        outside[jid] = tmp_path / f"{jid.replace('/', '_')}.safetensors"
        shutil.copy(plan.by_id[jid].params["out"], outside[jid])
    fresh = tmp_path / "artifacts"
    got = adopt_checkpoints(cfg, fresh, list(outside.values()))
    assert sorted(j for _, j in got) == sorted(outside)
    with ResultStore(tmp_path / "x.db") as store:
        status = job_status(build_plan(cfg, fresh), store)
    assert {j for j, s in status.items() if s == "done"} == set(outside)
    with pytest.raises(QvecError, match="matches no training job"):
        adopt_checkpoints(load_config(write_tiny_config(root, name="other", extra='[recipe.tasks.syn_glyphs]\n'
                                                        'lr = 0.5\n')), tmp_path / "a2", list(outside.values()))

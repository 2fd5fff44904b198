"""The job graph of a small grid, its content keys, and the protocol rules shared by workers and reports."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from qvec.cli import main
from qvec.core.errors import QvecError
from qvec.grid import build_plan, describe_plan, load_config
from qvec.grid.keys import cell_key, lambdas_on_test
from qvec.train.recipe import QUALITY_FINETUNE, QUALITY_PRETRAIN, SMALL_FINETUNE, SMALL_PRETRAIN, Recipe
from qvec.vectors.rules import select_lambda

from .conftest import shared_data_dir
from .grid_helpers import tiny_config_text, tiny_suite

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_suite(tmp_path_factory.mktemp("suite"))


def _plan(tmp_path, data_dir, **kw):
    p = tmp_path / "g.toml"
    p.write_text(tiny_config_text(data_dir, **kw))
    return build_plan(load_config(p), tmp_path / "artifacts")


def test_job_graph_of_a_small_grid(tmp_path, data_dir):
    plan = _plan(tmp_path, data_dir, bits="[3, 2]")
    # 1 theta_0; FT + QAT@3 + QAT@2 for 2 tasks; 2 donors x 2 bits vectors; per receiver 1 float + 2 PTQ
    # baseline jobs; 2 x 2 pairs (self included) x 2 bits cell jobs.
    assert plan.counts() == {"pretrain": 1, "finetune": 6, "vector": 4, "baseline": 6, "cells": 8}
    assert plan.cells() == 8 * 2
    seen = set()
    for job in plan.jobs:  # topological order
        assert all(d in seen for d in job.deps), job.id
        seen.add(job.id)
    cells = plan.by_id["cells/w3/syn_glyphs->syn_shapes"]
    assert set(cells.deps) == {"ft/syn_shapes", "vector/w3/syn_glyphs"}
    assert set(plan.by_id["vector/w2/syn_shapes"].deps) == {"ft/syn_shapes", "qat/w2/syn_shapes"}
    assert set(plan.by_id["baseline/w2/syn_glyphs"].deps) == {"pretrain/vit-nano", "ft/syn_glyphs",
                                                             "qat/w2/syn_glyphs"}
    assert len({j.key for j in plan.jobs}) == len(plan.jobs)
    # cells are grouped by receiver so one worker keeps a receiver hot
    order = [j.params["receiver"] for j in plan.jobs if j.kind == "cells" and j.params["bits"] == 3]
    assert order == sorted(order, key=order.index) and order[0] == order[1]


def test_keys_are_stable_and_a_widened_grid_reuses_them(tmp_path, data_dir):
    a = _plan(tmp_path, data_dir)
    b = _plan(tmp_path, data_dir)
    assert [(j.id, j.key) for j in a.jobs] == [(j.id, j.key) for j in b.jobs]
    wide = _plan(tmp_path, data_dir, lambdas="[0.5, 1.0, 1.5]", bits="[3, 4]")
    for job in a.jobs:
        if job.kind != "cells":  # every training, vector and baseline is the same job
            assert wide.by_id[job.id].key == job.key
    old, new = a.by_id["cells/w3/syn_glyphs->syn_shapes"], wide.by_id["cells/w3/syn_glyphs->syn_shapes"]
    for lam in (0.5, 1.0):  # the cells already measured keep their keys
        assert cell_key(old.params, lam, "val") == cell_key(new.params, lam, "val")
    assert cell_key(old.params, 0.5, "val") != cell_key(old.params, 0.5, "test")


def test_a_recipe_change_invalidates_downstream_only(tmp_path, data_dir):
    a = _plan(tmp_path, data_dir)
    b = _plan(tmp_path, data_dir, extra='[recipe.tasks.syn_glyphs]\nepochs = 2\n')
    changed = {j.id for j in a.jobs if a.by_id[j.id].key != b.by_id[j.id].key}
    assert "ft/syn_glyphs" in changed and "qat/w3/syn_glyphs" in changed
    assert "ft/syn_shapes" not in changed and "pretrain/vit-nano" not in changed
    assert "vector/w3/syn_glyphs" in changed and "cells/w3/syn_glyphs->syn_shapes" in changed


def test_self_pairs_seeds_and_subsets(tmp_path, data_dir):
    plan = _plan(tmp_path, data_dir, extra="self_pairs = false\nseeds = [1, 2]\n")
    assert plan.counts()["cells"] == 2 * 2 and plan.counts()["finetune"] == 2 * 2 * 2
    assert "cells/w3/syn_glyphs->syn_glyphs/s1" not in plan.by_id
    assert plan.by_id["ft/syn_glyphs/s2"].params["seed"] == 2
    sub = _plan(tmp_path, data_dir, extra='donors = ["syn_glyphs"]\nreceivers = ["syn_shapes"]\n')
    assert sub.counts() == {"pretrain": 1, "finetune": 4, "vector": 1, "baseline": 2, "cells": 1}


def test_select_lambda_rule():
    assert select_lambda({0.5: 0.6, 1.0: 0.7, 1.5: 0.65}) == 1.0
    assert select_lambda({0.75: 0.8, 1.0: 0.7}) == 0.75
    assert select_lambda({0.9: 0.7, 1.2: 0.7, 1.05: 0.7}) == 1.05  # ties: closest to 1
    assert select_lambda({0.9: 0.7, 1.1: 0.7}) == 0.9  # then the smaller
    with pytest.raises(QvecError):
        select_lambda({})


def test_test_lambdas():
    p = {"test_lambdas": "selected", "lambdas": [0.5, 1.0, 1.5]}
    assert lambdas_on_test(p, 1.5) == [1.0, 1.5]
    assert lambdas_on_test(p, 1.0) == [1.0]
    assert lambdas_on_test(p, None) == [1.0]
    assert lambdas_on_test({**p, "test_lambdas": "all"}, 0.5) == [0.5, 1.0, 1.5]


def test_plan_command(tmp_path, data_dir, capsys):
    p = tmp_path / "g.toml"
    p.write_text(tiny_config_text(data_dir))
    assert main(["grid", "plan", str(p), "--workdir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "1 pretrain, 4 finetune, 2 vector, 4 baseline, 4 cells" in text
    assert "cells/w3/syn_shapes->syn_glyphs [pending]" not in text  # no database yet: no status column
    assert "cells/w3/syn_shapes->syn_glyphs  <- ft/syn_glyphs, vector/w3/syn_shapes" in text
    assert describe_plan(build_plan(load_config(p), tmp_path / "a")).count("\n") > 15


def test_authors_in_proj_setting_quantizes_it_in_qat_only(tmp_path, data_dir):
    """include_in_proj = false + qat_include_in_proj = true: QAT sees in_proj_weight, PTQ leaves it in float."""
    default = _plan(tmp_path, data_dir)
    explicit = _plan(tmp_path, data_dir, extra="qat_include_in_proj = true\n")
    assert [(j.id, j.key) for j in default.jobs] == [(j.id, j.key) for j in explicit.jobs]
    authors = _plan(tmp_path, data_dir, extra="include_in_proj = false\nqat_include_in_proj = true\n")
    neither = _plan(tmp_path, data_dir, extra="include_in_proj = false\n")
    qat, ft = authors.by_id["qat/w3/syn_glyphs"], authors.by_id["ft/syn_glyphs"]
    assert qat.params["include_in_proj"] is True and qat.key == default.by_id[qat.id].key
    assert neither.by_id[qat.id].params["include_in_proj"] is False and neither.by_id[qat.id].key != qat.key
    assert ft.key == default.by_id[ft.id].key
    for job_id in ("baseline/w3/syn_glyphs", "cells/w3/syn_glyphs->syn_shapes"):
        assert authors.by_id[job_id].params["include_in_proj"] is False


def test_profile_key_sets_the_base_recipes(tmp_path, data_dir):
    """The config's overrides apply on top of the profile's recipes (default: quality)."""
    def recipes(extra: str) -> dict[str, set[Recipe]]:
        sub = tmp_path / (extra.split('"')[1] if extra else "default")
        sub.mkdir()
        found: dict[str, set[Recipe]] = {}
        for j in _plan(sub, data_dir, extra=extra).jobs:
            if "recipe" in j.params:
                found.setdefault(j.kind, set()).add(Recipe.from_json(j.params["recipe"]))
        return found

    tiny = {"epochs": 1, "train_limit": 128, "batch_size": 64, "warmup_steps": 1}
    pre = {"epochs": 1, "train_limit": 192, "batch_size": 64, "warmup_steps": 1}
    default, fast = recipes(""), recipes('profile = "fast"')
    assert default == recipes('profile = "quality"')
    assert fast["finetune"] == {replace(SMALL_FINETUNE.override(**tiny), min_examples=None)}
    assert default["finetune"] == {replace(QUALITY_FINETUNE.override(**tiny), min_examples=None)}
    assert fast["pretrain"] == {SMALL_PRETRAIN.override(**pre)} and default["pretrain"] == {
        QUALITY_PRETRAIN.override(**pre)}


@pytest.mark.parametrize("name, pre, ft", [("mini", SMALL_PRETRAIN, SMALL_FINETUNE),
                                           ("mini-quality", QUALITY_PRETRAIN, QUALITY_FINETUNE)])
def test_shipped_replication_configs_train_with_their_profile(name, pre, ft, tmp_path):
    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data (or $QVEC_DATA) is absent: the shipped configs need the real task files")
    plan = build_plan(load_config(REPO / "configs" / f"{name}.toml", {"data_dir": str(data.resolve())}), tmp_path / "a")
    recipes = {j.kind: set() for j in plan.jobs}
    for j in plan.jobs:
        if "recipe" in j.params:
            recipes[j.kind].add(Recipe.from_json(j.params["recipe"]))
    assert recipes["pretrain"] == {pre} and recipes["finetune"] == {ft}

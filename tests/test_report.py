"""Reports from a small hand-built results database: the numbers in the tables and the files written."""

from __future__ import annotations

import csv
import math

import pytest
from PIL import Image

from qvec.cli import main
from qvec.core.errors import QvecError
from qvec.grid.report import load_study, ptq_verdict, summary_table, wise_table, write_report
from qvec.grid.store import Result, ResultStore, Training

TASKS = ["alpha", "beta", "gamma"]
LAMS = [0.5, 1.0, 1.5]
# Delta (points over FT+PTQ = 50) at lambda = 1 for each transfer pair (donor, receiver).
DELTA_L1 = {("alpha", "beta"): 10.0, ("alpha", "gamma"): -5.0, ("beta", "alpha"): 20.0, ("beta", "gamma"): 0.0,
            ("gamma", "alpha"): -10.0, ("gamma", "beta"): 5.0}


def _result(key, kind, receiver, value, split="test", donor="", bits=3, lam=None, **kw) -> Result:
    return Result(key=key, kind=kind, model="qvec:vit-nano", backbone="b", receiver=receiver, split=split,
                  value=value, correct=round(1000 * value), n=1000, donor=donor, bits=bits,
                  quant=f"w{bits}-sym-channel" if bits else "", lam=lam, **kw)


def build_db(path, with_val: bool = True):
    rows = []
    for r in TASKS:
        rows += [_result(f"ft-{r}", "ft", r, 0.90, bits=None), _result(f"pre-{r}", "pretrained", r, 0.10, bits=None),
                 _result(f"ftq-{r}", "ft_ptq", r, 0.50), _result(f"qat-{r}", "qat_ptq", r, 0.80),
                 _result(f"preq-{r}", "pretrained_ptq", r, 0.08)]
        for d in TASKS:
            acc1 = 0.80 if d == r else 0.50 + DELTA_L1[(d, r)] / 100
            rows.append(_result(f"p-{d}-{r}-1-test", "patched", r, acc1, donor=d, lam=1.0, patch_seconds=0.001,
                                ptq_seconds=0.003))
            if not with_val:
                continue
            # validation: beta -> alpha prefers 0.5 (tested at 0.5: 75%), everything else prefers 1.0;
            # alpha -> beta ties 1.0 and 1.5 (the tie goes to 1.0).
            val = {0.5: 0.4, 1.0: 0.6, 1.5: 0.5}
            if (d, r) == ("beta", "alpha"):
                val = {0.5: 0.9, 1.0: 0.5, 1.5: 0.5}
                rows.append(_result(f"p-{d}-{r}-0.5-test", "patched", r, 0.75, donor=d, lam=0.5))
            if (d, r) == ("alpha", "beta"):
                val = {0.5: 0.4, 1.0: 0.6, 1.5: 0.6}
            for lam, v in val.items():
                rows.append(_result(f"p-{d}-{r}-{lam}-val", "patched", r, v, split="val", donor=d, lam=lam))
    with ResultStore(path) as store:
        store.register_study("hand", {"tasks": TASKS, "bits": [3], "lambdas": LAMS, "backbone": "pretrain"})
        store.add_results(rows, "hand")
        store.add_trainings([Training("hand", f"q-{r}", "qat", r, 3, 2038, 40.0) for r in TASKS])
    return path


@pytest.fixture
def db(tmp_path):
    return build_db(tmp_path / "hand.db")


def test_pairs_and_lambda_star(db):
    with ResultStore(db) as store:
        data = load_study(store)
    assert data.receivers == TASKS and data.bits == [3]
    pairs = {(p.donor, p.receiver): p for p in data.pairs}
    assert len(pairs) == 9 and len(data.pairs_at(3)) == 6
    assert pairs[("beta", "alpha")].lam_star == 0.5 and pairs[("beta", "alpha")].delta_star == pytest.approx(25.0)
    assert pairs[("alpha", "beta")].lam_star == 1.0  # tie with 1.5 goes to 1
    assert pairs[("alpha", "alpha")].delta_one == pytest.approx(30.0) and pairs[("alpha", "alpha")].gap == 30.0
    assert pairs[("gamma", "beta")].recovery(pairs[("gamma", "beta")].delta_one) == pytest.approx(5 / 30)
    assert data.patch_cost[("alpha", 3)] == pytest.approx(0.004) and data.qat_cost[("alpha", 3)] == 40.0


def test_tables_exclude_self_pairs(db):
    with ResultStore(db) as store:
        data = load_study(store)
    donor = {row[0]: row for row in wise_table(data, 3, "donor").rows}
    # alpha as donor: +10 (beta), -5 (gamma) -> best 10, worst -5, mean 2.5, 50% positive
    assert donor["alpha"][1:6] == [2, 10.0, -5.0, 2.5, 50.0]
    # beta as donor at lambda*: alpha gets +25 (lambda* = 0.5), gamma 0 -> mean 12.5, 50% positive
    assert donor["beta"][6:10] == [25.0, 0.0, 12.5, 50.0]
    recv = {row[0]: row for row in wise_table(data, 3, "receiver").rows}
    assert recv["alpha"][1:6] == [2, 20.0, -10.0, 5.0, 50.0]
    s = summary_table(data).rows[0]
    assert s[:4] == [3, 6, 40.0, 30.0]  # pairs, PTQ loss 90-50, QAT gain 80-50
    assert s[4] == pytest.approx(20 / 6) and s[6] == pytest.approx(50.0)  # mean delta, win rate at lambda = 1
    assert s[9] == "1"  # median lambda*, printed at its own precision


def test_ptq_verdict_names_the_informative_bit_width(db):
    with ResultStore(db) as store:
        data = load_study(store)
    lead, text = ptq_verdict(data)
    assert lead == 3 and "3 of 3 tasks lose ≥ 10 points" in text and "3-bit is the informative setting" in text
    lead, text = ptq_verdict(data, threshold=50)
    assert "At no bit-width do most tasks lose ≥ 50 points" in text


def test_write_report_files_and_figures(db, tmp_path):
    out = tmp_path / "report"
    path = write_report(db, out)
    text = path.read_text()
    for name in ("summary", "ptq_loss", "baselines_w3", "donor_wise_w3", "receiver_wise_w3", "recovery_w3", "cost"):
        assert (out / f"{name}.md").is_file() and (out / f"{name}.csv").is_file()
        assert f"({name}.csv)" in text
    for fig in ("heatmap_w3", "bars", "radar", "ptq_loss", "lambda_star"):
        png = out / f"{fig}.png"
        assert png.is_file() and (out / f"{fig}.svg").is_file() and f"]({fig}.png)" in text
        with Image.open(png) as im:
            assert im.size[0] > 400 and im.size[1] > 200
    assert "uses receiver data" in text and "zero-shot" in text
    with open(out / "cost.csv") as f:
        cost = list(csv.DictReader(f))
    assert float(cost[0]["QAT / patch"]) == pytest.approx(10000, rel=1e-6)


def test_report_of_an_incomplete_study(tmp_path):
    """A study still running (no validation rows yet) reports lambda = 1 and leaves lambda* empty."""
    db = build_db(tmp_path / "partial.db", with_val=False)
    with ResultStore(db) as store:
        data = load_study(store)
    assert all(math.isnan(p.lam_star) for p in data.pairs)
    assert summary_table(data).rows[0][4] == pytest.approx(20 / 6)
    assert write_report(db, tmp_path / "r").is_file()


def test_report_command(db, tmp_path, capsys):
    assert main(["report", str(db), "-o", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.md").is_file()
    assert main(["report", str(tmp_path / "absent.db"), "-o", str(tmp_path / "x")]) == 2
    assert main(["report", str(db), "-o", str(tmp_path / "x"), "--study", "nope"]) == 2
    with ResultStore(tmp_path / "empty.db") as store:
        store.register_study("empty", {})
    with pytest.raises(QvecError, match="has no results yet"):
        write_report(tmp_path / "empty.db", tmp_path / "y")


def test_median_lambda_over_seeds_is_on_the_grid_and_skips_missing():
    from qvec.grid.report import _median_lambda

    assert _median_lambda([0.3, 0.6]) == 0.3 and _median_lambda([float("nan"), 0.9, 1.2, 0.6]) == 0.9
    assert math.isnan(_median_lambda([float("nan")]))

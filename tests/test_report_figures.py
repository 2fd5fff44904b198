"""The report's figure and table registry: a figure registered here shows up on the page, in its place, and is gone
once unregistered; the built-in parts keep the page's order."""

from __future__ import annotations

import pytest

from qvec.core.errors import QvecError
from qvec.grid.render import Table, pyplot, register_table, report_parts, save_figure, unregister_table
from qvec.grid.report import write_report
from qvec.grid.report_figures import register_figure, unregister_figure

from .test_report import build_db


def _toy_study_figure(data, out_dir):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.bar(range(len(data.receivers)), [data.base("ft", r) for r in data.receivers])
    return save_figure(fig, out_dir, "toy")


def _toy_bits_figure(data, bits, out_dir):
    if bits != 3:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([p.delta_one for p in data.pairs_at(bits)])
    return save_figure(fig, out_dir, f"toy_w{bits}")


def _toy_table(data):
    return Table("toy_table", "Toy: receivers", ["Receiver"], [[r] for r in data.receivers])


@pytest.fixture
def toys():
    register_figure("toy", title="Toy figure", order=35)(_toy_study_figure)
    register_figure("toy_bits", title="Toy at {bits}-bit", scope="bits", order=25)(_toy_bits_figure)
    register_table("toy_table", scope="cost", order=200)(_toy_table)
    try:
        yield
    finally:
        for name in ("toy", "toy_bits"):
            try:
                unregister_figure(name)
            except QvecError:
                pass
        try:
            unregister_table("toy_table")
        except QvecError:
            pass


def test_builtin_parts_keep_the_page_order():
    assert [(p.kind, p.name) for p in report_parts("study")] == [
        ("table", "summary"), ("table", "which_pipeline"), ("figure", "pipelines_bpw"), ("table", "ptq_loss"),
        ("figure", "ptq_loss"), ("figure", "bars"), ("figure", "radar"), ("figure", "lambda_star"), ("figure", "rules")]
    assert [(p.kind, p.name) for p in report_parts("bits")] == [
        ("table", "baselines"), ("figure", "heatmap"), ("table", "donor_wise"), ("table", "receiver_wise"),
        ("table", "recovery"), ("table", "rules"), ("table", "donors")]
    assert [(p.kind, p.name) for p in report_parts("cost")] == [("table", "cost")]


def test_a_registered_figure_is_on_the_page_until_unregistered(toys, tmp_path):
    db = build_db(tmp_path / "hand.db")
    md = write_report(db, tmp_path / "with").read_text()
    assert (tmp_path / "with" / "toy.png").is_file() and (tmp_path / "with" / "toy.svg").is_file()
    assert "![Toy figure](toy.png)" in md and "*Toy figure* ([SVG](toy.svg))" in md
    # in its place: after the PTQ-loss figure (order 30), before the bars (40)
    assert md.index("(ptq_loss.png)") < md.index("(toy.png)") < md.index("(bars.png)")
    # the per-bit-width one gets its caption filled in and sits between the heatmap (20) and the donor-wise table (30)
    assert "![Toy at 3-bit](toy_w3.png)" in md
    assert md.index("(heatmap_w3.png)") < md.index("(toy_w3.png)") < md.index("(donor_wise_w3.csv)")
    # a registered table lands in its section, last
    assert md.index("## Cost") < md.index("**Toy: receivers**")
    assert md.rstrip().endswith("([toy_table.csv](toy_table.csv))")
    assert (tmp_path / "with" / "toy_table.csv").read_text().splitlines() == ["Receiver", "alpha", "beta", "gamma"]

    unregister_figure("toy")
    unregister_figure("toy_bits")
    unregister_table("toy_table")
    out = tmp_path / "without"
    md = write_report(db, out).read_text()
    assert "toy" not in md.lower() and not any(p.name.startswith("toy") for p in out.iterdir())
    assert "(ptq_loss.png)" in md and "(bars.png)" in md


def test_registry_errors(toys):
    with pytest.raises(QvecError, match="already registered"):
        register_figure("toy", title="again")(_toy_study_figure)
    with pytest.raises(QvecError, match="scope must be one of study, bits, cost"):
        register_figure("toy2", title="x", scope="appendix")
    with pytest.raises(QvecError, match="no report figure named 'nope'"):
        unregister_figure("nope")
    with pytest.raises(QvecError, match="no report table named 'toy'"):
        unregister_table("toy")  # a figure of that name is no table
    # a figure and a table may share a name (the PTQ-loss table and figure do)
    register_table("toy", scope="study")(_toy_table)
    unregister_table("toy")

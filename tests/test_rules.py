"""Lambda rules (qvec.rules), label-free scores and choices (qvec.selection), probes (qvec.probe), the grid's
rule cells and the report's rule tables, and ``qvec patch --lam auto``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.data.probe import load_probe
from qvec.grid import load_config, run_grid
from qvec.grid.executors import make_executor
from qvec.grid.keys import pair_rules
from qvec.grid.plan import build_plan
from qvec.grid.report import load_study, write_report
from qvec.grid.store import ResultStore
from qvec.quant import QuantSpec
from qvec.vectors.rules import LambdaRule, get_rule, register_rule, rule_names, select_lambda
from qvec.vectors.rules import choices as pair_choices
from qvec.vectors.selection import choose_donor, choose_lambda
from qvec.vectors.vector import QuantVector

from . import toy_quantizer
from .cli_helpers import one_line_error, run
from .grid_helpers import tiny_config_text, tiny_suite

THREE = ["syn_glyphs", "syn_shapes", "syn_gratings"]


# ---------------------------------------------------------------------------------------------- registry
def test_builtin_rules_and_their_data():
    assert {"one", "fixed", "val", "agree", "agree-unlabeled", "agree-noise", "weight"} <= set(rule_names())
    assert get_rule("one").choose() == 1.0 and get_rule("fixed:0.25").choose() == 0.25
    assert get_rule("val").uses == "receiver labels" and not get_rule("val").zero_shot
    assert get_rule("agree-unlabeled").uses == "receiver inputs" and not get_rule("agree-unlabeled").zero_shot
    assert get_rule("agree").zero_shot and get_rule("weight").zero_shot and get_rule("agree-noise").zero_shot
    assert get_rule("agree").metric == "probe.kl" and get_rule("agree:top1").metric == "probe.agree"
    # label-free rules can refuse the vector; the SPEC's validation rule keeps its grid
    assert get_rule("agree").candidates([0.5, 1.0]) == [0.0, 0.5, 1.0]
    assert get_rule("val").candidates([0.5, 1.0]) == [0.5, 1.0]


@pytest.mark.parametrize("name, message", [
    ("nope", "unknown lambda rule 'nope'"), ("fixed", "needs a finite number"), ("fixed:x", "needs a finite number"),
    ("fixed:inf", "needs a finite number"), ("agree:l2", "takes kl or top1"), ("one:2", "takes no argument"),
    ("", "must be a name"),
])
def test_bad_rule_names(name, message):
    with pytest.raises(QvecError, match=message):
        get_rule(name)


def test_choices_and_tie_breaks():
    kl = get_rule("agree")
    assert kl.choose({0.0: 0.3, 0.5: 0.1, 1.0: 0.2}) == 0.5  # lower KL is better
    assert kl.choose({0.0: 0.1, 0.5: 0.1}) == 0.0  # a tie goes to the smaller change
    top1 = get_rule("agree:top1")
    assert top1.choose({0.0: 0.9, 0.5: 0.95, 1.0: 0.95}) == 0.5
    val = {0.5: 0.8, 1.0: 0.8, 1.5: 0.7}
    assert get_rule("val").choose(val) == select_lambda(val) == 1.0  # the SPEC tie-break toward 1
    with pytest.raises(QvecError, match="no probe.kl scores"):
        kl.choose({})


# ------------------------------------------------------------------------------------------------ probes
def test_probes_from_folder_npz_and_noise(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 30), (64, 64), (33, 50)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    p = load_probe(folder, 10)
    assert len(p) == 3 and p.images.dtype == torch.uint8 and p.images.shape[-1] == p.images.shape[-2] == 30
    # images resized a second time (to the smallest side) keep their 0..255 range: noise has a mean near 127
    assert all(60 < float(im.float().mean()) < 200 for im in p.images)
    np.savez(tmp_path / "x.npz", x=rng.integers(0, 255, (20, 16, 16, 1), dtype=np.uint8))
    q = load_probe(tmp_path / "x.npz", 8)
    assert q.images.shape == (8, 3, 16, 16)
    assert torch.equal(load_probe("noise", 4).images, load_probe("noise", 4).images)  # seeded


def test_bad_probes_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QvecError, match="no images in this probe folder"):
        load_probe(tmp_path / "empty")
    np.savez(tmp_path / "tiny.npz", x=np.zeros((5, 4, 4, 3), np.uint8))
    with pytest.raises(QvecError, match="probe images are 4x4"):
        load_probe(tmp_path / "tiny.npz")
    with pytest.raises(QvecError, match="no such probe"):
        load_probe(tmp_path / "missing.npz")
    with pytest.raises(QvecError, match=r"the probe size \(--probe-size\) must be at least 1, got 0"):
        load_probe("noise", 0)


# --------------------------------------------------------------------------------------- choose_lambda
def _hurting_vector(path) -> QuantVector:
    """A vector built to hurt: large random noise on every backbone tensor."""
    v = QuantVector.load(path)
    g = torch.Generator().manual_seed(0)
    return QuantVector({k: 5.0 * t.std().clamp_min(1e-3) * torch.randn(t.shape, generator=g)
                        for k, t in v.tensors.items()}, dict(v.meta))


@pytest.mark.parametrize("rule", ["agree", "agree:top1", "weight"])
def test_choose_lambda_refuses_a_vector_built_to_hurt(rule, ckpts, tmp_path, capsys):
    v = tmp_path / "v.safetensors"
    assert run(capsys, "extract", "--ft", ckpts["ft"], "--qat", ckpts["qat"], "-o", v)[0] == 0
    bad = _hurting_vector(v)
    choice = choose_lambda(ckpts["recv"], bad, QuantSpec(4), rule=rule, probe="noise", probe_size=64)
    assert choice.lam == 0.0, choice.scores
    assert set(next(iter(choice.scores.values()))) == {0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0, 1.05, 1.2, 1.35, 1.5}


def test_choose_donor_scores_every_donor_and_their_mean(ckpts, tmp_path, capsys):
    v = tmp_path / "v.safetensors"
    assert run(capsys, "extract", "--ft", ckpts["ft"], "--qat", ckpts["qat"], "-o", v)[0] == 0
    good, bad = QuantVector.load(v), _hurting_vector(v)
    choice = choose_donor(ckpts["recv"], {"good": good, "bad": bad}, QuantSpec(3), rule="agree", probe="noise",
                          probe_size=32, lambdas=[0.5, 1.0])
    assert set(choice.scores) == {"good", "bad", "mean"} and choice.donor != "bad"
    assert all(set(by) == {0.0, 0.5, 1.0} for by in choice.scores.values())
    best = min((s, d, lam) for d, by in choice.scores.items() for lam, s in by.items())
    assert choice.scores[choice.donor][choice.lam] == best[0]
    with pytest.raises(QvecError, match="donor choice needs at least two vectors"):
        choose_donor(ckpts["recv"], [good], QuantSpec(3), probe="noise")


def test_patch_lam_auto_writes_its_choice_in_the_header(ckpts, tmp_path, capsys):
    v, p = tmp_path / "v.safetensors", tmp_path / "p.safetensors"
    assert run(capsys, "extract", "--ft", ckpts["ft"], "--qat", ckpts["qat"], "-o", v)[0] == 0
    bad = tmp_path / "bad.safetensors"
    _hurting_vector(v).save(bad)
    code, text = run(capsys, "patch", "-r", ckpts["recv"], "-v", bad, "--lam", "auto", "--probe", "noise",
                     "--probe-size", "32", "--bits", "4", "-o", p)
    assert code == 0, text
    assert "chosen: lambda = 0" in text and "no patch" in text
    meta = Checkpoint.load(p).meta
    assert meta["qvec.lambda_rule"] == "agree" and meta["qvec.lambda"] == "0"
    scores = json.loads(meta["qvec.lambda_scores"])
    assert len(scores["vector"]) == 12
    # lambda = 0 is no patch: the output's backbone is the receiver's
    recv = Checkpoint.load(ckpts["recv"])
    assert all(torch.equal(t, recv.state[k]) for k, t in Checkpoint.load(p).state.items())


def test_patch_lam_auto_errors(ckpts, tmp_path, capsys):
    v, p = tmp_path / "v.safetensors", tmp_path / "p.safetensors"
    assert run(capsys, "extract", "--ft", ckpts["ft"], "--qat", ckpts["qat"], "-o", v)[0] == 0
    base = ["patch", "-r", ckpts["recv"], "-v", v, "--lam", "auto", "-o", p]
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, "no images in this probe folder", *base, "--probe", tmp_path / "empty")
    np.savez(tmp_path / "tiny.npz", x=np.zeros((5, 4, 4, 3), np.uint8))
    one_line_error(capsys, "probe images are 4x4", *base, "--probe", tmp_path / "tiny.npz")
    one_line_error(capsys, "donor choice needs at least two vectors", *base, "--probe", "noise", "--donor", "choose")
    one_line_error(capsys, "unknown lambda rule 'nope'", *base, "--probe", "noise", "--rule", "nope")
    one_line_error(capsys, "needs probe images", *base, "--rule", "agree")
    one_line_error(capsys, "--lam must be a number or auto", "patch", "-r", ckpts["recv"], "-v", v, "--lam", "x",
                   "-o", p)
    assert not p.exists()


# ------------------------------------------------------------------------------- a tiny study with rules
@register_rule("toy-half")
def _toy_half(arg):
    """A toy rule registered from a test file: lambda = 0.5 when the noise KL there is below that at 1."""
    return LambdaRule("toy-half", metric="noise.kl", higher_is_better=False, description="toy")


@pytest.fixture(scope="module")
def rules_study(tmp_path_factory):
    """A tiny 3-task study with every rule, the toy rule above, GPTQ and the toy quantizer of toy_quantizer.py
    (registered for this module only)."""
    toy_quantizer.register()
    yield _rules_study(tmp_path_factory)
    toy_quantizer.unregister()


def _rules_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    data = tiny_suite(root)
    for t in THREE[2:]:  # a third task, so the mean of the other donors has two parts
        from qvec.data.synthetic import write_suite

        write_suite(root / "data", tasks=[t], n_train=300, n_test=80, n_pretrain=300)
    text = tiny_config_text(data, name="rules", extra="""
self_pairs = false

[pipelines.rtn]

[pipelines.gptq]
quantizer = "gptq"
calibration = "receiver"
images = 16
lambdas = [1.0]

[pipelines.toyclip]
quantizer = "toyclip"
clip = 0.8
lambdas = [1.0]

[rules]
use = ["agree", "agree:top1", "agree-unlabeled", "agree-noise", "weight", "fixed:0.5", "toy-half"]
probe = "pretrain_synthetic.npz"
probe_size = 32
unlabeled_size = 16
donor_mean = true
probe_domain = ["syn_shapes"]
""").replace(json.dumps(["syn_glyphs", "syn_shapes"]), json.dumps(THREE))
    (root / "rules.toml").write_text(text)
    cfg = load_config(root / "rules.toml")
    # One worker, in this process: the toy rule is registered here (spawned workers would not import this file).
    summary = run_grid(cfg, db=root / "rules.db", artifacts=root / "artifacts",
                       executor=make_executor("local", workers=1))
    return root, cfg, summary


def test_every_rule_is_measured_on_test(rules_study):
    root, cfg, _ = rules_study
    plan = build_plan(cfg, root / "artifacts")
    cells = [j for j in plan.jobs if j.kind == "cells" and j.params["pipeline"] == "rtn"]
    assert len(cells) == 3 * 2 + 3  # 6 transfer pairs and the mean of the others per receiver
    gptq = [j for j in plan.jobs if j.kind == "baseline" and j.params.get("pipeline") == "gptq"]
    assert len(gptq) == 3  # GPTQ alone: one per receiver
    with ResultStore(root / "rules.db") as store:
        rows = store.results("rules")
    for job in cells:
        p = job.params
        mine = [r for r in rows if r.donor == p["donor"] and r.receiver == p["receiver"] and r.pipeline == "rtn"]
        val = {r.lam: r.value for r in mine if r.kind == "patched" and r.split == "val"}
        scores: dict = {}
        for r in mine:
            if r.kind == "score":
                scores.setdefault(f"{r.split}.{r.metric}", {})[r.lam] = r.value
        assert set(scores) == {"probe.kl", "probe.agree", "unlabeled.kl", "unlabeled.agree", "noise.kl",
                               "noise.agree", "weight.err"}
        assert all(set(by) == {0.0, 0.5, 1.0} for by in scores.values())
        tested = {r.lam for r in mine if r.kind == "patched" and r.split == "test"}
        choices = pair_choices(pair_rules(p), val, scores)
        assert set(choices) == {"one", "val", "agree", "agree:top1", "agree-unlabeled", "agree-noise", "weight",
                                "fixed:0.5", "toy-half"}
        assert {lam for lam in choices.values() if lam} <= tested  # every choice but "no patch" is on test


def test_rerun_measures_nothing_and_report_has_every_rule(rules_study, tmp_path):
    root, cfg, _ = rules_study
    again = run_grid(cfg, db=root / "rules.db", artifacts=root / "artifacts",
                     executor=make_executor("local", workers=1))
    assert again.executed == 0 and again.new_rows == 0
    write_report(root / "rules.db", tmp_path)
    md = (tmp_path / "report.md").read_text()
    for name in ("one", "val", "agree", "agree:top1", "agree-unlabeled", "agree-noise", "weight", "fixed:0.5",
                 "toy-half"):
        assert f"| {name} |" in md
    assert "receivers in the probe's domain: syn_shapes" in md and "Choosing the donor" in md
    assert (tmp_path / "rules.png").is_file() and (tmp_path / "rules_w3.csv").is_file()
    assert "Every pipeline at 3-bit" in md and "What to run at 3-bit" in md
    assert "| gptq | agree (all) | receiver inputs |" in md  # GPTQ reads the receiver's unlabeled images
    assert (tmp_path / "pipelines_bpw.png").is_file() and (tmp_path / "views" / "gptq-all" / "report.md").is_file()
    with ResultStore(root / "rules.db") as store:
        data = load_study(store)
    zero = [o for o in data.outcomes if o.lam == 0.0]
    assert all(o.delta == 0.0 for o in zero)  # no patch is FT+PTQ itself
    assert {o.donor for o in data.outcomes} == {*THREE, "mean"}
    assert all(p.donor != "mean" for p in data.pairs)  # the paper's tables keep single donors


def test_a_toy_quantizer_plugs_in_everywhere(rules_study, tmp_path, capsys):
    """The toy quantizer (one config class, one handler, registered from the test suite) runs in the grid, gets
    its own report columns, and works with quantize_, `qvec quantize` and `qvec pack`."""
    root, cfg, _ = rules_study
    plan = build_plan(cfg, root / "artifacts")
    assert [j.id for j in plan.jobs if j.kind == "baseline" and j.params.get("pipeline") == "toyclip"] == [
        f"baseline/toyclip/w3/{t}" for t in THREE]
    with ResultStore(root / "rules.db") as store:
        rows = [r for r in store.results("rules") if r.pipeline == "toyclip"]
    assert {r.kind for r in rows} == {"ft_ptq", "qat_ptq", "patched", "score"}
    assert all(r.quant == "toyclip0.8-w3-sym-channel" for r in rows)  # no calibration set: it needs no data
    assert all(r.bits_per_weight is not None and r.bits_per_weight > 3 for r in rows)
    write_report(root / "rules.db", tmp_path)
    md = (tmp_path / "report.md").read_text()
    for vector in ("–", "λ=1 (all)", "λ* (all)", "agree (all)", "own QAT"):
        assert f"| toyclip | {vector} |" in md
    assert "| toyclip | – | nothing |" in md  # it needs no data
    ckpt = next(j.params["out"] for j in plan.jobs if j.kind == "finetune" and not j.params["qat"])
    out, packed = tmp_path / "c.safetensors", tmp_path / "c.qvec.safetensors"
    assert run(capsys, "quantize", ckpt, "--method", "toyclip", "-o", out)[0] == 0
    assert run(capsys, "pack", ckpt, "--method", "toyclip", "--scale-dtype", "float32", "-o", packed)[0] == 0
    from qvec.quant.pack import load_packed

    q, p = Checkpoint.load(out), load_packed(packed)
    assert json.loads(q.meta["qvec.quant"])["method"] == "toyclip"
    assert all(torch.equal(q.state[k], p.state[k]) for k in q.state)  # the codes are the toy's, stored exactly
    one_line_error(capsys, "--calib is for --method gptq", "quantize", ckpt, "--method", "toyclip", "--calib", "noise",
                   "-o", out)


def test_gptq_in_the_grid(rules_study):
    root, cfg, _ = rules_study
    with ResultStore(root / "rules.db") as store:
        rows = store.results("rules")
    g = [r for r in rows if r.pipeline == "gptq"]
    assert {r.kind for r in g} == {"ft_ptq", "qat_ptq", "patched", "score"}
    assert all("gptq-w3-sym-channel calib=receiver:16" == r.quant for r in g)
    for recv in THREE:  # lambda = 1 for every donor, and the rules' choices (scored with GPTQ itself)
        mine = [r for r in g if r.kind == "patched" and r.split == "test" and r.receiver == recv]
        assert {r.donor for r in mine} == {*(set(THREE) - {recv}), "mean"}
        assert all(r.lam in (0.5, 1.0) for r in mine)


def test_rules_config_errors(tmp_path):
    data = tiny_suite(tmp_path)
    for extra, message in [
        ('[rules]\nuse = ["nope"]', "rules.use: unknown lambda rule 'nope'"),
        ('[rules]\nuse = ["agree"]', "rules.probe is not set"),
        ('[rules]\nuse = ["agree"]\nprobe = "missing.npz"', "rules.probe 'missing.npz': no such file"),
        ('[rules]\nprobe_size = 0', "rules.probe_size must be a positive integer"),
        ('[rules]\ndonor_mean = true', "rules.donor_mean needs at least 3 donors"),
        ('[rules]\nprobe_domain = ["cifar10"]', "rules.probe_domain: 'cifar10' is not one of the grid's tasks"),
        ('[rules]\ncolour = 1', "unknown key rules.colour"),
        ('quantizers = ["gptq"]', "quantizers must include 'rtn'"),
        ('quantizers = ["rtn", "awq"]', "unknown quantizer 'awq'"),
        ('[gptq]\nimages = 4', "gptq.images must be an integer of at least 8"),
        ('[gptq]\ncalibration = "nowhere.npz"', "gptq.calibration 'nowhere.npz': no such file"),
    ]:
        path = tmp_path / "c.toml"
        path.write_text(tiny_config_text(data, extra=extra))
        with pytest.raises(QvecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(path)


# ------------------------------------------------------------------------------ Proposition 1, Fisher metric
def test_proposition_1_predictions_and_spearman():
    from qvec.vectors.fisher import predict, spearman

    g = torch.Generator().manual_seed(0)
    rho_d = {"a": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g)}
    twice = {k: 2 * v for k, v in rho_d.items()}
    p = predict(rho_d, twice)
    assert p.lam == pytest.approx(2.0) and p.cos2 == pytest.approx(1.0)
    h = {k: torch.rand(v.shape, generator=g) for k, v in rho_d.items()}
    assert predict(rho_d, twice, h).lam == pytest.approx(2.0)
    # a metric that sees only tensor "b" predicts from "b" alone
    only_b = {"a": torch.zeros(4, 5), "b": torch.ones(7)}
    r = {"a": torch.randn(4, 5, generator=g), "b": 3 * rho_d["b"]}
    assert predict(rho_d, r, only_b).lam == pytest.approx(3.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # scipy's value, ties averaged
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_diagonal_fisher_matches_per_example_gradients():
    from qvec.vectors.fisher import diagonal_fisher

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x = torch.randn(5, 6)
    f = diagonal_fisher(model, x, ["weight"], seed=3, batch_size=1)
    g = torch.Generator().manual_seed(3)
    want = torch.zeros_like(model.weight)
    for i in range(5):
        logp = torch.log_softmax(model(x[i : i + 1]), -1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=g).squeeze(1)
        (grad,) = torch.autograd.grad(torch.nn.functional.nll_loss(logp, y, reduction="sum"), [model.weight])
        want += grad.pow(2)
    assert torch.allclose(f["weight"], want / 5, atol=1e-6)


def test_theory_command_on_the_tiny_study(rules_study, tmp_path, capsys):
    root, _, _ = rules_study
    code, text = run(capsys, "grid", "theory", root / "rules.toml", "--bits", "3", "--workdir", root,
                     "--db", root / "rules.db", "--artifacts", root / "artifacts", "--examples", "8",
                     "-o", tmp_path)
    assert code == 0, text
    assert "6 pairs at 3-bit" in text and (tmp_path / "theory_w3.csv").is_file()
    one_line_error(capsys, "the study has bits [3], not 2", "grid", "theory", root / "rules.toml", "--bits", "2",
                   "--db", root / "rules.db", "--artifacts", root / "artifacts")


def test_rules_from_plugin_modules(tmp_path, monkeypatch):
    import qvec.core.plugins

    (tmp_path / "my_rules.py").write_text(
        "from qvec import LambdaRule, register_rule\n"
        "@register_rule('plugin-quarter')\n"
        "def _q(arg):\n"
        "    return LambdaRule('plugin-quarter', value=0.25)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("QVEC_PLUGINS", "my_rules")
    monkeypatch.setattr(qvec.core.plugins, "_LOADED", set())
    assert get_rule("plugin-quarter").choose() == 0.25
    monkeypatch.setenv("QVEC_PLUGINS", "no_such_module_here")
    monkeypatch.setattr(qvec.core.plugins, "_LOADED", set())
    with pytest.raises(QvecError, match="QVEC_PLUGINS: cannot import plugin module 'no_such_module_here'"):
        get_rule("still-unknown")

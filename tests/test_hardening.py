"""Bad input never gets a traceback: each case checks the one-line message, exit status 2, and that nothing (no
output, no temporary file) was left behind. Usage errors are checked through the real entry point."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvec.core import atomic
from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.models import ModelSpec, build_model, get_adapter
from qvec.quant import QuantSpec, fake_quantize, find_targets, quantize_
from qvec.quant.pack import pack_checkpoint
from qvec.quant.ptq import quantize_checkpoint
from qvec.vectors.vector import QuantVector

from .cli_helpers import one_line_error, run
from .tinytask import write_task


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- 1. usage errors
@pytest.mark.parametrize("args, message", [
    (["quantize", "x.safetensors", "--bits", "abc", "-o", "y"], "Invalid value for '--bits'"),
    (["quantize", "x.safetensors", "--bits", "2.5", "-o", "y"], "Invalid value for '--bits'"),
    (["quantize", "x.safetensors", "--bitz", "3", "-o", "y"], "No such option: --bitz"),
    (["quantize", "x.safetensors", "--bits", "3"], "Missing option '--output'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_through_the_entry_point(args, message, tmp_path):
    from .hostile_helpers import qvec_env

    r = subprocess.run([sys.executable, "-m", "qvec", *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=qvec_env())  # this checkout's qvec, whatever the working folder
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 6, r.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- 2. NaN/Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("spec", [QuantSpec(bits=3), QuantSpec(bits=3, symmetric=False),
                                  QuantSpec(bits=2, granularity="tensor"), QuantSpec(bits=4, granularity="group",
                                                                                    group_size=4)])
def test_library_refuses_non_finite_weights(bad, spec):
    w = torch.randn(4, 8)
    w[1, 3] = bad
    with pytest.raises(QvecError, match="weight contains (NaN|Inf)"):
        fake_quantize(w, spec)


def _poisoned(ckpts, tmp_path) -> Path:
    ck = Checkpoint.load(ckpts["recv"])
    ck.state["blocks.0.mlp.fc1.weight"][2, 5] = float("nan")
    return ck.save(tmp_path / "nan.safetensors")


def test_quantize_pack_eval_refuse_nan(ckpts, tmp_path, capsys):
    bad = _poisoned(ckpts, tmp_path)
    ck = Checkpoint.load(bad)
    with pytest.raises(QvecError, match=f"{bad}: blocks.0.mlp.fc1.weight: weight contains NaN"):
        quantize_checkpoint(ck, QuantSpec(bits=3))
    with pytest.raises(QvecError, match="blocks.0.mlp.fc1.weight: weight contains NaN"):
        pack_checkpoint(ck, QuantSpec(bits=3), tmp_path / "never.safetensors")
    model = build_model(ck.model_spec)
    model.load_state_dict(ck.state)
    with pytest.raises(QvecError, match="blocks.0.mlp.fc1.weight: weight contains NaN"):
        quantize_(model, QuantSpec(bits=3), find_targets(model, get_adapter(ck.model_spec).head_prefixes))
    out = tmp_path / "out.safetensors"
    one_line_error(capsys, "blocks.0.mlp.fc1.weight: weight contains NaN", "quantize", bad, "--bits", "3", "-o", out)
    one_line_error(capsys, "blocks.0.mlp.fc1.weight: weight contains NaN", "pack", bad, "--bits", "3", "-o", out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_unpack_refuses_nan_scales(ckpts, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    packed = tmp_path / "p.safetensors"
    assert run(capsys, "pack", ckpts["recv"], "--bits", "3", "-o", packed)[0] == 0
    from safetensors import safe_open

    with safe_open(str(packed), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(packed))
    key = next(k for k in tensors if k.endswith(".__qscale"))
    tensors[key][0] = float("nan")
    save_file(tensors, str(packed), metadata=meta)
    out = tmp_path / "u.safetensors"
    one_line_error(capsys, "has NaN or Inf scales", "unpack", packed, "-o", out)
    assert not out.exists()


# --------------------------------------------------------------------------------------- 3. filesystem errors
def test_output_that_is_a_directory(ckpts, tmp_path, capsys):
    d = tmp_path / "adir"
    d.mkdir()
    one_line_error(capsys, f"{d}: is a directory; give a file name", "quantize", ckpts["recv"], "--bits", "3",
                   "-o", d)
    assert list(d.iterdir()) == []


def test_output_under_a_file(ckpts, tmp_path, capsys):
    f = tmp_path / "plain.txt"
    f.write_text("x")
    one_line_error(capsys, f"{f / 'out.safetensors'}: {f} is a file, not a folder", "quantize", ckpts["recv"],
                   "--bits", "3", "-o", f / "out.safetensors")


def test_full_disk_leaves_nothing(ckpts, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    out = tmp_path / "out" / "q.safetensors"
    out.parent.mkdir()
    one_line_error(capsys, f"{out}: cannot write (No space left on device)", "quantize", ckpts["recv"], "--bits",
                   "3", "-o", out)
    assert not out.exists() and leftovers(tmp_path / "out") == []


def test_report_into_a_file_path_is_one_line(tmp_path, capsys, monkeypatch):
    """A study with results, reported into a folder under a plain file: one line naming that path."""
    from types import SimpleNamespace

    from qvec.grid import report
    from qvec.grid.store import ResultStore

    db = tmp_path / "r.db"
    ResultStore(db).close()
    monkeypatch.setattr(report, "load_study", lambda store, study: SimpleNamespace(bits=[3], study="s"))
    target = tmp_path / "plain.txt"
    target.write_text("x")
    code, text = run(capsys, "report", db, "-o", target / "sub")
    assert code == 2 and len(text.splitlines()) == 1 and str(target) in text and "Traceback" not in text, text


# ------------------------------------------------------------------------------------------ 4. extract roles
def test_extract_checks_the_headers(ckpts, tmp_path, capsys):
    v = tmp_path / "v.safetensors"
    one_line_error(capsys, "swapped?", "extract", "--ft", ckpts["qat"], "--qat", ckpts["ft"], "-o", v)
    one_line_error(capsys, "given as both the FT and the QAT checkpoint", "extract", "--ft", ckpts["ft"], "--qat",
                   ckpts["ft"], "-o", v)
    other = Checkpoint.load(ckpts["qat"])
    other.meta["qvec.task"] = "elsewhere"
    other_path = other.save(tmp_path / "other-qat.safetensors")
    one_line_error(capsys, "the FT checkpoint is of task 'donor' and the QAT one of 'elsewhere'", "extract",
                   "--ft", ckpts["ft"], "--qat", other_path, "-o", v)
    twin = Checkpoint.load(ckpts["ft"])
    twin.meta["qvec.kind"] = "qat"
    twin_path = twin.save(tmp_path / "twin.safetensors")
    one_line_error(capsys, "hold the same backbone weights", "extract", "--ft", ckpts["ft"], "--qat", twin_path,
                   "-o", v)
    assert not v.exists()
    code, _ = run(capsys, "extract", "--ft", ckpts["qat"], "--qat", ckpts["ft"], "--ignore-headers", "-o", v)
    assert code == 0 and v.exists()


# ---------------------------------------------------------------------------------- 5., 6. temp files, modes
def test_killed_write_leftovers_are_removed_and_no_foreign_temp_is_made(ckpts, tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    out = tmp_path / "m.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".{out.name}.{atomic._host()}.{dead.pid}.tmp"
    stale.write_bytes(b"x" * 1000)
    old_format = tmp_path / f".{out.name}.abc123.tmp"  # mkstemp's names from earlier versions
    old_format.write_bytes(b"")
    os.utime(old_format, (1, 1))
    Checkpoint.load(ckpts["recv"]).save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_artifacts_get_the_usual_permissions(ckpts, tmp_path):
    old = os.umask(0o022)
    try:
        out = Checkpoint.load(ckpts["recv"]).save(tmp_path / "m.safetensors")
        report = tmp_path / "r.txt"
        atomic.write_text_atomic(report, "hi")
    finally:
        os.umask(old)
    for p in (out, report):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, oct(p.stat().st_mode)


# -------------------------------------------------------------------------------------------- 7. grid configs
@pytest.mark.parametrize("extra, message", [
    ('[recipe]\nepochs = "two"', "recipe.epochs must be an integer, got 'two'"),
    ("[recipe]\nlr = -1.0", "recipe: bad recipe: lr must be positive"),
    ('model_options = { depthh = 3 }', "model_options: qvec:vit-nano: unknown model option 'depthh' (did you mean "
                                       "'depth'?)"),
    ("img_size = 30", "input size 30 px is not a multiple of the patch size 4"),
])
def test_grid_config_errors_before_any_work(extra, message, tmp_path, capsys):
    data = tmp_path / "data"
    write_task(data)
    from .tinytask import write_jpeg_corpus

    write_jpeg_corpus(data / "pre.npz")
    cfg = tmp_path / "g.toml"
    top, tables = ("", extra) if extra.startswith("[") else (extra, "")
    cfg.write_text(f'model = "qvec:vit-nano"\ntasks = ["stripes"]\ndata_dir = "{data}"\n{top}\n'
                   f'[pretrain]\ndata = "{data / "pre.npz"}"\n{tables}\n')
    work = tmp_path / "work"
    text = one_line_error(capsys, message, "grid", "run", cfg, "--workdir", work)
    assert str(cfg) in text and not work.exists()


def test_unknown_builtin_model_fails_before_work(tmp_path, capsys):
    cfg = tmp_path / "g.toml"
    cfg.write_text('model = "qvec:vit-huge"\ntasks = ["stripes"]\nbackbone = "hub"\n')
    work = tmp_path / "work"
    one_line_error(capsys, "unknown built-in model 'vit-huge'", "grid", "run", cfg, "--workdir", work)
    assert not work.exists()


# --------------------------------------------------------------------------------------- 8. the smaller ones
def test_huge_lambda(ckpts, tmp_path, capsys):
    v, p = tmp_path / "v.safetensors", tmp_path / "p.safetensors"
    assert run(capsys, "extract", "--ft", ckpts["ft"], "--qat", ckpts["qat"], "-o", v)[0] == 0
    one_line_error(capsys, "lambda must be finite and within float32 range, got 1e+300", "patch", "-r", ckpts["recv"],
                   "-v", v, "--lam", "1e300", "-o", p)
    assert not p.exists()
    big = QuantVector({k: torch.full_like(t, 10.0) for k, t in QuantVector.load(v).tensors.items()},
                      QuantVector.load(v).meta)
    with pytest.raises(QvecError, match="lambda 1e\\+38 overflows tensor"):
        big.apply(Checkpoint.load(ckpts["recv"]), 1e38)


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_eval_limit_must_be_positive(limit, ckpts, tmp_path, capsys):
    data = tmp_path / "data"
    write_task(data)
    ck = Checkpoint.load(ckpts["recv"])
    spec = ModelSpec("qvec", "vit-nano", 4)
    torch.manual_seed(0)
    from qvec.models import checkpoint_from_model

    path = checkpoint_from_model(build_model(spec), spec, **{"qvec.task": "stripes"}).save(tmp_path / "s.safetensors")
    del ck
    one_line_error(capsys, f"--limit must be at least 1, got {limit}", "eval", "-m", path, "-t",
                   "stripes", "-d", data, "--limit", limit)


def test_patch_refuses_a_receiver_with_extra_keys(ckpts, tmp_path, capsys):
    v, p = tmp_path / "v.safetensors", tmp_path / "p.safetensors"
    assert run(capsys, "extract", "--ft", ckpts["ft"], "--qat", ckpts["qat"], "-o", v)[0] == 0
    recv = Checkpoint.load(ckpts["recv"])
    recv.state["blocks.9.extra.weight"] = torch.zeros(3)
    path = recv.save(tmp_path / "extra.safetensors")
    one_line_error(capsys, "unexpected key 'blocks.9.extra.weight'", "patch", "-r", path, "-v", v, "-o", p)
    assert not p.exists()


def test_report_on_an_empty_file_leaves_it_alone(tmp_path, capsys):
    db = tmp_path / "empty.db"
    db.write_bytes(b"")
    one_line_error(capsys, f"{db}: empty file, not a results database", "report", db, "-o", tmp_path / "rep")
    assert db.stat().st_size == 0 and not (tmp_path / "rep").exists()


def test_inspect_a_directory(tmp_path, capsys):
    one_line_error(capsys, f"{tmp_path}: is a directory, not a file", "inspect", tmp_path)


def test_malformed_model_header_names_the_file(ckpts, tmp_path, capsys):
    ck = Checkpoint.load(ckpts["recv"])
    ck.meta["qvec.model"] = "{not json"
    path = ck.save(tmp_path / "bad.safetensors")
    one_line_error(capsys, f"{path}: malformed model spec in checkpoint metadata", "quantize", path, "--bits", "3",
                   "-o", tmp_path / "o.safetensors")


def test_pickle_refusal_does_not_advise_unsafe_loading(tmp_path, capsys):
    path = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(2), "obj": Path("x")}, path)
    text = one_line_error(capsys, "holds pickled Python objects beyond tensors", "inspect", path)
    assert "weights_only" not in text


def test_error_text_with_brackets_is_printed_as_is(tmp_path, capsys):
    """Messages are not rich markup: '[pretrain]' must reach the user."""
    one_line_error(capsys, "add a [pretrain] section", "grid", "plan", "--model", "qvec:vit-nano", "--tasks",
                   "stripes", "--workdir", tmp_path)


def test_commands_that_write_folders_fail_in_one_line(tmp_path, capsys):
    """grid export into a directory, demo and grid run with a workdir under a plain file."""
    from qvec.grid.store import ResultStore

    db = tmp_path / "r.db"
    ResultStore(db).close()
    d = tmp_path / "adir"
    d.mkdir()
    one_line_error(capsys, f"{d}: is a directory; give a file name", "grid", "export", db, "--csv", d)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    code, text = run(capsys, "demo", "--workdir", plain / "w", "--quiet")
    assert code == 2 and len(text.splitlines()) == 1 and str(plain) in text and "Traceback" not in text, text
    data = tmp_path / "data"
    write_task(data)
    code, text = run(capsys, "grid", "run", "--model", "qvec:vit-nano", "--tasks", "stripes", "--data", data,
                     "--backbone", str(db), "--workdir", plain / "w", "--quiet")
    assert code == 2 and len(text.splitlines()) == 1 and str(plain) in text and "Traceback" not in text, text


def test_writes_are_byte_for_byte_reproducible(ckpts, tmp_path):
    """The same content gives the same file, whatever order the header metadata came in (crash checks compare
    bytes)."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ck = Checkpoint.load(ckpts["recv"])
    pack_checkpoint(ck, QuantSpec(bits=3), a)
    ck.meta = dict(reversed(list(ck.meta.items())))
    pack_checkpoint(ck, QuantSpec(bits=3), b)
    assert a.read_bytes() == b.read_bytes()

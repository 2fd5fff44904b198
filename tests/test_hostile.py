"""Hostile inputs of issue 21, through the real entry point (``python -m qvec`` in a subprocess): each refusal is the
exact one-line message, exit status 2, and no input, device node or FIFO changed and no file or temporary file left.
Each item's cases cover its class (every writing command, several options, several file kinds), not one example.
The two grid runners on one study are in tests/test_study_lock.py."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qvec import __version__
from qvec.core.checkpoint import Checkpoint
from qvec.core.limits import human_bytes
from qvec.models import ModelSpec, build_model, checkpoint_from_model, get_adapter
from qvec.models.guard import SLACK_ELEMENTS
from qvec.quant import QuantSpec
from qvec.quant.pack import pack_checkpoint
from qvec.vectors.vector import QuantVector

from .hostile_helpers import MEMORY, qvec_env, qvec_run, refused
from .test_report import build_db
from .tinytask import write_task

AVAILABLE = human_bytes(4 * 2**30)
assert MEMORY == "4G"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs every case reads (and must leave untouched): checkpoints, a vector, a packed file, a task folder, a
    results database, lying headers, pickled and bomb data files, a grid config."""
    w = tmp_path_factory.mktemp("world")
    spec = ModelSpec("qvec", "vit-nano", 4)
    fp = {"qvec.backbone_fingerprint": "abc123", "qvec.task": "stripes"}
    torch.manual_seed(0)
    ft = checkpoint_from_model(build_model(spec), spec, **fp, **{"qvec.kind": "ft"})
    ft.save(w / "base.safetensors")
    qat = Checkpoint(dict(ft.state), {**ft.meta, "qvec.kind": "qat"})
    qat.state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ft.state.items()}
    qat.save(w / "qat.safetensors")
    QuantVector.from_checkpoints(ft, qat).save(w / "v.safetensors")
    pack_checkpoint(ft, QuantSpec(bits=3), w / "packed.safetensors")
    write_task(w / "data")
    build_db(w / "hand.db")
    model = json.loads(ft.meta["qvec.model"])
    for name, opts in {"huge": {"depth": 1_000_000_000}, "deep": {"depth": 400}, "unknown": {"depthh": 3},
                       "heads": {"embed_dim": 100}}.items():
        lying = Checkpoint(dict(ft.state), {**ft.meta, "qvec.model": json.dumps({**model, "options": opts})})
        lying.save(w / f"{name}.safetensors")
    _lying_packed(w)
    np.savez(w / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    arrays = dict(np.load(w / "data" / "stripes.npz"))
    (w / "objdata").mkdir()
    np.savez(w / "objdata" / "stripes.npz", **{**arrays, "classes": np.array(list(arrays["classes"]), dtype=object)})
    _bombs(w)
    (w / "cfg.toml").write_text('model = "qvec:vit-nano"\ntasks = ["stripes"]\n\n[pretrain]\n'
                                'data = "pretrain_cifar10.npz"\n')
    (w / "plain.txt").write_text("not a folder")
    return w


PACKED_LIES = {"negative": lambda i, k: i["shapes"].__setitem__(k, [-1, 96]),
               "text": lambda i, k: i["shapes"].__setitem__(k, "abc"),
               "huge": lambda i, k: i["shapes"].__setitem__(k, [10**12, 10**12]),
               "list": lambda i, k: i.__setitem__("shapes", [1, 2])}


def _lying_packed(w: Path) -> None:
    """Packed files whose header (the shapes unpacking allocates) lies."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(w / "packed.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(w / "packed.safetensors"))
    for name, lie in PACKED_LIES.items():
        info = json.loads(meta["qvec.packed"])
        lie(info, "blocks.0.attn.proj.weight")
        save_file(tensors, str(w / f"packed-{name}.safetensors"), metadata={**meta, "qvec.packed": json.dumps(info)})


def _bombs(w: Path) -> None:
    """A real 12000 x 12000 PNG of 18 KB (144 megapixels), and a PNG whose header claims 100000 x 100000."""
    import struct
    import zlib

    from PIL import Image

    (w / "bigpng").mkdir()
    Image.new("1", (12000, 12000)).save(w / "bigpng" / "big.png")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    (w / "bomb").mkdir()
    (w / "bomb" / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _values(path: Path) -> int:
    return sum(t.numel() for t in Checkpoint.load(path).state.values())


# --------------------------------------------------------------------------- 1. writing over what is not ours
def _targets(t: Path) -> dict[str, Path]:
    """Things an output path must never replace: a FIFO, a device node (root only), a link to /dev/null."""
    os.mkfifo(t / "fifo")
    (t / "null-link").symlink_to("/dev/null")
    out = {"fifo": t / "fifo", "link": t / "null-link"}
    if os.geteuid() == 0:
        os.mknod(t / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        out["device"] = t / "null"
    return out


NOT_REGULAR = "not a regular file; qvec writes only regular files or new paths"
OUTPUT_CASES = {  # command -> (arguments before the output, the output flag)
    "quantize": (lambda w: ["quantize", w / "base.safetensors", "--bits", "3"], "-o"),
    "pack": (lambda w: ["pack", w / "base.safetensors", "--bits", "3"], "-o"),
    "unpack": (lambda w: ["unpack", w / "packed.safetensors"], "-o"),
    "patch": (lambda w: ["patch", "-r", w / "base.safetensors", "-v", w / "v.safetensors", "--lam", "1"], "-o"),
    "extract": (lambda w: ["extract", "--ft", w / "base.safetensors", "--qat", w / "qat.safetensors"], "-o"),
    "grid export": (lambda w: ["grid", "export", w / "hand.db"], "--csv"),
}
SAME_INPUT = {"quantize": "base.safetensors", "pack": "base.safetensors", "unpack": "packed.safetensors",
              "patch": "base.safetensors", "extract": "qat.safetensors", "grid export": "hand.db"}


@pytest.mark.parametrize("command", list(OUTPUT_CASES))
def test_1_outputs_never_replace_what_is_not_ours(command, world, tmp_path):
    """Every writing command refuses a FIFO, a device node, a link to one, its own input (also through a hard
    link) and an output folder that does not exist; nothing anywhere changes."""
    args, flag = OUTPUT_CASES[command]
    targets = _targets(tmp_path)
    kinds = {"fifo": "a named pipe (FIFO)", "link": "a character device", "device": "a character device"}
    for name, target in targets.items():
        refused(f"{target}: is {kinds[name]}, {NOT_REGULAR}", *args(world), flag, target, cwd=tmp_path,
                roots=(world, tmp_path))
    inp = world / SAME_INPUT[command]
    refused(f"{inp}: is the same file as the input {inp}; write the output to another path", *args(world), flag, inp,
            cwd=tmp_path, roots=(world, tmp_path))
    hard = tmp_path / "hard-link"
    os.link(inp, hard)
    refused(f"{hard}: is the same file as the input {inp}; write the output to another path", *args(world), flag,
            hard, cwd=tmp_path, roots=(world, tmp_path))
    typo = tmp_path / "typo" / "deeper" / "out.file"
    refused(f"{typo}: folder {typo.parent} does not exist; create it first (qvec creates no folders for an output "
            "file, so a typo cannot grow a tree)", *args(world), flag, typo, cwd=tmp_path, roots=(world, tmp_path))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_1_new_folders_are_said_in_one_line(world, tmp_path):
    """A folder a command creates for its outputs (a report here) is said in one line, once, with its parents."""
    out = tmp_path / "a" / "b" / "report"
    r = qvec_run("report", world / "hand.db", "-o", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"creating folder {out} (and 2 folders above it, from {tmp_path / 'a'})\n"
    assert (out / "report.md").is_file()


# ------------------------------------------------------------------------- 2. headers that drive allocation
def test_2_headers_are_checked_against_the_file_before_anything_is_built(world, tmp_path):
    n = _values(world / "base.safetensors")
    known = ", ".join(sorted(get_adapter("qvec").option_names(ModelSpec("qvec", "vit-nano"))))
    cases = {
        "huge": f"model option depth = 1,000,000,000 is larger than any size a model of {n:,} values can have",
        "deep": f"a qvec:vit-nano model with options {{'depth': 400}} would hold more than "
                f"{2 * n + SLACK_ELEMENTS:,} values (its file holds {n:,} values)",
        "unknown": f"qvec:vit-nano: unknown model option 'depthh' (did you mean 'depth'?); qvec models take {known}",
        "heads": "qvec:vit-nano: width embed_dim = 100 is not divisible by num_heads = 3 (each head takes embed_dim "
                 "/ num_heads channels)",
    }
    for name, message in cases.items():
        path = world / f"{name}.safetensors"
        refused(f"{path}: {message}", "eval", "-m", path, "-t", "stripes", "-d", world / "data", cwd=tmp_path,
                roots=(world, tmp_path))
    path = world / "deep.safetensors"
    refused(f"{path}: {cases['deep']}", "quantize", path, "--bits", "3", "-o", tmp_path / "q.safetensors",
            cwd=tmp_path, roots=(world, tmp_path))
    malformed = "packed checkpoint header is malformed"
    shape = "shape of 'blocks.0.attn.proj.weight' must be a list of whole numbers >= 0, got"
    packed = {"negative": f"{malformed} ({shape} [-1, 96])", "text": f"{malformed} ({shape} 'abc')",
              "huge": f"packed stream holds 27648 bits, {3 * 10**24} needed for {10**24} codes",
              "list": f"{malformed} (shapes and dtypes must be mappings)"}
    for name, message in packed.items():
        path = world / f"packed-{name}.safetensors"
        refused(f"{path}: {message}", "unpack", path, "-o", tmp_path / "u.safetensors", cwd=tmp_path,
                roots=(world, tmp_path))


# ------------------------------------------------------------------------------------- 3. sizes without bounds
def test_3_every_size_is_checked_for_range_and_memory(world, tmp_path):
    base, data = world / "base.safetensors", world / "data"
    out = tmp_path / "o.safetensors"
    huge = 10**13
    refused(f"a noise probe of {huge:,} images of 3x32x32 would need {human_bytes(huge * 3 * 32 * 32)} of memory, "
            f"more than the {AVAILABLE} available ($QVEC_MEMORY_LIMIT overrides that figure); ask for fewer images "
            "(--probe-size)", "patch", "-r", base, "-v", world / "v.safetensors", "--lam", "auto", "--probe", "noise",
            "--probe-size", huge, "-o", out, cwd=tmp_path, roots=(world, tmp_path))
    refused(f"--calib-size {10**11:,}: calibration images of 3x32x32 floats would need "
            f"{human_bytes(4 * 10**11 * 3 * 32 * 32)} of memory, more than the {AVAILABLE} available "
            "($QVEC_MEMORY_LIMIT overrides that figure); ask for fewer (--calib-size)", "quantize", base, "--bits", "3",
            "--method", "gptq", "--calib", "noise", "--calib-size", 10**11, "-o", out, cwd=tmp_path,
            roots=(world, tmp_path))
    for bad in ("0", "-1"):
        refused(f"--batch-size must be at least 1, got {bad}", "eval", "-m", base, "-t", "stripes", "-d", data,
                "--batch-size", bad, cwd=tmp_path, roots=(world, tmp_path))
    refused("--limit must be at least 0 (0 lists every tensor), got -1", "inspect", base, "--limit", "-1",
            cwd=tmp_path, roots=(world, tmp_path))
    most = 4 * (os.cpu_count() or 1)
    refused(f"--workers must be at most {most:,}, got 100,000", "grid", "run", "--model", "qvec:vit-nano", "--tasks",
            "stripes", "--data", data, "--workers", "100000", "--workdir", tmp_path / "w", cwd=tmp_path,
            roots=(world, tmp_path))


# ------------------------------------------------------------------------------------------------ 4. data files
def test_4_pickles_and_image_bombs_are_refused_by_every_reader(world, tmp_path):
    base, out = world / "base.safetensors", tmp_path / "o.safetensors"
    pickle = ("holds Python objects (dtype object, a pickle); qvec loads only plain numeric arrays and never "
              "unpickles (save it with a numeric or string dtype)")
    patch = ["patch", "-r", base, "-v", world / "v.safetensors", "--lam", "auto", "-o", out, "--probe"]
    refused(f"{world / 'obj.npz'}: array 'x' {pickle}", *patch, world / "obj.npz", cwd=tmp_path,
            roots=(world, tmp_path))
    refused(f"{world / 'obj.npz'}: array 'x' {pickle}", "quantize", base, "--bits", "3", "--method", "gptq",
            "--calib", world / "obj.npz", "-o", out, cwd=tmp_path, roots=(world, tmp_path))
    task = world / "objdata" / "stripes.npz"
    refused(f"{task}: array 'classes' {pickle}", "eval", "-m", base, "-t", "stripes", "-d", world / "objdata",
            cwd=tmp_path, roots=(world, tmp_path))
    refused(f"{task}: array 'classes' {pickle}", "finetune", "-t", "stripes", "-d", world / "objdata", "-m",
            "vit-nano", "-o", out, cwd=tmp_path, roots=(world, tmp_path))
    for folder, name, (w, h) in (("bigpng", "big.png", (12000, 12000)), ("bomb", "bomb.png", (100_000, 100_000))):
        img = world / folder / name
        refused(f"{img}: image of {w}x{h} = {w * h:,} pixels is over the limit of 50,000,000 (a decompression "
                f"bomb?); raise it with QVEC_MAX_IMAGE_PIXELS={w * h} if the image is genuine", *patch,
                world / folder, cwd=tmp_path, roots=(world, tmp_path))


# ------------------------------------------------------------------------------------ 6. messages that mislead
def test_6_messages_name_the_real_problem(world, tmp_path):
    roots = (world, tmp_path)
    nowhere = tmp_path / "nowhere"
    refused(f"{nowhere}: data folder does not exist (set --data to the folder of task .npz files)", "grid", "plan",
            world / "cfg.toml", "--data", nowhere, cwd=tmp_path, roots=roots)
    plain = world / "plain.txt"
    refused(f"{plain}: is a file, not a data folder (set $QVEC_DATA to the folder of task .npz files)", "tasks",
            cwd=tmp_path, roots=roots, env=qvec_env(QVEC_DATA=str(plain)))
    refused(f"{world}: is a folder; give a config file (.toml, .yaml or .yml)", "grid", "plan", world, cwd=tmp_path,
            roots=roots)
    base, out = world / "base.safetensors", tmp_path / "o.safetensors"
    refused("GPTQ needs at least 8 calibration images, got 0 (--calib-size)", "quantize", base, "--bits", "3",
            "--method", "gptq", "--calib", "noise", "--calib-size", "0", "-o", out, cwd=tmp_path, roots=roots)
    refused(f"{base}: group_size 128 does not divide the input dimension 96 of blocks.0.attn.qkv.weight (288, 96) "
            "(and 11 other weights); try --group-size 32 or 16 or 24 (they divide every target)", "quantize", base,
            "--bits", "3", "-g", "group", "-o", out, cwd=tmp_path, roots=roots)
    refused(f"{plain}: is a file, not a folder; the report is a folder of tables and figures (give a new or existing "
            "folder with -o)", "report", world / "hand.db", "-o", plain, cwd=tmp_path, roots=roots)
    refused("$QVEC_PLUGINS: cannot import plugin module 'no_such_qvec_plugin' (ModuleNotFoundError: No module named "
            "'no_such_qvec_plugin')", "inspect", base, cwd=tmp_path, roots=roots,
            env=qvec_env(QVEC_PLUGINS="no_such_qvec_plugin"))


# ------------------------------------------------------------------------------------- 7. a newcomer's friction
def test_7_version_and_help_without_torch(tmp_path):
    r = qvec_run("--version", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"qvec {__version__}\n", "")
    code = ("import sys; from qvec.cli import main; main(['--help']); "
            "print('HEAVY', sorted(m for m in ('torch', 'timm', 'transformers', 'open_clip') if m in sys.modules))")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=qvec_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "HEAVY []", r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


def test_7_piped_output_is_not_wrapped(world, tmp_path):
    folder = tmp_path / ("a-long-folder-name-" * 5)
    folder.mkdir()
    out = folder / ("a-long-file-name-" * 5 + ".safetensors")
    r = qvec_run("quantize", world / "base.safetensors", "--bits", "3", "-o", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert any(str(out) in line for line in r.stdout.splitlines()), r.stdout


@pytest.fixture(scope="module")
def finetuned(world, tmp_path_factory):
    """``qvec finetune --init ABSOLUTE_PATH`` with stderr to a pipe and a line per step."""
    t = tmp_path_factory.mktemp("ft")
    out = t / "ft.safetensors"
    r = qvec_run("finetune", "-t", "stripes", "-d", world / "data", "-m", "vit-nano", "--init",
                 world / "base.safetensors", "--epochs", "1", "--batch-size", "16", "--train-limit", "48", "-o", out,
                 cwd=t, env=qvec_env(QVEC_PROGRESS_SECONDS="0"))
    assert r.returncode == 0, r.stderr
    return out, r


def test_7_progress_lines_when_not_a_terminal(finetuned):
    _, r = finetuned
    steps = [line for line in r.stderr.splitlines() if line.startswith("ft vit-nano stripes: step ")]
    assert [re.match(r"ft vit-nano stripes: step (\d+)/3 \(\d+%\)", s).group(1) for s in steps] == ["1", "2", "3"]
    assert "img/s" in steps[-1] and "elapsed" in steps[-1]


def test_7_checkpoint_headers_hold_no_local_paths(finetuned, world):
    out, _ = finetuned
    meta = Checkpoint.load(out).meta
    assert meta["qvec.init"] == "base.safetensors"
    leaks = {k: v for k, v in meta.items() if str(world) in v or str(out.parent) in v or "/tmp" in v}
    assert not leaks, leaks


def test_7_rules_tables_name_a_noise_probe(world):
    from qvec.grid.report_rules import RuleOutcome, donor_table, rules_tables
    from qvec.vectors.rules import get_rule

    rules = [get_rule("one"), get_rule("val"), get_rule("agree")]
    outs = [RuleOutcome(r.name, 3, d, rc, 1.0, 60.0, 50.0, 80.0, 0.1) for r in rules
            for d in ("a", "b") for rc in ("a", "b") if d != rc]
    for probe, label in (("noise", "nothing (noise probe)"), ("images.npz", "generic images")):
        table = rules_tables(outs, rules, 3, probe=probe)[0]
        assert [row[1] for row in table.rows if row[0] == "agree"] == [label]
        assert [row[1] for row in donor_table(outs, rules, 3, probe=probe).rows if row[0] == "agree"] == [label]


def test_7_radar_has_no_unlabelled_shape(tmp_path, monkeypatch):
    """Every line, patch or collection drawn on the radar's axes is named in its legend."""
    from qvec.grid import report_figures
    from qvec.grid.report_data import load_study
    from qvec.grid.store import ResultStore

    figures = []
    real_save = report_figures.save_figure
    monkeypatch.setattr(report_figures, "save_figure", lambda fig, out, name: figures.append(fig) or
                        real_save(fig, out, name))
    with ResultStore(build_db(tmp_path / "hand.db")) as store:
        data = load_study(store)
    assert report_figures.radar_figure(data, tmp_path)
    (fig,) = figures
    named = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    for ax in fig.axes:
        for artist in [*ax.lines, *ax.patches, *ax.collections]:
            assert artist.get_label() in named, f"unlabelled {type(artist).__name__} {artist.get_label()!r}"

"""The header schema (qvec.schema): every save stamps it, older files load unchanged, newer or incomplete ones are
refused in one line, fingerprints do not depend on it, and no module spells a header key outside qvec.schema."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qvec.core import schema
from qvec.core.checkpoint import (
    Checkpoint,
    fingerprint_tensors,
    read_safetensors,
    save_safetensors,
    write_safetensors_stream,
)
from qvec.core.errors import QvecError
from qvec.core.inspect import describe
from qvec.core.schema import META_FORMAT, META_SCHEMA, SCHEMA_VERSION, check_header, upgrade_header
from qvec.models import get_adapter
from qvec.models.zeroshot import TextTower, build_head, head_cache_path, load_head
from qvec.quant import QuantSpec
from qvec.quant.pack import load_packed, pack_checkpoint
from qvec.vectors.selection import LambdaChoice
from qvec.vectors.vector import QuantVector

from .conftest import make_ckpt

SRC = Path(__file__).resolve().parents[1] / "src" / "qvec"
CLASSES, TEMPLATES = ["cat", "dog"], ["a {}.", "the {}."]


class _Tower(TextTower):
    """A text tower whose embedding of a prompt is a fixed function of its length (enough to build a head)."""

    def __init__(self) -> None:
        torch.manual_seed(0)  # every instance has the same weights, so the same cache entry
        self.proj = nn.Linear(1, 3)

    def modules(self):
        return [self.proj]

    def encode(self, texts, device):
        return self.proj(torch.tensor([[float(len(t))] for t in texts], device=device))

    def state(self):
        return dict(self.proj.state_dict())

    @property
    def logit_scale(self) -> float:
        return 2.0


@pytest.fixture
def files(tmp_path, nano_spec, monkeypatch):
    """One file of each format qvec writes, saved by this qvec: {kind: (path, loader)}."""
    monkeypatch.setenv("QVEC_HEAD_CACHE", str(tmp_path / "heads"))
    fp = {"qvec.backbone_fingerprint": "abc123"}
    ft = make_ckpt(nano_spec, 0, **{"qvec.task": "donor", "qvec.kind": "ft"}, **fp)
    qat = make_ckpt(nano_spec, 1, **{"qvec.task": "donor", "qvec.kind": "qat"}, **fp)
    out = {"checkpoint": (ft.save(tmp_path / "ft.safetensors"), Checkpoint.load)}
    out["vector"] = (QuantVector.from_checkpoints(ft, qat).save(tmp_path / "v.safetensors"), QuantVector.load)
    pack_checkpoint(ft, QuantSpec(3), tmp_path / "p.safetensors")
    out["packed"] = (tmp_path / "p.safetensors", load_packed)
    tower = _Tower()
    build_head(tower, CLASSES, TEMPLATES, task="pets", device="cpu")
    out["zeroshot-head"] = (head_cache_path(tower, CLASSES, TEMPLATES, "pets", tmp_path / "heads"), load_head)
    return out


def _rewrite_header(path: Path, edit) -> dict[str, str]:
    """Rewrite ``path`` with ``edit(meta)`` applied to its header, bypassing save's stamping (how an older or a
    newer qvec, or a damaged file, would look); returns the header written."""
    tensors, meta = read_safetensors(path)
    edit(meta)
    _write_raw(path, tensors, meta)
    return meta


def _write_raw(path: Path, tensors, meta: dict[str, str]) -> None:
    """A safetensors file with exactly this header (no stamping), renamed into place: tensors loaded from the old
    file stay valid (they are memory-mapped)."""
    tmp = path.with_name(path.name + ".raw")
    with open(tmp, "wb") as f:
        write_safetensors_stream(f, tensors, meta)
    tmp.replace(path)


def _raw_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


FORMAT_NAMES = ["checkpoint", "vector", "packed", "zeroshot-head"]


def test_every_save_writes_the_schema(files):
    for kind, (path, _) in files.items():
        meta = _raw_header(path)
        assert meta[META_SCHEMA] == str(SCHEMA_VERSION) and meta[META_FORMAT] == kind, kind
        assert all(k in meta for k in schema.FORMATS[kind].required), kind


def test_saved_keys_are_the_formats_keys(files):
    """What a save writes is exactly what the format description documents (no undocumented key)."""
    for kind, (path, _) in files.items():
        assert set(_raw_header(path)) <= set(schema.FORMATS[kind].keys), kind


@pytest.mark.parametrize("kind", FORMAT_NAMES)
def test_old_header_without_schema_loads_unchanged(files, kind):
    """The same file without ``qvec.schema`` (as qvec wrote it before the key existed) loads to the same tensors
    and header; the file itself is not rewritten."""
    path, load = files[kind]
    new = load(path)
    _rewrite_header(path, lambda m: m.pop(META_SCHEMA))
    before = path.read_bytes()
    old = load(path)
    assert path.read_bytes() == before and describe(path).schema == 0
    if kind == "zeroshot-head":
        (a, new_meta), (b, old_meta) = ({"weight": new[0]}, new[1]), ({"weight": old[0]}, old[1])
    else:
        new_meta, old_meta = new.meta, old.meta
        a, b = (new.tensors, old.tensors) if kind == "vector" else (new.state, old.state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert old_meta == new_meta and old_meta[META_SCHEMA] == str(SCHEMA_VERSION)  # upgraded in memory


def test_old_zeroshot_head_is_reused_from_the_cache(files, tmp_path):
    path, _ = files["zeroshot-head"]
    tensors, meta = read_safetensors(path)
    weight = tensors["weight"]
    del meta[META_SCHEMA]
    _write_raw(path, {"weight": weight * 3}, meta)  # an old entry: build_head must return it, not recompute
    got = build_head(_Tower(), CLASSES, TEMPLATES, task="pets", cache_dir=tmp_path / "heads", device="cpu")
    torch.testing.assert_close(got, weight * 3)


@pytest.mark.parametrize("kind", FORMAT_NAMES)
def test_newer_schema_is_refused_in_one_line(files, kind):
    path, load = files[kind]
    _rewrite_header(path, lambda m: m.update({META_SCHEMA: str(SCHEMA_VERSION + 1)}))
    with pytest.raises(QvecError) as e:
        load(path)
    text = _one_line(e)
    assert str(path) in text and f"schema {SCHEMA_VERSION + 1}" in text and f"({SCHEMA_VERSION})" in text
    assert describe(path).schema == SCHEMA_VERSION + 1  # inspect still shows the file as it is


def test_newer_zeroshot_head_in_the_cache_is_recomputed(files, tmp_path):
    path, _ = files["zeroshot-head"]
    good, _ = load_head(path)
    tensors, meta = read_safetensors(path)
    meta[META_SCHEMA] = str(SCHEMA_VERSION + 1)
    _write_raw(path, {"weight": tensors["weight"] * 3}, meta)
    with pytest.warns(UserWarning, match=f"schema {SCHEMA_VERSION + 1} is newer"):
        got = build_head(_Tower(), CLASSES, TEMPLATES, task="pets", cache_dir=tmp_path / "heads", device="cpu")
    torch.testing.assert_close(got, good)  # not the 3x entry of the newer file


@pytest.mark.parametrize("kind,key", [("checkpoint", "qvec.version"), ("vector", "qvec.num_params"),
                                      ("packed", "qvec.packed"), ("packed", "qvec.model"),
                                      ("zeroshot-head", "qvec.templates")])
def test_missing_required_key_is_refused_in_one_line(files, kind, key):
    path, load = files[kind]
    _rewrite_header(path, lambda m: m.pop(key))
    with pytest.raises(QvecError) as e:
        load(path)
    text = _one_line(e)
    assert str(path) in text and repr(key) in text and "lacks required key" in text


def test_malformed_schema_value(files):
    path, load = files["checkpoint"]
    _rewrite_header(path, lambda m: m.update({META_SCHEMA: "one"}))
    with pytest.raises(QvecError) as e:
        load(path)
    assert str(path) in _one_line(e) and "'qvec.schema' is 'one', expected a non-negative integer" in str(e.value)
    assert describe(path).schema is None


def test_save_refuses_a_header_its_reader_would_refuse(tmp_path):
    with pytest.raises(QvecError, match="required key 'qvec.num_params'"):
        save_safetensors(tmp_path / "v.safetensors", {"a": torch.zeros(2)}, {META_FORMAT: "vector"})
    with pytest.raises(QvecError, match="required key 'qvec.format'"):
        save_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {})
    assert not list(tmp_path.iterdir())


def test_vector_params_must_match_its_tensors(files):
    path, _ = files["vector"]
    _rewrite_header(path, lambda m: m.update({"qvec.num_params": "7"}))
    with pytest.raises(QvecError, match="qvec.num_params = 7 but its tensors hold"):
        QuantVector.load(path)


def test_plain_safetensors_is_still_a_checkpoint(tmp_path, nano_spec):
    """A safetensors file with no qvec header (e.g. downloaded weights) loads as before."""
    state = make_ckpt(nano_spec, 0).state
    path = tmp_path / "plain.safetensors"
    _write_raw(path, state, {})
    ck = Checkpoint.load(path)
    assert ck.meta == {} and all(torch.equal(ck.state[k], state[k]) for k in state)
    _write_raw(path, state, {"format": "pt"})  # another library's metadata is kept as it is
    assert Checkpoint.load(path).meta == {"format": "pt"}
    assert describe(path).schema is None and describe(path).kind == "safetensors (no qvec header)"


def test_old_checkpoint_without_format_key_upgrades_to_a_checkpoint():
    meta = {"qvec.model": "{}", "qvec.task": "t"}
    up = upgrade_header(meta)
    assert up == {**meta, META_FORMAT: "checkpoint", META_SCHEMA: str(SCHEMA_VERSION)}
    assert meta == {"qvec.model": "{}", "qvec.task": "t"}  # the input is not modified
    assert check_header(meta, "f") == up  # schema 0: upgraded, not held to the required keys
    assert upgrade_header(up) == up  # the current schema comes back as it is


def test_fingerprints_do_not_depend_on_the_schema(tmp_path, nano_spec):
    """An old file (no qvec.schema) and a new one of the same tensors: same backbone fingerprint in the header and
    recomputed from the tensors, same head cache key; both load to the same weights."""
    ck = make_ckpt(nano_spec, 0, **{"qvec.task": "t", "qvec.kind": "ft"})
    keys = get_adapter(nano_spec).backbone_keys(ck.state)
    ck.meta["qvec.backbone_fingerprint"] = fingerprint_tensors(ck.state, keys)
    new_path = ck.save(tmp_path / "new.safetensors")
    old_path = tmp_path / "old.safetensors"
    old_meta = {k: v for k, v in _raw_header(new_path).items() if k != META_SCHEMA}
    _write_raw(old_path, ck.state, old_meta)
    old, new = Checkpoint.load(old_path), Checkpoint.load(new_path)
    assert old.fingerprint == new.fingerprint == ck.meta["qvec.backbone_fingerprint"]
    assert fingerprint_tensors(old.state, keys) == fingerprint_tensors(new.state, keys) == old.fingerprint
    assert all(torch.equal(old.state[k], new.state[k]) for k in ck.state)
    # vectors made from either carry the same fingerprint
    qat = make_ckpt(nano_spec, 1, **{"qvec.task": "t", "qvec.kind": "qat",
                                     "qvec.backbone_fingerprint": ck.meta["qvec.backbone_fingerprint"]})
    assert QuantVector.from_checkpoints(old, qat).fingerprint == QuantVector.from_checkpoints(new, qat).fingerprint


def test_resaving_an_old_file_stamps_the_schema(files, tmp_path):
    path, _ = files["checkpoint"]
    _rewrite_header(path, lambda m: m.pop(META_SCHEMA))
    again = Checkpoint.load(path).save(tmp_path / "again.safetensors")
    assert _raw_header(again)[META_SCHEMA] == str(SCHEMA_VERSION)


def test_lambda_choice_keys_are_checkpoint_keys():
    meta = LambdaChoice("agree", "top1", 0.5, "d", {"d": {0.0: 0.1, 0.5: 0.2}}, probe="noise").to_meta()
    assert set(meta) == {schema.META_LAMBDA_RULE, schema.META_LAMBDA, schema.META_LAMBDA_DONOR,
                         schema.META_LAMBDA_SCORES, schema.META_LAMBDA_PROBE}
    assert set(meta) <= set(schema.FORMATS["checkpoint"].keys)
    assert json.loads(meta[schema.META_LAMBDA_SCORES]) == {"d": {"0": 0.1, "0.5": 0.2}}


def test_schema_module_is_complete():
    keys = {v for k, v in vars(schema).items() if k.startswith("META_")}
    assert keys == set(schema.all_keys())  # every key named is documented in some format, and vice versa
    assert all(k.startswith("qvec.") for k in keys)
    assert set(schema.UPGRADES) == set(range(SCHEMA_VERSION))  # one upgrade step per older schema
    assert {f.name for f in schema.FORMATS.values()} == set(FORMAT_NAMES)


# ------------------------------------------------------------------------------------------ key literals
#: Header key literals left in modules another change owns (qvec.cli.*, qvec.grid.run); each is to become the
#: qvec.schema constant. Nothing else may spell a key.
PENDING = {("cli/train.py", "qvec.kind"), ("cli/train.py", "qvec.train_seconds")}
#: Strings of the key shape that are not header keys.
NOT_KEYS = {"qvec.plugins",  # the entry-point group of plugins
            "qvec.data"}  # an ONNX metadata property of exported models (qvec.deploy.onnx), not a header


def _key_literals(path: Path) -> list[tuple[int, str]]:
    """String literals of the shape of a header key (``qvec.<name>``), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if text.startswith("qvec.") and text[5:].isidentifier() and text not in NOT_KEYS:
                out.append((node.lineno, text))
    return sorted(out)


def test_no_header_key_literals_outside_the_schema_module():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "core/schema.py":
            continue
        found += [f"{rel}:{line}: {text!r}" for line, text in _key_literals(path) if (rel, text) not in PENDING]
    assert not found, "header keys spelled outside qvec.schema (use its META_* constants):\n" + "\n".join(found)


def test_the_key_literal_scan_finds_keys(tmp_path):
    """The scan itself: it sees a key in code and in an f-string, and skips docstrings and non-key strings."""
    probe = tmp_path / "m.py"
    probe.write_text('"""Docs name qvec.model freely."""\n\nx = {"qvec.task": 1}\ny = f"{d.get(\'qvec.donor\')}"\n'
                     'z = "qvec.plugins"\nw = "see qvec.qat.convert_qat first"\n')
    assert _key_literals(probe) == [(3, "qvec.task"), (4, "qvec.donor")]

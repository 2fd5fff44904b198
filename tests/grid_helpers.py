"""Shared by the grid tests: a tiny but real study (vit-nano, two generated tasks) that trains in seconds."""

from __future__ import annotations

from pathlib import Path

TINY_TASKS = ["syn_glyphs", "syn_shapes"]


def tiny_suite(root: Path) -> Path:
    """A small synthetic suite (written once per folder)."""
    from qvec.data.synthetic import write_suite

    return write_suite(root / "data", tasks=TINY_TASKS, n_train=300, n_test=80, n_pretrain=300)


def tiny_config_text(data_dir: Path, name: str = "tiny", lambdas: str = "[0.5, 1.0]", bits: str = "[3]",
                     extra: str = "") -> str:
    """A TOML grid config whose every training is one short epoch on a few hundred images."""
    return f"""
name = "{name}"
model = "qvec:vit-nano"
data_dir = "{data_dir}"
tasks = {TINY_TASKS!r}
bits = {bits}
lambdas = {lambdas}
{extra}

[pretrain]
data = "pretrain_synthetic.npz"
epochs = 1
train_limit = 192
batch_size = 64
warmup_steps = 1

[recipe]
epochs = 1
train_limit = 128
batch_size = 64
warmup_steps = 1

[eval]
val_limit = 24
test_limit = 48
batch_size = 64
""".replace("'", '"')


def write_tiny_config(root: Path, **kw) -> Path:
    data = tiny_suite(root)
    path = root / f"{kw.get('name', 'tiny')}.toml"
    path.write_text(tiny_config_text(data, **kw))
    return path


def table(db: Path, study: str | None = None) -> list[tuple]:
    """The comparable content of a study's results: (key, kind, donor, receiver, bits, lam, split, correct, n)."""
    from qvec.grid.store import ResultStore

    with ResultStore(db) as store:
        rows = store.results(store.resolve_study(study))
    return sorted((r.key, r.kind, r.donor, r.receiver, r.bits, r.lam, r.split, r.correct, r.n) for r in rows)

"""Shared fixtures: tiny real models (the built-in vit-nano) and the shared data folder when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qvec.models import ModelSpec, build_model, checkpoint_from_model

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_data_dir() -> Path | None:
    """The real task suite: $QVEC_DATA, else ../shared/data beside the repository."""
    env = os.environ.get("QVEC_DATA")
    cand = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return cand if (cand / "mnist.npz").is_file() else None


@pytest.fixture(scope="module")
def one_thread_module():
    """Tiny models run fastest on one thread; two threads on shared, busy cores are up to 10x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def nano_spec() -> ModelSpec:
    return ModelSpec("qvec", "vit-nano", 10)


def make_ckpt(spec: ModelSpec, seed: int, **meta: str):
    torch.manual_seed(seed)
    return checkpoint_from_model(build_model(spec), spec, **meta)


@pytest.fixture
def ckpts(nano_spec, tmp_path):
    """FT/QAT of a donor and an FT receiver, saved to disk, sharing one backbone fingerprint."""
    fp = {"qvec.backbone_fingerprint": "abc123"}
    ft = make_ckpt(nano_spec, 0, **{"qvec.task": "donor", "qvec.kind": "ft"}, **fp)
    qat = make_ckpt(nano_spec, 0, **{"qvec.task": "donor", "qvec.kind": "qat"}, **fp)
    with torch.no_grad():  # a QAT model is its FT twin plus a small, structured change
        for v in qat.state.values():
            if v.is_floating_point():
                v.add_(0.01 * torch.randn_like(v))
    recv = make_ckpt(nano_spec, 1, **{"qvec.task": "receiver", "qvec.kind": "ft"}, **fp)
    paths = {}
    for name, c in (("ft", ft), ("qat", qat), ("recv", recv)):
        paths[name] = tmp_path / f"{name}.safetensors"
        c.save(paths[name])
    return paths


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A folder whose ``runs/demo`` is shared by the slow demo tests, so the demo study is computed once per session
    (the second test to run finds every job done, which is itself part of what the demo test checks)."""
    return tmp_path_factory.mktemp("demo-root")

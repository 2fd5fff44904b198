"""A plugin module that registers a quantizer, a lambda rule, a signal and a model family, found through
``$QVEC_PLUGINS`` by a study whose jobs run in spawned worker processes (which inherit the environment, not the
test's imports): the proof that each extension is one file and one registration (docs/extending.md)."""

from __future__ import annotations

import os

import pytest

from qvec.grid import load_config, run_grid
from qvec.grid.executors import make_executor
from qvec.grid.store import ResultStore

from .grid_helpers import TINY_TASKS, tiny_config_text, tiny_suite

PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

from qvec.data.probe import ProbeSet
from qvec.models import register_adapter
from qvec.models.timm_vit import SmallViTAdapter
from qvec.quant import QuantizerConfig, dequantize_rows, grouped_view, register_quantizer, round_rows, row_qparams
from qvec.vectors.rules import LambdaRule, register_rule
from qvec.vectors.signals import USES_NOTHING, ImageAgreement, register_signal
import torch


@register_adapter
class PlugViT(SmallViTAdapter):
    """The built-in small ViTs under a family name of their own."""

    family = "plugvit"


@register_quantizer
@dataclass(frozen=True)
class Shrink(QuantizerConfig):
    method: ClassVar[str] = "shrink"
    label: ClassVar[str] = "Shrink"
    shrink: float = 0.9

    def quantize_weight(self, w):
        g = grouped_view(w.detach().float().contiguous(), self.grid)
        scale, zero = row_qparams(g, self.grid, self.shrink)
        return dequantize_rows(round_rows(g, scale, zero, self.grid), scale, zero).reshape(w.shape), scale, zero


@register_signal
@dataclass(frozen=True)
class Dark(ImageAgreement):
    """Dark noise images: pixel values below 64."""

    name: ClassVar[str] = "dark"
    uses: ClassVar[str] = USES_NOTHING

    def images(self, bench):
        g = torch.Generator().manual_seed(1)
        s = bench.config.image_size
        return ProbeSet("dark", torch.randint(0, 64, (self.size, 3, s, s), generator=g, dtype=torch.uint8), "dark")


@register_rule("dark-kl")
def _dark_kl(arg):
    return LambdaRule("dark-kl", metric="dark.kl", higher_is_better=False, uses=USES_NOTHING)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    import qvec.core.plugins

    (tmp_path / "qvec_test_plugin.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("QVEC_PLUGINS", "qvec_test_plugin")
    monkeypatch.setattr(qvec.core.plugins, "_LOADED", set())
    return tmp_path


def test_a_plugin_quantizer_rule_signal_and_family_run_in_grid_workers(plugin, tmp_path):
    data = tiny_suite(tmp_path)
    text = tiny_config_text(data, name="plug", lambdas="[1.0]", extra="""
self_pairs = false

[rules]
use = ["dark-kl"]
probe_size = 8

[pipelines.shrink]
quantizer = "shrink"
shrink = 0.8
""").replace('model = "qvec:vit-nano"', 'model = "plugvit:vit-nano"')
    (tmp_path / "plug.toml").write_text(text)
    cfg = load_config(tmp_path / "plug.toml")
    run_grid(cfg, db=tmp_path / "plug.db", artifacts=tmp_path / "artifacts",
             executor=make_executor("local", workers=2))
    with ResultStore(tmp_path / "plug.db") as store:
        rows = store.results("plug")
    mine = [r for r in rows if r.pipeline == "shrink"]
    assert {r.kind for r in mine} == {"ft_ptq", "qat_ptq", "pretrained_ptq", "patched", "score"}
    assert all(r.quant == "shrink-w3-sym-channel" for r in mine)
    assert all(r.model == "plugvit:vit-nano" for r in rows)
    dark = [r for r in mine if r.kind == "score"]
    assert dark and {r.split for r in dark} == {"dark"} and {r.metric for r in dark} == {"kl", "agree"}
    here = f":{os.getpid()}"
    assert all(not r.worker.endswith(here) for r in rows)  # every row was made in a spawned worker
    receivers = {r.receiver for r in mine if r.kind == "patched" and r.split == "test"}
    assert receivers == set(TINY_TASKS)

"""``qvec demo``: its configuration (fast) and the whole embedded study (slow: a few minutes)."""

from __future__ import annotations

import pytest

from qvec.cli import main
from qvec.core.errors import QvecError
from qvec.grid import build_plan
from qvec.grid.studies import DEMO_SETTINGS, demo_config

from .grid_helpers import tiny_suite


def test_demo_config_on_the_generated_suite(tmp_path):
    cfg = demo_config(tmp_path)
    assert cfg.tasks == ["syn_gratings", "syn_shapes", "syn_glyphs", "syn_blobs", "syn_textures"]
    assert cfg.bits == DEMO_SETTINGS["bits"] and len(cfg.lambdas) == 11 and cfg.backbone == "pretrain"
    assert (tmp_path / "synthetic" / "pretrain_synthetic.npz").is_file()
    assert build_plan(cfg, tmp_path / "a").counts() == {"pretrain": 1, "finetune": 10, "vector": 5, "baseline": 10,
                                                         "cells": 25}


def test_demo_config_with_a_data_folder(tmp_path):
    data = tiny_suite(tmp_path)
    cfg = demo_config(tmp_path / "w", data)
    assert sorted(cfg.tasks) == ["syn_glyphs", "syn_shapes"] and cfg.name == "demo-data"
    (tmp_path / "empty").mkdir()
    with pytest.raises(QvecError, match="no task .npz files"):
        demo_config(tmp_path / "w", tmp_path / "empty")


@pytest.mark.slow
def test_demo_end_to_end(demo_root, capsys):
    tmp_path = demo_root / "runs" / "demo"  # shared with tests/test_quickstart.py: the demo is computed once
    assert main(["demo", "--workdir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Headline numbers" in out and "report.md" in out
    assert (tmp_path / "report" / "heatmap_w2.png").is_file()
    assert main(["demo", "--workdir", str(tmp_path), "--quiet"]) == 0  # everything reused
    assert "0 jobs run, 51 reused" in capsys.readouterr().out

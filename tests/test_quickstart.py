"""The README's quick start, run as written on a fresh folder: ``qvec demo``, then the commands on its outputs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_block() -> str:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(qvec demo .*?)```", text, flags=re.S)
    assert blocks, "README has no quick-start block starting with `qvec demo`"
    return blocks[0]


def test_the_quickstart_block_uses_only_the_demo_outputs():
    block = quickstart_block()
    assert "mnist-ft.safetensors" not in block and "$A/ft-" in block


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(demo_root):
    """In a folder whose runs/demo the demo test shares (whichever runs first computes the study)."""
    tmp_path = demo_root
    bindir = Path(sys.executable).parent
    script = "set -euo pipefail\nexport PATH=" + str(bindir) + ":$PATH\n" + quickstart_block()
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for f in ("gratings.qvec.safetensors", "shapes-patched-w2.safetensors", "shapes-w2-float.safetensors"):
        assert (tmp_path / f).is_file()
    assert "Top-1" in r.stdout

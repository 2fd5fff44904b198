"""The package's layers import only downward, and the study layer computes nothing of its own.

Layers, bottom to top: core < data < models < quant < train < vectors < grid < cli (each subpackage's docstring
says what it may import). Function-level imports count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qvec"
LAYERS = ["core", "data", "models", "quant", "train", "vectors", "deploy", "grid", "cli"]


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] in LAYERS)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every qvec import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text())
    pkg = ["qvec", *path.relative_to(SRC).parts[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("qvec")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            if mod.startswith("qvec"):
                out.append((mod, [a.name for a in node.names], node.lineno))
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_layers_import_only_downward(path):
    own = LAYERS.index(path.relative_to(SRC).parts[0])
    up = [f"line {line}: {mod}" for mod, _, line in _imports(path)
          if (layer := _layer(mod)) is not None and layer > own]
    assert not up, f"{path.relative_to(SRC)} imports a higher layer: {up}"


def test_the_top_level_package_imports_nothing_eagerly():
    """``import qvec`` is lazy: the top level names its exports and imports none of them."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    eager = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and
             not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    assert all(not any(a.name.startswith("qvec") or (isinstance(n, ast.ImportFrom) and n.level) for a in n.names)
               for n in eager)


def test_grid_imports_no_private_name_of_another_module():
    bad = []
    for path in (SRC / "grid").rglob("*.py"):
        for mod, names, line in _imports(path):
            if not mod.startswith("qvec.grid"):
                bad += [f"{path.name}:{line} {mod}.{n}" for n in names
                        if n.startswith("_") and not n.endswith("__")]
    assert not bad, bad


#: what scoring, patching or quantizing look like in code; the study layer schedules calls of qvec.vectors.measure
_COMPUTE = re.compile(r"\bquantize_\(|\.apply\(|kl_div|log_softmax|\.softmax\(|\bargmax\(|QuantVector\.__add__")


def test_grid_reimplements_no_patching_or_scoring():
    hits = [f"{p.name}:{i}: {line.strip()}" for p in (SRC / "grid").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if _COMPUTE.search(line)]
    assert not hits, hits


def test_every_subpackage_says_what_it_may_import():
    for layer in LAYERS:
        init = SRC / layer / "__init__.py"
        if init.is_file():
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            assert "import" in doc.lower(), f"qvec.{layer}'s docstring does not say what it may import"

"""Grid configs: TOML/YAML/flags, and every bad input rejected with one line before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvec.cli import main
from qvec.core.errors import QvecError
from qvec.grid.config import DEFAULT_LAMBDAS, load_config
from qvec.quant import QuantSpec

from .grid_helpers import tiny_config_text, tiny_suite


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_suite(tmp_path_factory.mktemp("suite"))


def _write(tmp_path: Path, text: str, suffix: str = ".toml") -> Path:
    p = tmp_path / f"grid{suffix}"
    p.write_text(text)
    return p


def test_toml_config_loads_with_defaults(tmp_path, data_dir):
    cfg = load_config(_write(tmp_path, tiny_config_text(data_dir)))
    assert cfg.name == "tiny" and cfg.donors == cfg.receivers == cfg.tasks
    assert cfg.backbone == "pretrain" and cfg.pretrain_file().name == "pretrain_synthetic.npz"
    assert cfg.eval.val_limit == 24 and cfg.recipe["train_limit"] == 128
    assert cfg.quant(3).bits == 3 and cfg.granularity == "channel"


def test_default_lambda_grid_is_the_papers(tmp_path, data_dir):
    text = tiny_config_text(data_dir).replace("lambdas = [0.5, 1.0]\n", "")
    cfg = load_config(_write(tmp_path, text))
    assert tuple(cfg.lambdas) == DEFAULT_LAMBDAS and len(DEFAULT_LAMBDAS) == 11


def test_yaml_config_equals_toml(tmp_path, data_dir):
    import tomllib

    import yaml

    toml_cfg = load_config(_write(tmp_path, tiny_config_text(data_dir)))
    raw = tomllib.loads(tiny_config_text(data_dir))
    yaml_cfg = load_config(_write(tmp_path, yaml.safe_dump(raw), ".yaml"))
    assert yaml_cfg.to_dict() == toml_cfg.to_dict()


def test_flags_override_the_file(tmp_path, data_dir):
    cfg = load_config(_write(tmp_path, tiny_config_text(data_dir)), {"bits": [2, 4], "lambdas": [1.0],
                                                                      "val_limit": 10, "name": None})
    assert cfg.bits == [2, 4] and cfg.lambdas == [1.0] and cfg.eval.val_limit == 10 and cfg.name == "tiny"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('tasks = ["syn_glyphs", "syn_shapes"]', 'tasks = ["syn_glyphs", "nope"]'), "unknown task 'nope'"),
        (("lambdas = [0.5, 1.0]", "lambdas = []"), "lambda grid is empty"),
        (("lambdas = [0.5, 1.0]", "lambdas = [0.5, -1.0]"), "positive finite"),
        (("bits = [3]", "bits = [9]"), "bits must be integers in 2..8"),
        (("bits = [3]", "bits = [1]"), "bits must be integers in 2..8"),
        (("bits = [3]", "bits = []"), "bits is empty"),
        (("bits = [3]", 'bits = ["3"]'), "bits must be integers"),
        (("bits = [3]", "bits = [3]\nlamdas = [1.0]"), "unknown key 'lamdas'"),
        (('model = "qvec:vit-nano"', 'model = "nofamily:x"'), "unknown model family"),
        (("val_limit = 24", "val_limit = 0"), "eval.val_limit must be a positive integer"),
        (("val_limit = 24", "val_limits = 3"), "unknown key eval.val_limits"),
        (("epochs = 1\ntrain_limit = 128", "epochs = 1\ntrain_limt = 128"), "recipe.train_limt is not a recipe field"),
        (('data = "pretrain_synthetic.npz"', 'data = "missing.npz"'), "no such file"),
        (('model = "qvec:vit-nano"', 'model = "qvec:vit-nano"\nbackbone = "/no/such/file"'), "backbone"),
        (('model = "qvec:vit-nano"', 'model = "qvec:vit-nano"\nprofile = "best"'), "profile: unknown recipe profile"),
        (('model = "qvec:vit-nano"', 'model = "qvec:vit-nano"\nprofile = 3'), "profile must be a string"),
        (('model = "qvec:vit-nano"', 'model = "timm:vit_tiny_patch16_224"\nprofile = "fast"'),
         "profile: recipe profile 'fast' is for qvec's built-in ViTs"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, data_dir, change, message):
    text = tiny_config_text(data_dir)
    assert change[0] in text
    path = _write(tmp_path, text.replace(change[0], change[1], 1))
    with pytest.raises(QvecError) as e:
        load_config(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(path) in str(e.value)


def test_missing_pretrain_section_for_builtin_model(tmp_path, data_dir):
    text = tiny_config_text(data_dir)
    text = text[: text.index("[pretrain]")] + text[text.index("[recipe]"):]
    with pytest.raises(QvecError, match=r"no pretrained weights; add a \[pretrain\] section"):
        load_config(_write(tmp_path, text))


def test_unparseable_files(tmp_path):
    with pytest.raises(QvecError, match="not valid TOML"):
        load_config(_write(tmp_path, "name = [unclosed"))
    with pytest.raises(QvecError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [b", ".yaml"))
    with pytest.raises(QvecError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_cli_prints_one_line_and_exits_2(tmp_path, data_dir, capsys):
    path = _write(tmp_path, tiny_config_text(data_dir).replace("lambdas = [0.5, 1.0]", "lambdas = []"))
    assert main(["grid", "plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "lambda grid is empty" in err and len(err.splitlines()) == 1
    assert main(["grid", "run", str(path)]) == 2


def test_the_grid_is_one_quant_table_checked_by_quantspec(tmp_path, data_dir):
    text = tiny_config_text(data_dir)
    nested = load_config(_write(tmp_path, text + '\n[quant]\ngranularity = "group"\ngroup_size = 32\n'))
    assert nested.quant(3) == QuantSpec(3, granularity="group", group_size=32)
    flat = load_config(_write(tmp_path, text.replace("bits = [3]", 'bits = [3]\ngranularity = "group"\n'
                                                     "group_size = 32")))
    assert flat.quant(3) == nested.quant(3) and flat.to_dict() == nested.to_dict()  # older configs: same study
    for extra, message in [
        ('\n[quant]\ngranularity = "row"\n', "quant.granularity must be one of channel, tensor, group, got 'row'"),
        ('\n[quant]\nsymmetric = "yes"\n', "quant.symmetric must be true or false"),
        ("\n[quant]\nbits = 3\n", "quant.bits: the bit-widths are the top-level bits list"),
        ("\n[quant]\ngroupsize = 3\n", "unknown key quant.groupsize"),
        ('\nquantizers = ["rtn", "gptq"]\n[gptq]\ndamp = 2.0\n', "gptq: GPTQ damp must be in (0, 1)"),
        ('\nquantizers = ["rtn", "gptq"]\n[gptq]\ndamping = 0.1\n', "unknown key gptq.damping"),
        ('\nquantizers = ["rtn", "gptq"]\n[gptq]\nbits = [2]\n', "gptq.bits: 2 is not one of the study's bits"),
    ]:
        head, _, tail = text.partition("\n[pretrain]")
        path = _write(tmp_path, head + extra + "\n[pretrain]" + tail)
        with pytest.raises(QvecError) as e:
            load_config(path)
        assert message in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))

"""Run settings: defaults, validation messages that name the key, and the files that carry them."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.config import KEYS, ConfigError, Settings, load_config_file, markdown_table, parse_overrides, toml_table
from common.settings import declared

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_defaults():
    s = Settings.from_config()
    assert s.as_dict() == {key: spec.default for key, spec in KEYS.items()}
    assert Settings.from_config({}).as_dict() == s.as_dict()
    assert s.num_sites == 5 and s.rounds == 5
    assert s.privacy.epsilon == 8.0 and s.privacy.delta is None  # 0 means 1/(10 n)
    assert s.private
    assert s.data.dataset == "movietweetings" and s.data.data_path is None
    assert s.data.rating_threshold is None  # negative: keep all
    assert s.model.lora.target_modules is None and s.model.lora.ffa
    assert s.privacy.accountant == "rdp" and s.privacy.noise  # audit-control false: noise on
    assert s.split.partition_column is None and s.server.central_dp == "none" and s.run.out_dir == ""


def test_values_flow_into_the_typed_settings():
    s = Settings.from_config(
        {"epsilon": 4, "num-sites": 3, "text-columns": "title, genres", "lora-target-modules": "query,value",
         "delta": 1e-5, "rating-threshold": 4.0}
    )
    assert s.privacy.epsilon == 4.0 and isinstance(s.privacy.epsilon, float)  # int accepted for a float key
    assert s.privacy.delta == 1e-5
    assert s.num_sites == 3
    assert s.data.text_columns == ("title", "genres")
    assert s.data.rating_threshold == 4.0
    assert s.model.lora.target_modules == ("query", "value")
    assert s.with_values(num_sites=7).num_sites == 7  # underscore spelling accepted
    s = Settings.from_config({"audit-control": True, "seed": 3, "central-dp": "server-fixed", "prior-cap": 5,
                              "partition-column": "site", "eval-users": 9, "round-timeout": 10})
    assert not s.privacy.noise and s.server.central_dp == "server-fixed" and s.prior.cap == 5
    assert s.model.lora.seed == s.train.seed == s.run.seed == 3  # one key, every group that needs it
    assert s.split.partition_column == "site" and s.run.eval_users == 9 and s.server.round_timeout == 10.0


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'nope'"):
        Settings.from_config({"nope": 1})
    with pytest.raises(ConfigError, match="'num_sites'"):  # underscores are not the config spelling
        Settings.from_config({"num_sites": 3})


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"num-sites": "three"}, "num-sites"),  # unparsable string
        ({"num-sites": 2.5}, "num-sites"),  # float for an int
        ({"num-sites": True}, "num-sites"),  # bool is not an int
        ({"ffa-lora": 1}, "ffa-lora"),  # int for a bool
        ({"ffa-lora": "yes"}, "ffa-lora"),
        ({"epsilon": "lots"}, "epsilon"),
        ({"epsilon": True}, "epsilon"),
        ({"num-sites": 0}, "num-sites"),  # below minimum
        ({"k-core": 1}, "k-core"),
        ({"local-steps": -3}, "local-steps"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": 0}, "epsilon"),  # zero: use inf for no DP
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": "nan"}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 2}, "delta"),
        ({"delta": -0.1}, "delta"),
        ({"max-grad-norm": 0}, "max-grad-norm"),
        ({"dataset": "imdb"}, "dataset"),  # choice not allowed
        ({"partition": "random"}, "partition"),
        ({"accountant": "gdp"}, "accountant"),
        ({"grad-sample-mode": "ghost"}, "grad-sample-mode"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_name_the_key(config, key):
    with pytest.raises(ConfigError) as err:
        Settings.from_config(config)
    assert key in str(err.value)


def test_set_strings_are_coerced():
    """``--set`` gives strings; they go through TOML to the default's type."""
    s = Settings.from_config(parse_overrides(["epsilon=inf", "num-sites=3", "ffa-lora=false", "learning-rate=1e-3"]))
    assert s.privacy.epsilon == math.inf
    assert not s.private and not s.privacy.private
    assert s.num_sites == 3 and not s.model.lora.ffa and s.train.learning_rate == 1e-3
    assert Settings.from_config({"epsilon": "4"}).privacy.epsilon == 4.0
    assert Settings.from_config({"epsilon": math.inf}).private is False
    # string keys keep the text as given, even when it looks like a number
    assert Settings.from_config(parse_overrides(["model=123", "dataset=csv"])).model.model == "123"


def test_parse_overrides():
    assert parse_overrides([]) == {}
    assert parse_overrides(["epsilon=4", " dataset = csv ", 'model="a b"', "text-columns=a=b"]) == {
        "epsilon": "4",
        "dataset": "csv",
        "model": "a b",
        "text-columns": "a=b",  # only the first '=' splits
    }
    assert parse_overrides(["data-path="]) == {"data-path": ""}


@pytest.mark.parametrize("pair", ["epsilon", "=4", " =4", ""])
def test_parse_overrides_errors(pair):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([pair])


def test_every_key_is_declared_once():
    keys = [f.metadata["key"] for f in declared(Settings)]
    assert len(keys) == len(set(keys)) == len(KEYS)


def test_importing_the_settings_does_not_import_torch():
    """The CLI and tools that only read settings stay light (torch takes seconds to import)."""
    code = "import common.config, sys; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_pyproject_table_is_the_generated_one():
    """``flwr run .`` reads pyproject's [tool.flwr.app.config]; the CLI reads the declaration: same keys,
    order, defaults and help (regenerate with ``python -m common.config toml``)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert toml_table() in text, "pyproject's [tool.flwr.app.config] differs: python -m common.config toml"
    app_config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert list(app_config) == list(KEYS)
    for key, spec in KEYS.items():
        assert app_config[key] == spec.default, key
        assert type(app_config[key]) is type(spec.default), key
    Settings.from_config(app_config)


def test_config_files_exist():
    assert {p.name for p in CONFIGS} >= {"default.toml", "tiny.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_files_are_accepted(path):
    config = load_config_file(path)
    assert config, f"{path.name} is empty"
    Settings.from_config(config)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epsilon = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config_file(bad)


def test_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in KEYS if f"| `{key}` |" not in readme]
    assert not missing, f"README settings table lacks {missing}"
    assert markdown_table() in readme, "README settings table differs: python -m common.config markdown"


def test_table_printer_refuses_an_unknown_table():
    done = subprocess.run([sys.executable, "-m", "common.config", "yaml"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "common.config", "toml"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == toml_table()


def test_group_defaults_equal_the_built_defaults():
    """Code deeper down builds groups directly (``TrainSettings()``, benchmarks, tests): their field
    defaults must be what a run config's defaults parse to, fields filled from another key included."""
    built = Settings.from_config({})
    for f in dataclasses.fields(Settings):
        if "group" in f.metadata:
            assert f.metadata["group"]() == getattr(built, f.name), f.name

"""Run settings: defaults, validation messages that name the key, and the files that carry them."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from common.config import KEYS, ConfigError, Settings, load_config_file, parse_overrides

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
    assert s["accountant"] == "rdp"


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
    assert s.num_sites == 3 and not s["ffa-lora"] and s["learning-rate"] == 1e-3
    assert Settings.from_config({"epsilon": "4"}).privacy.epsilon == 4.0
    assert Settings.from_config({"epsilon": math.inf}).private is False
    # string keys keep the text as given, even when it looks like a number
    assert Settings.from_config(parse_overrides(["model=123", "dataset=csv"]))["model"] == "123"


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


def test_pyproject_defaults_match_keys():
    """``flwr run .`` reads pyproject's [tool.flwr.app.config]; the CLI reads KEYS: same defaults."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
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


def test_readme_documents_every_setting():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [key for key in KEYS if f"| `{key}` |" not in readme]
    assert not missing, f"README settings table lacks {missing}"


def test_typed_settings_defaults_equal_the_declared_defaults():
    """The dataclasses that code deeper down receives carry defaults of their own (used by
    benchmarks and tests that build them directly): they must be the declared ones."""
    import dataclasses

    from common.data import DataSpec
    from common.encoder import LoraSettings
    from common.model import ModelSettings
    from common.privacy import PrivacySettings
    from common.training import TrainSettings

    built = Settings.from_config({})
    pairs = [(ModelSettings(), built.model), (LoraSettings(), built.model.lora), (TrainSettings(), built.train),
             (PrivacySettings(), built.privacy), (DataSpec(), built.data)]
    drift = [
        f"{type(own).__name__}.{f.name}: {getattr(own, f.name)!r} != {getattr(declared, f.name)!r}"
        for own, declared in pairs
        for f in dataclasses.fields(own)
        if not dataclasses.is_dataclass(getattr(own, f.name)) and getattr(own, f.name) != getattr(declared, f.name)
    ]
    assert not drift, drift

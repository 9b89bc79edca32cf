"""Run settings: the dash-separated keys of ``[tool.flwr.app.config]``, parsed once.

``Settings.from_config(run_config)`` is the only place that reads a raw run config;
everything deeper receives the small typed groups it needs (``settings.data``,
``settings.model``, ``settings.server``, ...), declared once in :mod:`common.settings`.
Unknown keys and bad values raise :class:`ConfigError` naming the key.

``python -m common.config toml`` prints pyproject's ``[tool.flwr.app.config]`` table and
``python -m common.config markdown`` the README's settings table, both from the declaration.
"""

from __future__ import annotations

import json
import math
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .settings import (
    DataSpec,
    ModelSettings,
    PriorSettings,
    PrivacySettings,
    RunSettings,
    ServerSettings,
    SplitSettings,
    TrainSettings,
    build,
    declared,
    group,
)


class ConfigError(ValueError):
    """A bad run-config key or value (the message names the key)."""


@dataclass(frozen=True)
class Key:
    default: object
    help: str
    choices: tuple | None = None
    minimum: float | None = None


def _coerce(key: str, value, default):
    """Match the default's type; strings from ``--set`` go through TOML first."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{key}: cannot parse {value!r} as {type(default).__name__}") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    return str(value)


@dataclass(frozen=True)
class Settings:
    """Every run setting, validated, in typed groups. Build with :meth:`from_config`.

    >>> s = Settings.from_config({"epsilon": 4.0, "num-sites": 3, "min-sites": 2})
    >>> s.privacy.epsilon, s.num_sites, s.server.min_sites
    (4.0, 3, 2)
    """

    values: dict = field(repr=False)
    data: DataSpec = group(DataSpec)
    split: SplitSettings = group(SplitSettings)
    model: ModelSettings = group(ModelSettings)
    train: TrainSettings = group(TrainSettings)
    server: ServerSettings = group(ServerSettings)
    privacy: PrivacySettings = group(PrivacySettings)
    prior: PriorSettings = group(PriorSettings)
    run: RunSettings = group(RunSettings)

    @property
    def num_sites(self) -> int:
        return self.split.num_sites

    @property
    def rounds(self) -> int:
        return self.server.num_server_rounds

    @classmethod
    def from_config(cls, config: dict | None = None) -> Settings:
        config = dict(config or {})
        unknown = sorted(set(config) - set(KEYS))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(KEYS)}")
        values = {}
        for key, spec in KEYS.items():
            value = _coerce(key, config.get(key, spec.default), spec.default)
            if spec.choices and value not in spec.choices:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(spec.choices)}")
            if spec.minimum is not None and not (value >= spec.minimum):
                raise ConfigError(f"{key}: must be >= {spec.minimum}, got {value!r}")
            values[key] = value
        _check(values)
        try:
            groups = {f.name: build(f.metadata["group"], values) for f in fields(cls) if "group" in f.metadata}
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return cls(values, **groups)

    def with_values(self, **changes) -> Settings:
        """A copy with some keys changed (dash or underscore spelling)."""
        return Settings.from_config(self.values | {k.replace("_", "-"): val for k, val in changes.items()})

    @property
    def private(self) -> bool:
        return math.isfinite(self.privacy.epsilon)

    def as_dict(self) -> dict:
        """The checked values by key, as a run config writes them (simulate's run_config.toml).

        >>> Settings.from_config({"data-path": ""}).as_dict()["data-path"]  # not the parsed None
        ''
        """
        return dict(self.values)


def _check(v: dict) -> None:
    """Rules that span keys or go beyond a lower bound."""
    if v["epsilon"] == 0:
        raise ConfigError("epsilon: must be > 0 (use inf for no DP)")
    if v["fraction-train"] <= 0:
        raise ConfigError(f"fraction-train: must be > 0 (a round with no site trains nothing), got {v['fraction-train']}")
    if v["min-sites"] > v["num-sites"]:
        raise ConfigError(f"min-sites: {v['min-sites']} is more than num-sites ({v['num-sites']})")
    if v["popularity-prior"] >= 1:
        raise ConfigError(f"popularity-prior: a share of the budget in [0, 1), got {v['popularity-prior']}")
    if v["delta"] >= 1:
        raise ConfigError(f"delta: must be < 1, got {v['delta']}")
    if v["device"] != "auto" and not (v["device"] == "cpu" or v["device"].startswith("cuda")):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {v['device']!r}")


# Every setting, its written default and why, derived from the declaration in common.settings.
KEYS: dict[str, Key] = {
    f.metadata["key"]: Key(f.metadata["default"], f.metadata["help"], f.metadata["choices"], f.metadata["minimum"])
    for f in declared(Settings)
}


def load_config_file(path: str | Path) -> dict:
    """Read a run-config TOML file (flat keys, as ``flwr run --run-config FILE`` takes)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: {err}") from None


def parse_overrides(pairs: list[str]) -> dict:
    """``["epsilon=4", "dataset=csv"]`` -> ``{"epsilon": "4", "dataset": "csv"}`` (coerced later)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip().strip('"')
    return out




def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string for the texts used here
    return repr(value)


def toml_table() -> str:
    """pyproject's ``[tool.flwr.app.config]`` table, one ``key = default  # help`` line per setting.

    >>> toml_table().splitlines()[1]
    'dataset = "movietweetings"  # movietweetings | movielens | csv'
    """
    lines = ["[tool.flwr.app.config]"] + [f"{key} = {_toml(spec.default)}  # {spec.help}" for key, spec in KEYS.items()]
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The README's settings table.

    >>> markdown_table().splitlines()[2]
    '| `dataset` | `"movietweetings"` | movietweetings \\\\| movielens \\\\| csv |'
    """
    rows = ["| key | default | meaning |", "|---|---|---|"] + [
        f"| `{key}` | `{_toml(spec.default)}` | {spec.help.replace('|', chr(92) + '|')} |" for key, spec in KEYS.items()
    ]
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    """``python -m common.config toml|markdown``: print a table generated from the declaration."""
    tables = {"toml": toml_table, "markdown": markdown_table}
    if len(argv) != 1 or argv[0] not in tables:
        print("error: usage: python -m common.config toml|markdown", file=sys.stderr)
        return 2
    print(tables[argv[0]](), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

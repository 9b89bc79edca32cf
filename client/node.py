"""A site's own configuration: Flower's node config, parsed once and validated.

In deployment every SuperNode is started with ``--node-config`` (``fedenc deploy
supernode`` writes it). The site's privacy policy comes from here and nowhere else: the
server's run config can ask for less privacy spending, never for more. In simulation
Flower sets only ``partition-id`` and ``num-partitions``, and the run config plays the
site's part.

Deployment keys (required: ``data-path``, ``site-id``, ``epsilon-budget``, ``ledger-path``):

- ``data-path``, ``items-path``, ``dataset`` — the site's own files (csv or movielens);
- ``site-id`` — the site's number, as the server reports it; the ledger is this site's;
- ``epsilon-budget`` — the most ε the site's ledger may ever hold (the ledger keeps it;
  raise it with ``fedenc ledger raise-budget``);
- ``ledger-path`` — the site's privacy ledger (JSON, kept across runs);
- ``delta`` — a cap on δ (default 1/(10 n) rounded down to a power of ten);
- ``allow-non-private`` — serve runs that ask for no DP (default false);
- ``state-dir`` — the site's private state outside the ledger: the ledger's marker and the
  update it keeps per round (default ``$FEDENC_STATE_DIR`` or ``~/.local/state/fedenc``);
- ``cache-mb`` — size bound of the site's row cache in ``state-dir/cache`` (default 1024;
  0: no cache): tokenised rows and lower-layer states kept between messages;
- ``torch-threads`` — torch threads of the ClientApp (default 1; in simulation, the CPUs
  the runtime gave the actor: simulations/simulate.py, ``actor_resources``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # common.privacy imports opacus and torch: seconds a forwarding ClientApp must not pay
    from common.privacy import SitePolicy

DEPLOYMENT_KEYS = {
    "data-path": str, "items-path": str, "dataset": str, "site-id": int, "epsilon-budget": float,
    "ledger-path": str, "delta": float, "allow-non-private": bool, "state-dir": str, "torch-threads": int,
    "cache-mb": int,
}  # fmt: skip
REQUIRED = ("data-path", "site-id", "epsilon-budget", "ledger-path")
SIMULATION_KEYS = {"partition-id": int, "num-partitions": int, "torch-threads": int}


def _runtime_threads() -> int:
    """The CPUs Ray assigned to this simulation actor (it sets OMP_NUM_THREADS to them)."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))


class NodeConfigError(ValueError):
    """A bad node-config key or value (the message names the key)."""


@dataclass(frozen=True)
class NodeConfig:
    """What this site is and what it allows.

    >>> node = NodeConfig.parse({"data-path": "a.csv", "site-id": 3, "epsilon-budget": 8.0, "ledger-path": "l.json"})
    >>> node.site_id, node.policy.budget, node.policy.allow_non_private
    (3, 8.0, False)
    """

    site_id: int
    policy: SitePolicy | None  # None in simulation: the run config plays the site
    ledger_path: Path | None
    state_dir: Path | None
    data_path: str | None = None
    items_path: str | None = None
    dataset: str = "csv"
    partition: tuple[int, int] | None = None  # (partition-id, num-partitions) in simulation
    torch_threads: int = 1
    cache_mb: int = 1024  # a few thousand users' lower-layer states of a MiniLM-sized encoder

    @property
    def deployed(self) -> bool:
        return self.partition is None

    @property
    def name(self) -> str:
        return f"site-{self.site_id}"

    @classmethod
    def parse(cls, node_config: dict) -> NodeConfig:
        """Validate Flower's node config; raises :class:`NodeConfigError` naming the key."""
        from common.privacy import PrivacyError, SitePolicy

        raw = dict(node_config)
        if "partition-id" in raw and "data-path" not in raw:
            values = _typed(raw, SIMULATION_KEYS)
            site = values["partition-id"]
            return cls(site, None, None, None, partition=(site, values["num-partitions"]),
                       torch_threads=values.get("torch-threads", _runtime_threads()))
        values = _typed(raw, DEPLOYMENT_KEYS)
        missing = [k for k in REQUIRED if k not in values]
        if missing:
            raise NodeConfigError(
                f"node config: {missing[0]} is required at a deployed site (give it to flower-supernode "
                f"--node-config, or use fedenc deploy supernode --{missing[0]} ...)"
            )
        if values.get("dataset", "csv") not in ("csv", "movielens"):
            raise NodeConfigError(f"node config dataset: expected csv or movielens, got {values['dataset']!r}")
        budget = values["epsilon-budget"]
        if not (budget > 0 and math.isfinite(budget)):
            raise NodeConfigError(f"node config epsilon-budget: a finite ε > 0, got {budget}")
        try:
            policy = SitePolicy(budget, values.get("delta"), values.get("allow-non-private", False))
        except PrivacyError as err:
            raise NodeConfigError(f"node config {err}") from None
        for key, low in (("cache-mb", 0), ("torch-threads", 1)):
            if values.get(key, low) < low:
                raise NodeConfigError(f"node config {key}: must be >= {low}, got {values[key]}")
        return cls(
            values["site-id"], policy, Path(values["ledger-path"]).expanduser(), deployed_state_dir(values),
            data_path=values["data-path"], items_path=values.get("items-path"),
            dataset=values.get("dataset", "csv"), torch_threads=values.get("torch-threads", 1),
            cache_mb=values.get("cache-mb", 1024),
        )

    def with_simulation_storage(self, ledger_dir: str) -> NodeConfig:
        """Simulation: the run's ``ledger-dir`` holds the site's ledger and, beside it, its state."""
        if not ledger_dir:
            return self
        folder = Path(ledger_dir)
        return NodeConfig(self.site_id, None, folder / f"{self.name}.json", folder / "state",
                          partition=self.partition, torch_threads=self.torch_threads)

    @property
    def marker(self) -> Path | None:
        """Outside the ledger file: where the ledger is and how much it held (fail closed)."""
        return self.state_dir / f"{self.name}.marker.json" if self.state_dir else None

    @property
    def cache(self) -> Path | None:
        """Rows derived from the site's data, kept between messages (deployment only)."""
        return self.state_dir / "cache" if self.state_dir and self.deployed and self.cache_mb > 0 else None

    @property
    def kept(self) -> Path | None:
        """The last update this site sent per run, to send again instead of paying twice."""
        return self.state_dir / f"{self.name}.kept" if self.state_dir else None


def deployed_state_dir(node_config: dict) -> Path | None:
    """A deployed site's ``state-dir`` (None in simulation), read without importing the
    privacy code: the ClientApp looks there for the site's worker before anything else.

    >>> deployed_state_dir({"partition-id": 0, "num-partitions": 2}) is None
    True
    >>> str(deployed_state_dir({"data-path": "a.csv", "state-dir": "/srv/site"}))
    '/srv/site'
    """
    if "data-path" not in node_config:
        return None
    state = node_config.get("state-dir") or os.environ.get("FEDENC_STATE_DIR") or "~/.local/state/fedenc"
    return Path(str(state)).expanduser()


def _typed(raw: dict, keys: dict) -> dict:
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise NodeConfigError(f"node config: unknown key {unknown[0]!r}; known keys: {', '.join(keys)}")
    out = {}
    for key, kind in keys.items():
        if key not in raw:
            continue
        value = raw[key]
        try:
            if kind is bool:
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, bool):
                    raise ValueError
            elif kind is int:
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                value = int(float(value))
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            else:
                value = str(value)
                if not value:
                    raise ValueError
        except (TypeError, ValueError):
            raise NodeConfigError(f"node config {key}: expected {kind.__name__}, got {value!r}") from None
        out[key] = value
    return out

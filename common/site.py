"""What a partner site does, independent of Flower: find its users, train a round
under its own privacy ledger, evaluate on its own validation users.

A process keeps one :class:`Site` per site (rows tokenised and lower layers cached
once, the model built once), so later rounds cost only the training itself.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import Settings
from .data import DataSpec, Interactions, Split, leave_one_out, load
from .examples import EvalRows, evaluation_rows, training_rows
from .model import Recommender
from .partition import partition_users
from .privacy import BudgetExhausted, PrivacyLedger, TooFewUsers
from .training import evaluate, resolve_device, train_local, with_lower_states

_LOCK = threading.Lock()
_DATA: dict = {}
_MODELS: dict = {}
_SITES: dict = {}
_PARTITIONS: dict = {}


def dataset(spec: DataSpec) -> tuple[Interactions, Split]:
    """Load and split once per process."""
    with _LOCK:
        if spec not in _DATA:
            data = load(spec)
            _DATA[spec] = (data, leave_one_out(data))
        return _DATA[spec]


def shared_model(settings: Settings, data: Interactions) -> Recommender:
    """One model per process and model settings; each round loads the global state into it."""
    key = (settings.model, data.fingerprint())
    with _LOCK:
        if key not in _MODELS:
            torch.manual_seed(settings.train.seed)
            model = Recommender.build(settings.model, list(data.catalogue.texts))
            _MODELS[key] = model.to(resolve_device(settings.train.device))
        return _MODELS[key]


def site_users(settings: Settings, data: Interactions, site: int, num_sites: int) -> np.ndarray:
    """The users of simulated site ``site`` out of ``num_sites`` (partitioned once per process)."""
    key = (data.fingerprint(), num_sites, settings["partition"], settings["partition-column"],
           settings["dirichlet-alpha"], settings["seed"])
    with _LOCK:
        if key not in _PARTITIONS:
            _PARTITIONS[key] = partition_users(
                data, num_sites, settings["partition"], settings["partition-column"] or None,
                settings["dirichlet-alpha"], settings["seed"],
            )
        return _PARTITIONS[key][site]


@dataclass
class Site:
    """One site's data, rows and model, reused across rounds."""

    name: str
    settings: Settings
    data: Interactions
    split: Split
    users: np.ndarray
    model: Recommender
    ledger_path: Path | None
    _train_rows: torch.utils.data.TensorDataset | None = None
    _valid_rows: EvalRows | None = None

    @classmethod
    def open(cls, settings: Settings, site: int, num_sites: int, spec: DataSpec | None = None, ledger_path=None):
        """Simulation (``spec`` None: partition the run's dataset) or deployment (``spec``:
        the site's own files; all their users are the site's)."""
        key = (json.dumps(settings.values, sort_keys=True), site, num_sites, spec, str(ledger_path))
        with _LOCK:
            cached = _SITES.get(key)
        if cached:
            return cached
        data, split = dataset(spec or settings.data)
        users = np.arange(len(data.user_ids)) if spec else site_users(settings, data, site, num_sites)
        model = shared_model(settings, data)
        made = cls(f"site-{site}", settings, data, split, users, model, Path(ledger_path) if ledger_path else None)
        with _LOCK:
            _SITES[key] = made
        return made

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint(self.users)

    def train_rows(self):
        if self._train_rows is None:
            m = self.settings.model
            rows = training_rows(
                self.data.catalogue, self.split, self.users, self.model.tokenizer,
                m.max_tokens, m.max_history, self.settings.train.targets_per_user,
            )
            self._train_rows = with_lower_states(self.model, rows)
        return self._train_rows

    def valid_rows(self) -> EvalRows:
        if self._valid_rows is None:
            m = self.settings.model
            rows = evaluation_rows(self.data.catalogue, self.split, self.users, self.model.tokenizer, m.max_tokens, m.max_history, "valid")
            self._valid_rows = EvalRows(with_lower_states(self.model, rows.dataset), rows.exclude)
        return self._valid_rows

    def ledger(self, budget: float, state_json: str | None = None) -> PrivacyLedger:
        """The site's ledger: on disk when a path is set, else restored from ``state_json``
        (Flower's ``context.state``)."""
        p = self.settings.privacy
        delta = p.delta_for(len(self.users))
        ledger = PrivacyLedger.open(self.ledger_path, self.fingerprint, budget, delta, p.accountant)
        if self.ledger_path is None and state_json:
            saved = json.loads(state_json)
            ledger.history = [tuple(h) for h in saved["history"]]
            ledger.rounds, ledger.noise_multiplier, ledger.delta = saved["rounds"], saved["noise_multiplier"], saved["delta"]
        return ledger

    def release_counts(self, ledger: PrivacyLedger | None) -> np.ndarray:
        """This site's item counts for the popularity prior, DP-noised and charged to
        ``ledger`` (None: a non-private run, exact counts)."""
        from .prior import release_counts

        s = self.settings
        return release_counts(self.split, self.users, s["prior-cap"], s["popularity-prior"], ledger)

    def set_prior(self, log_popularity) -> None:
        self.model.set_prior(log_popularity)

    def train(self, state: dict, ledger: PrivacyLedger, planned_rounds: int, progress=None) -> tuple[dict, dict]:
        """One round of local training: (new state, metrics with ``refused`` 0).

        The site refuses the round, and returns ``state`` untouched with ``refused`` 1 and
        nothing spent, when the round would take it past its budget or when it has fewer
        users than one expected DP batch (its update would be noise).
        """
        s = self.settings
        try:
            new_state, metrics = train_local(
                self.model, state, self.train_rows(), s.train, s.privacy,
                ledger=ledger, planned_steps=planned_rounds * s.train.local_steps, progress=progress,
            )
        except (BudgetExhausted, TooFewUsers) as why:
            return state, {"num-examples": 0, "steps": 0, "train_loss": 0.0, "seconds": 0.0, "refused": 1, "reason": str(why)}
        return new_state, metrics | {"refused": 0}

    def evaluate(self, state: dict) -> dict:
        from .adapter import load_trainable_state

        load_trainable_state(self.model, state)
        return evaluate(self.model, self.valid_rows(), resolve_device(self.settings.train.device))

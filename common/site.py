"""What a partner site does, independent of Flower: find its users, train a round
under its own privacy ledger, evaluate on its own validation users.

Who owns what: a :class:`SiteHost` owns the sites it opened and the one model they take
turns on; :data:`PROCESS_SITES` is the process's (a Ray actor serves messages for any
simulated site, so its sites keep their rows, lower-layer states included, across rounds
and the model is built once). The central evaluator builds and owns its own model (:func:`build_model`);
nothing mutable is shared between the two.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .config import Settings
from .data import DataSpec, Interactions, Split, leave_one_out, load
from .encoder import resolve_model_path
from .examples import EvalRows, evaluation_rows, training_rows
from .ledger import PrivacyLedger
from .model import Recommender
from .privacy import BudgetExhausted, PrivacySettings, TooFewUsers
from .site_cache import SiteCache, model_files
from .training import evaluate, resolve_device, train_local, with_lower_states


@functools.lru_cache(maxsize=2)
def dataset(spec: DataSpec) -> tuple[Interactions, Split]:
    """Load and split once per process; read-only: every caller gets the same objects."""
    data = load(spec)
    return data, leave_one_out(data)


def build_model(settings: Settings, data: Interactions) -> Recommender:
    """A fresh model on the run's device. Seeded: every site and the server build the same
    frozen weights (FFA-LoRA's A included), so only the trainable state needs to travel.

    Example::

        model = build_model(settings, data)  # the bank comes from the on-disk cache (common/bank.py)
    """
    torch.manual_seed(settings.train.seed)
    return Recommender.build(settings.model, list(data.catalogue.texts)).to(resolve_device(settings.train.device))


def site_users(settings: Settings, data: Interactions, site: int, num_sites: int) -> np.ndarray:
    """The users of simulated site ``site`` out of ``num_sites``."""
    return _partition(settings, data, num_sites)[site]


def _partition(settings: Settings, data: Interactions, num_sites: int) -> list[np.ndarray]:
    from .partition import partition_users  # flwr-datasets: only simulated sites partition

    return partition_users(data, num_sites, settings.split.partition, settings.split.partition_column,
                           settings.split.dirichlet_alpha, settings.run.seed)


class SiteHost:
    """The sites one process serves, reused across messages, and the model they share.

    Sharing one model between a host's sites is safe because every request loads the
    global state (and the prior) into it before use; the host never hands it to anyone
    else. Thread-safe: Flower may run messages of one process concurrently.

    >>> SiteHost().sites
    {}
    """

    def __init__(self):
        self.sites: dict[tuple, Site] = {}
        self._models: dict[tuple, Recommender] = {}
        self._partitions: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def open(self, settings: Settings, site: int, num_sites: int, spec: DataSpec | None = None,
             cache: SiteCache | None = None) -> Site:
        """Simulation (``spec`` None: partition the run's dataset) or deployment (``spec``:
        the site's own files; all their users are the site's; ``cache``: where the rows
        derived from them are kept between messages)."""
        key = (json.dumps(settings.as_dict(), sort_keys=True, default=str), site, num_sites, spec)
        with self._lock:
            if key not in self.sites:
                data, split = dataset(spec or settings.data)
                if spec:
                    users = np.arange(len(data.user_ids))
                else:
                    part = (data.fingerprint(), num_sites, settings.split.partition, settings.split.partition_column,
                            settings.split.dirichlet_alpha, settings.run.seed)
                    if part not in self._partitions:
                        self._partitions[part] = _partition(settings, data, num_sites)
                    users = self._partitions[part][site]
                model_key = (settings.model, data.fingerprint())
                if model_key not in self._models:
                    self._models[model_key] = build_model(settings, data)
                self.sites[key] = Site(f"site-{site}", settings, data, split, users, self._models[model_key], cache)
            return self.sites[key]


@dataclass
class Site:
    """One site's data, rows and model, reused across rounds."""

    name: str
    settings: Settings
    data: Interactions
    split: Split
    users: np.ndarray
    model: Recommender
    cache: SiteCache | None = None  # deployment: rows kept on the site's disk across messages
    _train_rows: torch.utils.data.TensorDataset | None = None
    _valid_rows: EvalRows | None = None

    @classmethod
    def open(cls, settings: Settings, site: int, num_sites: int, spec: DataSpec | None = None,
             cache: SiteCache | None = None) -> Site:
        """This process's site ``site`` (:data:`PROCESS_SITES`, :meth:`SiteHost.open`)."""
        return PROCESS_SITES.open(settings, site, num_sites, spec, cache)

    def _rows(self, which: str, compute) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return compute()
        m, s = self.settings.model, self.settings
        key = {"which": which, "data": self.data.fingerprint(self.users), "catalogue": self.data.catalogue.fingerprint(),
               "encoder": model_files(resolve_model_path(m.model)), "model": repr(m), "targets": s.train.targets_per_user}
        return self.cache.get_or_compute(key, compute)

    def train_rows(self):
        if self._train_rows is None:
            m = self.settings.model

            def compute() -> dict[str, torch.Tensor]:
                rows = training_rows(self.data.catalogue, self.split, self.users, self.model.tokenizer,
                                     m.max_tokens, m.max_history, self.settings.train.targets_per_user)
                return {"rows": list(with_lower_states(self.model, rows).tensors)}

            self._train_rows = torch.utils.data.TensorDataset(*self._rows("train", compute)["rows"])
        return self._train_rows

    def valid_rows(self) -> EvalRows:
        if self._valid_rows is None:
            m = self.settings.model

            def compute() -> dict[str, torch.Tensor]:
                rows = evaluation_rows(self.data.catalogue, self.split, self.users, self.model.tokenizer,
                                       m.max_tokens, m.max_history, "valid")
                return {"rows": list(with_lower_states(self.model, rows.dataset).tensors),
                        "exclude": [torch.as_tensor(e) for e in rows.exclude]}

            found = self._rows("valid", compute)
            self._valid_rows = EvalRows(torch.utils.data.TensorDataset(*found["rows"]), [e.numpy() for e in found["exclude"]])
        return self._valid_rows

    def release_counts(self, ledger: PrivacyLedger, privacy: PrivacySettings) -> np.ndarray:
        """This site's item counts for the popularity prior: DP-noised and charged to ``ledger``
        under DP, exact only when the site's policy granted a non-private run."""
        from .prior import release_counts

        s = self.settings
        if not privacy.private or not privacy.noise:  # exact, capped counts (noise off: the audit's control)
            return release_counts(self.split, self.users, s.prior.cap, s.prior.share, None)
        return release_counts(self.split, self.users, s.prior.cap, s.prior.share, ledger, privacy.epsilon)

    def set_prior(self, log_popularity) -> None:
        self.model.set_prior(log_popularity)

    def train(
        self, state: dict, ledger: PrivacyLedger, privacy: PrivacySettings, planned_rounds: int, progress=None
    ) -> tuple[dict, dict]:
        """One round of local training under ``privacy`` (what the site's policy granted):
        (new state, metrics with ``refused`` 0). ``planned_rounds``: rounds left in the run,
        this one included (the noise is calibrated once for them).

        The site refuses the round, and returns ``state`` untouched with ``refused`` 1 and
        nothing spent, when the round would take it past its budget or when it has fewer
        users than one expected DP batch (its update would be noise).
        """
        s = self.settings
        try:
            new_state, metrics = train_local(
                self.model, state, self.train_rows(), s.train, privacy,
                ledger=ledger, planned_steps=planned_rounds * s.train.local_steps, progress=progress,
            )
        except (BudgetExhausted, TooFewUsers) as why:
            return state, {"num-examples": 0, "steps": 0, "train_loss": 0.0, "seconds": 0.0, "refused": 1, "reason": str(why)}
        return new_state, metrics | {"refused": 0}

    def evaluate(self, state: dict) -> dict:
        from .adapter import load_trainable_state

        load_trainable_state(self.model, state)
        return evaluate(self.model, self.valid_rows(), resolve_device(self.settings.train.device))


# The sites this process serves: a Ray actor's or a site worker's, reused across messages.
# Only sites use it; the central evaluator and the baselines' pooled models are built apart.
PROCESS_SITES = SiteHost()

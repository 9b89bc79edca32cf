"""Central evaluation: every user's (or a seeded sample's) held-out item, full ranking,
the metrics of the README. Shared by the ServerApp, the baselines and ``common.recommend``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .adapter import load_trainable_state, trainable_state
from .config import Settings
from .examples import EvalRows, evaluation_rows, target_rows
from .site import build_model, dataset
from .training import rank_of_targets, rankable_items, ranking_metrics, resolve_device, with_lower_states


class HeldOutUsers:
    """Who central evaluation scores and on what: the evaluated users (every user, or a seeded
    sample), each split's held-out items and excluded histories (``targets``, rows without
    text), how many items each is ranked among, the cold-start mask, and the metrics of ranks.

    Needs no model: a scorer that reads only the held-out items (the popularity baseline)
    ranks ``targets`` with :func:`common.training.rank_of_targets` under the same rule
    (exclusions, ties) as the model, without the encoder's lower-layer states of every user.

    Example::

        held = HeldOutUsers(settings)
        held.metrics({w: rank_of_targets(scorer, rows, "cpu") for w, rows in held.targets.items()})
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.data, self.split = dataset(settings.data)
        users = np.arange(len(self.data.user_ids))
        if settings.run.eval_exclude_prefix:  # the privacy audit's canaries are no one's utility
            users = np.array([u for u in users if not self.data.user_ids[u].startswith(settings.run.eval_exclude_prefix)])
        n = settings.run.eval_users
        if n and n < len(users):
            users = np.sort(np.random.default_rng(settings.run.seed).choice(users, n, replace=False))
        self.users = users
        self.targets = {which: target_rows(self.split, users, which) for which in ("valid", "test")}
        self.rankable = {which: rankable_items(rows, len(self.data.catalogue)) for which, rows in self.targets.items()}
        self.cold = self._cold_start_mask()

    def _cold_start_mask(self) -> np.ndarray:
        seen = np.zeros(len(self.data.catalogue), dtype=bool)
        for seq in self.split.train:
            seen[seq] = True
        return ~seen[self.split.test[self.users]]

    def metrics(self, ranked: dict[str, tuple[np.ndarray, float]]) -> dict[str, float]:
        """``valid/…``, ``test/…`` and ``cold/…`` metrics from each split's (ranks, loss), ranks in
        ``self.users`` order. ``cold/…``: test users whose test item is in no training history."""
        out = {}
        for which, (ranks, loss) in ranked.items():
            scores = ranking_metrics(ranks, rankable=self.rankable[which]) | {"loss": loss, "users": int(len(ranks))}
            for k, v in scores.items():
                out[f"{which}/{k}"] = v
        cold = ranked["test"][0][self.cold]
        cold_metrics = ranking_metrics(cold, rankable=self.rankable["test"][self.cold])
        out |= {f"cold/{k}": v for k, v in cold_metrics.items()} | {"cold/users": int(self.cold.sum())}
        return out


class CentralEvaluator(HeldOutUsers):
    """Scores every user's (or a seeded sample of users') held-out item, full ranking.

    In simulation the server may read every user's split (a simulation convenience,
    stated in docs/DESIGN.md, "Evaluation protocol"); in deployment it evaluates on a server-side dataset.
    """

    def __init__(self, settings: Settings, model=None, on_phase: Callable[[str], object] | None = None):
        """``model``: score this model (e.g. one restored from a run folder) instead of one
        built here; either way the evaluator is its only user. ``on_phase(text)``: told as
        each slow step starts (the ServerApp's progress events)."""
        self._on_phase = on_phase = on_phase or (lambda _: None)
        on_phase("loading data")
        super().__init__(settings)
        if model is None:
            on_phase("building the model and the item bank")
        self.model = build_model(settings, self.data) if model is None else model
        # what a run starts from, kept apart from what is loaded into the model later
        # (a sweep's baselines train this model one after the other); the prior's weight
        # trains only once a prior is installed, so it is kept whether it trains now or not
        weight = self.model.prior_weight.weight.detach().cpu().numpy().copy()
        self._initial = trainable_state(self.model) | {"prior_weight.weight": weight}
        self.device = resolve_device(settings.train.device)
        self._encoded: dict[str, EvalRows] | None = None

    def encode(self) -> dict[str, EvalRows]:
        """Each split's rows with their frozen lower-layer states, encoded on the first call (the
        ServerApp has the sites count their items meanwhile) and kept."""
        if self._encoded is None:
            self._on_phase(f"encoding the {len(self.users)} evaluation users (validation and test)")
            self._encoded = {which: self._rows(which) for which in ("valid", "test")}
        return self._encoded

    @property
    def rows(self) -> dict[str, EvalRows]:
        """:meth:`encode`'s rows."""
        return self.encode()

    def _rows(self, which: str) -> EvalRows:
        m = self.settings.model
        rows = evaluation_rows(self.data.catalogue, self.split, self.users, self.model.tokenizer,
                               m.max_tokens, m.max_history, which)
        return EvalRows(with_lower_states(self.model, rows.dataset), rows.exclude)

    def initial_state(self) -> dict[str, np.ndarray]:
        """The untrained values of the parameters that train now (a prior installed since adds
        its weight), whatever state was loaded into the model since it was built."""
        return {k: self._initial[k].copy() for k in trainable_state(self.model)}

    def __call__(self, state: dict[str, np.ndarray]) -> dict[str, float]:
        """``valid/…`` and ``test/…`` metrics of ``state``; the unprefixed keys are test."""
        load_trainable_state(self.model, state)
        return self.metrics({which: rank_of_targets(self.model, rows, self.device) for which, rows in self.rows.items()})


def set_server_threads() -> None:
    """The server evaluates while sites wait: let it use the machine's cores."""
    import os

    torch.set_num_threads(max(1, os.cpu_count() or 1))

"""Baselines on the federated run's split and evaluation: ``popularity``, ``zeroshot``,
``centralized`` and ``local`` (docs/DESIGN.md, "Evaluation protocol"), and the library
models of simulations/library_baselines.py (``bpr``, ``als``, ``sasrec``).

Each function only assembles library code: the data, split, model and full-ranking
central evaluation are :class:`common.evaluation.CentralEvaluator`'s, training is
:func:`common.training.train_local`, and the files (``metrics.jsonl``,
``summary.json``, ``adapter/``) are written by :class:`server.recorder.RunRecorder`,
exactly as the ServerApp writes them.

Example::

    summary = run_baseline("popularity", {"dataset": "movietweetings"}, "runs/pop")
    summary["best_validation"]["ndcg@10"]
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.adapter import load_trainable_state
from common.config import ConfigError, Settings
from common.evaluation import CentralEvaluator, HeldOutUsers
from common.examples import EvalRows, training_rows
from common.ledger import PrivacyLedger
from common.prior import log_prior
from common.privacy import PrivacyError
from common.site import Site, site_users
from common.training import rank_of_targets, resolve_device, train_local, with_lower_states
from server.recorder import CHECKPOINT, RunRecorder
from simulations.library_baselines import LIBRARY_BASELINES, require, run_library_baseline

BASELINES = ("popularity", "zeroshot", "centralized", "local", *LIBRARY_BASELINES)
_EVALUATORS: dict[str, CentralEvaluator] = {}


class PopularityScorer(torch.nn.Module):
    """Scores every item by its training-interaction count; ties go to the lower item index.

    ``score_all`` has the model's interface, so the evaluation code is the model's own.
    """

    def __init__(self, counts: np.ndarray):
        super().__init__()
        n = len(counts)
        tie_break = 0.5 * (1.0 - np.arange(n) / max(n, 1))  # < 1: never reorders distinct counts
        self.register_buffer("scores", torch.as_tensor(counts + tie_break, dtype=torch.float64))

    def score_all(self, batch: dict) -> torch.Tensor:
        return self.scores.expand(batch["targets"].shape[0], -1).clone()


def subset(rows: EvalRows, index: np.ndarray) -> EvalRows:
    """The evaluation rows at positions ``index``."""
    idx = torch.as_tensor(index, dtype=torch.long)
    return EvalRows(TensorDataset(*(t[idx] for t in rows.dataset.tensors)), [rows.exclude[i] for i in index])


def routed_ranks(model, rows: EvalRows, owner: np.ndarray, states: list[dict], device,
                 priors: list[np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """Rank of each row's held-out item under its OWN site's model: row ``j`` is scored with
    ``states[owner[j]]`` (and that site's popularity prior). Returns (ranks in row order, mean loss)."""
    ranks = np.zeros(len(owner), dtype=np.int64)
    loss = 0.0
    for i, state in enumerate(states):
        idx = np.flatnonzero(owner == i)
        if len(idx) == 0:
            continue
        if priors is not None:
            model.set_prior(priors[i])
        load_trainable_state(model, state)
        ranks[idx], site_loss = rank_of_targets(model, subset(rows, idx), device)
        loss += site_loss * len(idx)
    if (owner < 0).any():
        raise ValueError(f"{int((owner < 0).sum())} evaluated user(s) belong to no site")
    return ranks, loss / max(len(owner), 1)


def _clear(out: str | Path) -> None:
    for name in ("metrics.jsonl", "summary.json", CHECKPOINT, "adapter"):  # a baseline always starts afresh
        path = Path(out) / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _open(settings: Settings, out: str | Path) -> tuple[CentralEvaluator, RunRecorder]:
    _clear(out)
    # One evaluator per process and evaluation-relevant settings: a sweep's baseline cells
    # share the cached rows (the privacy and output settings do not change them).
    key = json.dumps({k: v for k, v in settings.as_dict().items() if k not in ("epsilon", "out-dir", "ledger-dir")},
                     sort_keys=True, default=str)
    if key not in _EVALUATORS:
        _EVALUATORS.clear()
        _EVALUATORS[key] = CentralEvaluator(settings)
    evaluator = _EVALUATORS[key]
    # The evaluator owns its model and a sweep's baselines train it in turn; each starts from
    # evaluator.initial_state(), the model as built, with no prior left from another baseline.
    evaluator.model.set_prior(np.zeros(len(evaluator.data.catalogue)))
    return evaluator, RunRecorder.open(out, settings)


def _install_prior(settings: Settings, evaluator: CentralEvaluator, users, ledger) -> dict:
    """The popularity prior from ``users``' counts (DP-noised and charged to ``ledger`` when
    private); returns the initial state, which now includes the prior's weight."""
    from common.prior import release_counts

    counts = release_counts(evaluator.split, users, settings.prior.cap, settings.prior.share, ledger)
    evaluator.model.set_prior(log_prior(counts))
    return evaluator.initial_state() | {"prior_weight.weight": np.array(1.0, dtype=np.float32)}


def _round_seed(settings: Settings, rnd: int, site: int = 0):
    """A fresh sampling seed per round and site (a fixed one would draw the same batches every round)."""
    return replace(settings.train, seed=settings.train.seed * 1_000_003 + 1_009 * site + rnd)


def popularity(settings: Settings, out: str | Path) -> dict:
    """Most popular training items (counts over every user's training items), full ranking.

    Ranks only the held-out items (:class:`HeldOutUsers`): no model, no lower-layer states."""
    _clear(out)
    held = HeldOutUsers(settings)
    recorder = RunRecorder.open(out, settings)
    device = resolve_device(settings.train.device)
    scorer = PopularityScorer(held.split.popularity()).to(device)
    ranked = {which: rank_of_targets(scorer, rows, device) for which, rows in held.targets.items()}
    recorder.round_done(0, held.metrics(ranked), {}, None, {})
    return recorder.finish(None, {}, {"method": "popularity"})


def zeroshot(settings: Settings, out: str | Path) -> dict:
    """The pretrained encoder with the untrained head (zero item bias, LoRA B = 0): no training."""
    evaluator, recorder = _open(settings, out)
    state = evaluator.initial_state()
    recorder.round_done(0, evaluator(state), {}, evaluator.model, state)
    return recorder.finish(evaluator.model, state, {"method": "zeroshot"})


def centralized(settings: Settings, out: str | Path) -> dict:
    """The same model trained on every site's training rows pooled, evaluated after every
    round; DP over the pooled users at ``epsilon`` (non-private when epsilon = inf).

    A round is ``num-sites × local-steps`` steps: the gradient work the whole federation
    does in a round, so federated and centralised compare at equal compute, not with the
    pooled model trained on a tenth of the examples.
    """
    evaluator, recorder = _open(settings, out)
    model, p = evaluator.model, settings.privacy
    users = np.arange(len(evaluator.data.user_ids))
    m = settings.model
    rows = with_lower_states(model, training_rows(
        evaluator.data.catalogue, evaluator.split, users, model.tokenizer, m.max_tokens, m.max_history,
        settings.train.targets_per_user,
    ))
    ledger = PrivacyLedger.open(None, "pooled", p.epsilon, p.delta_for(len(users)), p.accountant)
    state = evaluator.initial_state()
    if settings.prior.share > 0:
        state = _install_prior(settings, evaluator, users, ledger if settings.private else None)
    recorder.round_done(0, evaluator(state), {}, model, state)
    steps = settings.num_sites * settings.train.local_steps
    for rnd in range(1, settings.rounds + 1):
        train = replace(_round_seed(settings, rnd), local_steps=steps)
        state, info = train_local(model, state, rows, train, p, ledger if settings.private else None, settings.rounds * steps)
        recorder.record_sites([{"site": "pooled", "epsilon": info["epsilon"], "delta": info["delta"], "steps": info["steps"],
                                "noise_multiplier": info["noise_multiplier"], "num-examples": len(users)}])
        recorder.round_done(rnd, evaluator(state), {"train_loss": info["train_loss"], "sites": 1}, model, state)
    return recorder.finish(model, state, {"method": "centralized"})


def local(settings: Settings, out: str | Path) -> dict:
    """Each site trains alone (its own ledger, same rounds × local-steps); every evaluated user
    is scored by their own site's model. A site too small to train under DP keeps the
    untrained model and is marked ``trained: false``."""
    evaluator, recorder = _open(settings, out)
    model, n = evaluator.model, settings.num_sites
    owner = np.full(len(evaluator.data.user_ids), -1)
    for site in range(n):
        owner[site_users(settings, evaluator.data, site, n)] = site
    owner = owner[evaluator.users]  # site of each evaluated user, in evaluation order
    initial = evaluator.initial_state()
    sites = [Site.open(settings, i, n) for i in range(n)]
    p = settings.privacy
    ledgers = [PrivacyLedger.open(None, s.name, p.epsilon, p.delta_for(len(s.users)), p.accountant) for s in sites]
    priors = None
    if settings.prior.share > 0:  # each site's own (DP) counts
        priors = [log_prior(s.release_counts(ledgers[i], p)) for i, s in enumerate(sites)]
        model.set_prior(priors[0])
        initial = initial | {"prior_weight.weight": np.array(1.0, dtype=np.float32)}
    states = [initial] * n
    trained = [True] * n

    def evaluate_all() -> dict:
        return evaluator.metrics({which: routed_ranks(model, rows, owner, states, evaluator.device, priors)
                                  for which, rows in evaluator.rows.items()})

    recorder.round_done(0, evaluate_all(), {}, model, initial)
    planned = settings.rounds * settings.train.local_steps
    for rnd in range(1, settings.rounds + 1):
        losses, reports = [], []
        for i, site in enumerate(sites):
            if not trained[i]:
                continue
            try:
                if priors is not None:
                    model.set_prior(priors[i])
                states[i], info = train_local(model, states[i], site.train_rows(), _round_seed(settings, rnd, i),
                                              settings.privacy, ledgers[i], planned)
            except PrivacyError as err:  # e.g. fewer users than one expected batch
                trained[i] = False
                reports.append({"site": i, "epsilon": 0.0, "trained": False, "reason": str(err)})
                continue
            losses.append(info["train_loss"])
            reports.append({"site": i, "epsilon": info["epsilon"], "delta": info["delta"], "trained": True,
                            "noise_multiplier": info["noise_multiplier"], "num-examples": len(site.users)})
        recorder.record_sites(reports)
        line = {"train_loss": float(np.mean(losses)) if losses else math.nan, "sites": len(losses)}
        recorder.round_done(rnd, evaluate_all(), line, model, states[0])
    # adapter/: site 0's model (one adapter per site would not fit the layout; all states differ)
    return recorder.finish(model, states[0], {"method": "local", "trained_sites": int(sum(trained))})


def run_baseline(name: str, config: dict, out: str | Path) -> dict:
    """Run baseline ``name`` with run-config ``config`` into ``out``; return its summary."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    if name in LIBRARY_BASELINES:
        require(name)  # a missing optional extra is the first thing to say
    settings = Settings.from_config(config)
    from simulations.simulate import check_inputs

    check_inputs(settings, in_child=False)  # this process loads the data next anyway
    if name in LIBRARY_BASELINES:
        return run_library_baseline(name, settings, out)
    return {"popularity": popularity, "zeroshot": zeroshot, "centralized": centralized, "local": local}[name](settings, out)

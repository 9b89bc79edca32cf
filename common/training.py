"""Local training (with or without user-level DP) and full-ranking evaluation.

One function, :func:`train_local`, serves the Flower client, the centralised and
local baselines and the benchmark: (model, adapter state, the site's user rows,
settings) -> (new adapter state, metrics).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .adapter import load_trainable_state, trainable_state
from .examples import EvalRows
from .ledger import PrivacyLedger
from .memory import ffn_row_bytes, release_freed_memory, rows_per_pass
from .privacy import BudgetExhausted, PrivacyError, PrivacySettings, TooFewUsers, calibrate_noise
from .settings import TrainSettings

KEYS = ("text", "mask", "history", "targets")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def as_batch(tensors, device) -> dict[str, torch.Tensor]:
    return {k: t.to(device) for k, t in zip(KEYS, tensors, strict=True)}


def with_lower_states(model, rows: TensorDataset) -> TensorDataset:
    """The same rows with token ids replaced by their cached frozen lower-layer states."""
    text, mask, *rest = rows.tensors
    states = model.lower_states(text, mask)
    release_freed_memory()  # the encoding's activations, hundreds of MB
    return TensorDataset(states, mask, *rest)


def _empty_batch(dataset: TensorDataset, device) -> dict[str, torch.Tensor]:
    """One padding row with no targets: zero loss, zero gradient.

    Poisson sampling can draw no user at all; the step must still happen (the
    accountant counts it and the noise is still added), so it runs on a row whose
    per-user gradient is exactly zero.
    """
    text, mask, history, targets = (t[:1].clone() for t in dataset.tensors)
    mask.zero_()
    mask[:, 0] = 1
    history.fill_(-1)
    targets.fill_(-1)
    return as_batch((text, mask, history, targets), device)


def train_local(
    model: torch.nn.Module,
    state: dict[str, np.ndarray] | None,
    rows: TensorDataset,
    train: TrainSettings,
    privacy: PrivacySettings,
    ledger: PrivacyLedger | None = None,
    planned_steps: int | None = None,
    progress=None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Train the model's trainable parameters on ``rows`` (one row per user).

    Under DP (finite ``privacy.epsilon``) the noise multiplier is calibrated once from the
    planned schedule and kept in the ledger; the round is refused (:class:`BudgetExhausted`)
    if it would push the ledger past its budget.

    Example::

        new_state, metrics = train_local(model, state, rows, TrainSettings(), PrivacySettings(epsilon=8))
        metrics["epsilon"]  # at most 8
    """
    device = resolve_device(train.device)
    model.to(device)
    if state is not None:
        load_trainable_state(model, state)
    # from_pretrained-style models come back in eval mode and Opacus checks only the
    # root's flag: without this, dropout would silently stay off.
    model.train()
    n_users = len(rows)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PrivacyError("nothing to train: every train-* setting is off")
    optimizer = torch.optim.Adam(params, lr=train.learning_rate)
    if privacy.private:
        # Which users a Poisson batch holds, and the noise, must be secret and fresh every
        # round: a configured seed would let anyone replay both, and the subsampling
        # amplification and the Gaussian noise would protect nothing. DP runs are therefore
        # not bit-reproducible, by design.
        generator = torch.Generator()
        generator.seed()
        torch.seed()
    else:
        # A different (reproducible) shuffle every round; the ledger counts the rounds.
        generator = torch.Generator().manual_seed(train.seed * 1_000_003 + (ledger.rounds if ledger else 0))
    steps = train.local_steps
    metrics: dict = {"num-examples": n_users, "steps": steps}

    if privacy.private:
        if n_users < privacy.expected_batch:
            raise TooFewUsers(
                f"the site has {n_users} users, fewer than one expected batch ({privacy.expected_batch}); "
                "lower expected-batch or join more users"
            )
        # Opacus' Poisson loader samples at 1 / (batches per epoch); account with that rate.
        sample_rate = 1.0 / math.ceil(n_users / privacy.expected_batch)
        if ledger is None:
            ledger = PrivacyLedger.open(None, "memory", privacy.epsilon, privacy.delta_for(n_users), privacy.accountant)
        target = min(privacy.epsilon, ledger.budget)  # the run may ask for less than the site allows
        if privacy.noise and ledger.noise_multiplier is None:
            ledger.noise_multiplier = calibrate_noise(
                target, ledger.delta, sample_rate, planned_steps or steps, ledger.history, ledger.accountant
            )
        sigma = ledger.noise_multiplier if privacy.noise else 0.0  # 0: the audit's control
        after = ledger.check(sigma, sample_rate, steps) if privacy.noise else 0.0  # raises before touching data
        if after > target:
            raise BudgetExhausted(f"the run's ε={target:g} is reached: the next round would make it {after:.4g}")
        loader = DataLoader(rows, batch_size=privacy.expected_batch, generator=generator)
        module, optimizer, loader, engine = make_private(model, optimizer, loader, sigma, privacy, train)
    else:
        module, engine = model, None
        loader = DataLoader(rows, batch_size=min(privacy.expected_batch, n_users), shuffle=True, generator=generator)

    losses = []
    start = time.perf_counter()
    batches = cycle(loader)
    for step in range(steps):
        tensors = next(batches)
        if len(tensors[0]) == 0:
            batch = _empty_batch(rows, device)
            loss = module(**batch).sum() * 0.0
        else:
            batch = as_batch(tensors, device)
            loss = module(**batch).mean()
            losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, steps, losses[-1] if losses else math.nan)
    metrics["seconds"] = time.perf_counter() - start
    metrics["train_loss"] = float(np.mean(losses)) if losses else math.nan

    if engine is not None:
        if privacy.noise:
            ledger.record(engine.accountant.history)
        else:  # no noise, no finite ε to charge; the next round must still draw other batches
            ledger.count_round()
        metrics |= {
            "epsilon": ledger.epsilon() if privacy.noise else math.inf,
            "delta": ledger.delta,
            "noise_multiplier": sigma,
            "sample_rate": sample_rate,
        }
        module._close()  # removes Opacus' hooks so the model can be wrapped again next round
    else:
        if ledger is not None:
            ledger.count_round()
        metrics |= {"epsilon": 0.0, "delta": 0.0, "noise_multiplier": 0.0, "sample_rate": 0.0}
    release_freed_memory()  # the steps' activations and per-sample gradients
    return trainable_state(model), metrics


def make_private(model, optimizer, loader, sigma, privacy: PrivacySettings, train: TrainSettings, poisson: bool = True):
    """Opacus' wrapping as training uses it: (module, optimizer, loader, engine).

    ``poisson=False`` keeps the loader's fixed batches (the step benchmark compares DP and
    non-DP steps on identical batches); training always samples Poisson batches.
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=privacy.accountant)
    module, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm,
        poisson_sampling=poisson,
        grad_sample_mode=train.grad_sample_mode,
    )
    return module, optimizer, loader, engine


def cycle(loader):
    """Batches from ``loader`` for ever (local steps need not align with epochs)."""
    while True:
        yield from loader


# -- evaluation ---------------------------------------------------------------------------


def _row_bytes(model, rows: EvalRows) -> int:
    """Bytes of scoring's largest activation per row: the top layer's (T, 4H) FFN over cached
    states, or the (N,) scores with their copies (a scorer without a bank: 1 MB)."""
    bank = getattr(model, "bank", None)
    if bank is None:
        return 2**20
    states = rows.dataset.tensors[0]
    ffn = ffn_row_bytes(states.shape[1], states.shape[2]) if states.dim() == 3 else 0
    return max(ffn, 3 * 4 * bank.shape[0])


@torch.no_grad()
def rank_of_targets(model, rows: EvalRows, device, batch_size: int | None = None) -> tuple[np.ndarray, float]:
    """0-based rank of each user's held-out item among all items not in their history,
    and the mean cross-entropy of that item (validation loss).

    A user whose scores are not all finite (a diverged model) counts as ranked last among
    their rankable items (a miss at every cut-off below that, AUC 0): a NaN compares false
    with everything and would otherwise rank first."""
    model.eval()
    ranks, losses = [], []
    loader = DataLoader(rows.dataset, batch_size=batch_size or rows_per_pass(_row_bytes(model, rows), device))
    offset = 0
    for tensors in loader:
        batch = as_batch(tensors, device)
        scores = model.score_all(batch)  # (B, N)
        losses.append(torch.nn.functional.cross_entropy(scores, batch["targets"][:, 0], reduction="sum").item())
        target = batch["targets"][:, 0]
        target_score = scores.gather(1, target[:, None])  # (B, 1)
        diverged = ~torch.isfinite(scores).all(1)  # before history masking adds its own -inf
        seen = rows.exclude[offset : offset + len(target)]  # history items are excluded from the ranking
        users = torch.repeat_interleave(torch.arange(len(seen)), torch.as_tensor([len(e) for e in seen]))
        excluded = torch.zeros_like(scores, dtype=torch.bool)  # (B, N)
        excluded[users.to(device), torch.as_tensor(np.concatenate(seen), dtype=torch.long, device=device)] = True
        excluded[torch.arange(len(target), device=device), target] = False  # the held-out item itself stays
        scores.masked_fill_(excluded, -math.inf)
        last = scores.shape[1] - 1 - excluded.sum(1)
        rank = torch.where(diverged, last, (scores > target_score).sum(1))
        ranks.append(rank.cpu().numpy())
        offset += scores.shape[0]
    model.train()
    release_freed_memory()  # the batches' (B, N) scores and masks
    n = max(offset, 1)
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64), sum(losses) / n


def ranking_metrics(ranks: np.ndarray, ks=(10, 20), rankable=None) -> dict[str, float]:
    """HR@k, NDCG@k = 1/log2(rank+2), MRR@k = 1/(rank+1) and recall@k, ranks counted from 0;
    with ``rankable``, also the full-ranking ``auc``.

    Leave-one-out holds out ONE item per user, so recall@k (held-out items in the top k over
    held-out items) equals HR@k; it is reported under both names for users of other toolkits.
    ``rankable`` is the number of items each held-out item was ranked among (a number, or one
    per user: the catalogue less the user's excluded history, :func:`rankable_items`). A
    user's AUC is 1 − rank / (rankable − 1), the share of the other rankable items scored
    below the held-out one; ``auc`` is its mean over users.

    >>> m = ranking_metrics(np.array([0, 1, 30]), ks=(10,), rankable=101)
    >>> m["hr@10"], m["recall@10"], round(m["auc"], 4)
    (0.6666666666666666, 0.6666666666666666, 0.8967)
    """
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0).mean()) if len(ranks) else 0.0
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1), 0.0).mean()) if len(ranks) else 0.0
        out[f"recall@{k}"] = out[f"hr@{k}"]
    if rankable is not None:
        rankable = np.broadcast_to(np.asarray(rankable), np.shape(ranks))
        if (ranks >= rankable).any():
            raise ValueError("a rank is not below the number of rankable items")
        # one rankable item (nothing to compare with) counts as ranked on top
        out["auc"] = float((1.0 - ranks / np.maximum(rankable - 1, 1)).mean()) if len(ranks) else 0.0
    return out


def rankable_items(rows: EvalRows, num_items: int) -> np.ndarray:
    """How many items each row's held-out item is ranked among by :func:`rank_of_targets`:
    the catalogue less the row's excluded history (the held-out item itself always stays in).

    >>> rows = EvalRows(TensorDataset(torch.tensor([[3], [1]])), [np.array([1, 2]), np.array([1, 2, 2])])
    >>> rankable_items(rows, 10).tolist()
    [8, 9]
    """
    targets = rows.dataset.tensors[-1][:, 0].numpy()
    counts = [num_items - np.setdiff1d(seen, [t]).size for seen, t in zip(rows.exclude, targets, strict=True)]
    return np.array(counts, dtype=np.int64)


def evaluate(model, rows: EvalRows, device="cpu", ks=(10, 20)) -> dict[str, float]:
    """Full-ranking metrics over ``rows`` plus ``loss`` and ``users``."""
    ranks, loss = rank_of_targets(model, rows, torch.device(device) if isinstance(device, str) else device)
    return ranking_metrics(ranks, ks) | {"loss": loss, "users": int(len(ranks))}


__all__ = ["TrainSettings", "train_local", "evaluate", "ranking_metrics", "BudgetExhausted", "resolve_device"]

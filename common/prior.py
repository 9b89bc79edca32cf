"""A differentially private popularity prior: the base the model learns a residual over.

With ~1,000 users per federation, DP noise swamps every extra trainable parameter, and
most-popular is a strong baseline (docs/DESIGN.md, "Why this shape"). Item counts are cheap to
release privately: each user contributes a 0/1 vector over their (at most ``cap``) most
recent training items, so one user moves the count vector by at most √cap in L2, and
one Gaussian release with noise multiplier σ (std σ√cap) is one step of the sampled
Gaussian mechanism with q = 1 — an entry ``(σ, 1.0, 1)`` in the site's ledger, composed
with its DP-SGD steps by the same accountant.
"""

from __future__ import annotations

import numpy as np

from .data import Split
from .ledger import PrivacyLedger
from .privacy import BudgetExhausted, calibrate_noise


def count_noise(share: float, ledger: PrivacyLedger, ceiling: float | None = None) -> float:
    """Noise multiplier for one count release that spends ``share`` of what is left below
    ``ceiling`` (the run's ε, at most the ledger's budget): a later run at a raised budget
    pays again from what it has left; a fresh site spends ``share × budget``.

    >>> ledger = PrivacyLedger.open(None, "site-0", budget=8.0, delta=1e-4)
    >>> round(count_noise(0.1, ledger), 2) > 1
    True
    """
    ceiling = ledger.budget if ceiling is None else min(ceiling, ledger.budget)
    spent = ledger.epsilon()
    if spent >= ceiling:
        raise BudgetExhausted(f"site budget ε={ceiling:g} is spent: no room for the popularity prior's count release")
    target = spent + share * (ceiling - spent)
    return calibrate_noise(target, ledger.delta, 1.0, 1, ledger.history, ledger.accountant)


def item_counts(split: Split, users, cap: int) -> np.ndarray:
    """Per-item number of users among ``users`` with the item in their last ``cap`` training items."""
    counts = np.zeros(split.num_items, dtype=np.float64)
    for u in users:
        recent = np.unique(split.train[u][-cap:])  # 0/1 per item: a user counts once
        counts[recent] += 1.0
    return counts


def noisy_item_counts(split: Split, users, cap: int, noise_multiplier: float) -> np.ndarray:
    """:func:`item_counts` plus Gaussian noise of std ``noise_multiplier × √cap``.

    The noise comes from fresh OS entropy, never from a configured seed: noise anyone
    can regenerate protects nothing.
    """
    counts = item_counts(split, users, cap)
    if noise_multiplier > 0:
        rng = np.random.default_rng()
        counts += rng.normal(0.0, noise_multiplier * np.sqrt(cap), size=counts.shape)
    return counts


def release_counts(
    split: Split, users, cap: int, share: float, ledger: PrivacyLedger | None, ceiling: float | None = None
) -> np.ndarray:
    """The site's count release: charged to its ledger before anything leaves the site.

    ``ledger`` None means a non-private run the site's policy allows: exact counts.
    """
    if ledger is None:
        return item_counts(split, users, cap)
    sigma = count_noise(share, ledger, ceiling)
    ledger.charge("counts", [(sigma, 1.0, 1)])  # checked against the budget, persisted, then released
    return noisy_item_counts(split, users, cap, sigma)


def log_prior(counts: np.ndarray) -> np.ndarray:
    """Log-popularity, centred: noisy negatives clip to zero, +1 smooths unseen items.

    >>> [round(float(v), 2) for v in log_prior(np.array([0.0, 3.0, -2.0]))]
    [-0.46, 0.92, -0.46]
    """
    logp = np.log1p(np.clip(counts, 0.0, None))
    return (logp - logp.mean()).astype(np.float32)

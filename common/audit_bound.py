"""Empirical privacy from canary scores: the one-run ε lower bound of Steinke, Nasr and
Jagielski ("Privacy Auditing with One (1) Training Run", NeurIPS 2023), AUROC, and the
true-positive rate at a low false-positive rate.

The game: m canaries, each included in the training data independently with probability
½. The attack scores every canary; it guesses "in" for the k highest scores and "out" for
the k lowest (r = 2k guesses) and is right v times. If training is (ε, δ)-DP for each
canary, the paper's Theorem 5.2 bounds the chance of v or more correct guesses by

    P[W ≥ v] + 2mδ · max_{1≤i≤v} P[v−i ≤ W < v] / i,    W ~ Binomial(r, e^ε / (1 + e^ε)),

and the lower bound is the largest ε that this rejects at the chosen confidence. The
paper reports the best k; picking k after seeing the scores is paid for here: each k of
the fixed grid :data:`K_FRACTIONS` is tested at (1 − confidence) / len(grid) (Bonferroni),
so the maximum over the grid is a lower bound at the stated confidence.

This module is plain numpy (no scipy, no jax): the binomial tails are summed in log space.

>>> round(epsilon_for_counts(m=1000, guesses=1000, correct=1000, delta=0.0), 3)
5.809
"""

from __future__ import annotations

import math

import numpy as np

# k (guesses per side) as fractions of m/2; the grid is fixed before the scores are seen.
K_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
EPSILON_CAP = 64.0  # beyond this a bound is "as large as the canaries can show"


def _tail(guesses: int, epsilon: float) -> np.ndarray:
    """``t[j] = P[W ≥ j]`` for j = 0..guesses+1, W ~ Binomial(guesses, e^ε/(1+e^ε))."""
    k = np.arange(guesses + 1)
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, guesses + 1)))))
    log_q = -math.log1p(math.exp(-epsilon))  # log e^ε/(1+e^ε), stable for large ε
    log_1q = -epsilon + log_q  # log 1/(1+e^ε)
    log_pmf = log_fact[guesses] - log_fact[k] - log_fact[guesses - k] + k * log_q + (guesses - k) * log_1q
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    tail = np.cumsum(pmf[::-1])[::-1]
    return np.append(np.minimum(tail, 1.0), 0.0)


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Largest chance that an (ε, δ)-DP training run lets ``guesses`` guesses over ``m``
    canaries be right ``correct`` times or more (Steinke et al., Theorem 5.2).

    >>> round(p_value(100, 10, 10, epsilon=0.0, delta=0.0), 6)  # ten coin flips all right: 1/1024
    0.000977
    """
    if correct <= 0:
        return 1.0
    tail = _tail(guesses, epsilon)
    beta = float(tail[correct])
    if delta == 0:
        return beta
    i = np.arange(1, correct + 1)
    alpha = float(np.max((tail[correct - i] - beta) / i))
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_for_counts(m: int, guesses: int, correct: int, delta: float, significance: float = 0.05) -> float:
    """The largest ε rejected at ``significance`` when ``correct`` of ``guesses`` guesses over
    ``m`` canaries were right (0 when even ε = 0 is not rejected).

    >>> epsilon_for_counts(1000, 100, 50, delta=1e-5)
    0.0
    """
    def rejected(eps: float) -> bool:
        return p_value(m, guesses, correct, eps, delta) <= significance

    if guesses == 0 or not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # p grows with ε: find an ε that is not rejected
        low, high = high, 2 * high
        if high > EPSILON_CAP:
            return EPSILON_CAP
    while high - low > 1e-7:
        mid = (low + high) / 2
        low, high = (mid, high) if rejected(mid) else (low, mid)
    return low


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Canary indices from lowest to highest score; ties in a fixed random order, so the
    canaries' order in the input can never leak into the guesses."""
    jitter = np.random.default_rng(0).random(len(scores))
    return np.lexsort((jitter, scores))


def epsilon_lower_bound(scores, included, delta: float, confidence: float = 0.95) -> dict:
    """One-run ε lower bound from every canary's score and whether it was included.

    Returns ``epsilon`` (the bound), the ``k`` (guesses per side) that gave it, ``guesses``,
    ``correct`` and the per-test ``significance`` after the Bonferroni correction.

    >>> scores = np.r_[np.zeros(500), np.ones(500)]            # perfectly separated
    >>> included = scores > 0
    >>> round(epsilon_lower_bound(scores, included, delta=0.0)["epsilon"], 2)
    5.28
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and included must be 1-D arrays of the same length")
    m = len(scores)
    order = _ranked(scores)
    ks = sorted({max(1, int(f * (m // 2))) for f in K_FRACTIONS if m >= 2})
    significance = (1.0 - confidence) / max(len(ks), 1)
    best = {"epsilon": 0.0, "k": 0, "guesses": 0, "correct": 0, "significance": significance}
    for k in ks:
        correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
        eps = epsilon_for_counts(m, 2 * k, correct, delta, significance)
        if eps > best["epsilon"]:
            best.update(epsilon=eps, k=k, guesses=2 * k, correct=correct)
    return best


def auroc(scores, included) -> float:
    """Area under the ROC curve of "in if the score is high" (ties count one half).

    >>> auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    pos, neg = scores[included], scores[~included]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def tpr_at_fpr(scores, included, fpr: float = 0.01) -> float:
    """Share of included canaries scoring above a threshold that at most ``fpr`` of the
    excluded ones pass (no randomised thresholds: with fewer than 1/fpr excluded canaries
    the threshold is their highest score).

    >>> tpr_at_fpr([0, 1, 2, 3, 4, 5], [False, False, False, True, True, True], fpr=0.01)
    1.0
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    pos, neg = scores[included], np.sort(scores[~included])[::-1]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    allowed = int(math.floor(fpr * len(neg) + 1e-9))  # false positives the rate allows
    threshold = neg[allowed] if allowed < len(neg) else -math.inf
    return float((pos > threshold).mean())

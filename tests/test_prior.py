"""The DP popularity prior: exact counts, calibrated noise, charged to the site's ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.data import leave_one_out
from common.ledger import PrivacyLedger
from common.prior import count_noise, item_counts, log_prior, noisy_item_counts, release_counts
from common.privacy import BudgetExhausted, calibrate_noise, epsilon_spent


@pytest.fixture
def split(toy):
    return leave_one_out(toy)


def test_counts_are_users_per_item_over_their_most_recent_training_items(split):
    users = range(len(split.train))
    counts = item_counts(split, users, cap=2)
    expected = np.zeros(split.num_items)
    for u in users:
        for item in set(split.train[u][-2:].tolist()):
            expected[item] += 1
    np.testing.assert_array_equal(counts, expected)
    assert counts.max() <= len(split.train)  # a user counts once per item
    assert counts.sum() <= 2 * len(split.train)  # and for at most `cap` items


def test_noise_has_the_calibrated_scale(split):
    users = range(len(split.train))
    exact = item_counts(split, users, cap=4)
    draws = np.stack([noisy_item_counts(split, users, 4, noise_multiplier=3.0) - exact for _ in range(200)])
    assert draws.std() == pytest.approx(3.0 * math.sqrt(4), rel=0.1)  # std = σ·√cap
    assert not np.allclose(draws[0], draws[1])  # fresh noise every release, never a replayable seed


def test_release_is_charged_to_the_ledger_before_dp_sgd_is_calibrated(split, tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", "fp", budget=8.0, delta=1e-4)
    release_counts(split, range(len(split.train)), cap=20, share=0.1, ledger=ledger)
    assert ledger.history[0][1:] == (1.0, 1)  # one full-participation Gaussian release
    assert epsilon_spent(ledger.history, 1e-4) == pytest.approx(0.8, abs=0.01)  # 10% of the budget
    reopened = PrivacyLedger.open(tmp_path / "ledger.json", "fp", budget=8.0, delta=1e-4)
    assert reopened.history == ledger.history  # persisted at the site
    sigma = calibrate_noise(8.0, 1e-4, 0.05, 200, reopened.history)
    assert reopened.epsilon([(sigma, 0.05, 200)]) <= 8.0  # the DP-SGD steps get what is left


def test_a_spent_site_refuses_to_release(split):
    ledger = PrivacyLedger.open(None, "fp", budget=100.0, delta=1e-4)
    ledger.charge("dp-sgd", [(0.5, 1.0, 1)])
    ledger.budget = 1.0  # already far past ε=1
    with pytest.raises(BudgetExhausted):
        release_counts(split, range(len(split.train)), cap=20, share=0.1, ledger=ledger)


def test_count_noise_spends_the_share():
    ledger = PrivacyLedger.open(None, "fp", budget=4.0, delta=1e-5)
    sigma = count_noise(0.25, ledger)
    assert 0.99 - 0.01 <= epsilon_spent([(sigma, 1.0, 1)], 1e-5) <= 1.0


def test_log_prior_orders_items_by_count_and_is_centred():
    prior = log_prior(np.array([5.0, 0.0, 50.0, -3.0]))
    assert prior[2] > prior[0] > prior[1] == prior[3]  # noisy negatives count as zero
    assert abs(prior.mean()) < 1e-6


def test_a_later_release_pays_on_top_of_what_was_spent():
    ledger = PrivacyLedger.open(None, "fp", budget=16.0, delta=1e-5)
    ledger.record([(1.0, 0.05, 200)])  # a previous run's DP-SGD steps
    before = ledger.epsilon()
    sigma = count_noise(0.1, ledger)
    after = ledger.epsilon([(sigma, 1.0, 1)])
    assert after == pytest.approx(before + 0.1 * (16.0 - before), abs=0.02)  # 10% of what is left, on top

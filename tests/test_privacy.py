"""User-level DP: accounting, calibration, the site ledger, and the budget it enforces.

Pure-function tests need no model; the ``train_local`` ones use the tiny random BERT
from tests/conftest.py over a slice of MovieTweetings.
"""

from __future__ import annotations

import doctest
import json
import math

import pytest
from hypothesis import example, given, settings, strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

import common.privacy
from common.adapter import trainable_state
from common.examples import training_rows
from common.ledger import LedgerRefused, PrivacyLedger
from common.model import ModelSettings, Recommender
from common.privacy import (
    BudgetExhausted,
    PrivacyError,
    PrivacySettings,
    TooFewUsers,
    calibrate_noise,
    epsilon_spent,
)
from common.training import TrainSettings, train_local, with_lower_states

# Integer RDP orders that Opacus' RDPAccountant also uses (its grid skips 11).
INTEGER_ORDERS = [*range(2, 11), *range(12, 64)]


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε of the Poisson-subsampled Gaussian, written out from the papers, not from Opacus.

    RDP at integer α (Mironov, Talwar, Zhang 2019, eq. for integer orders):
    A_α = Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k) / (2σ²)), RDP = steps · log A_α / (α-1);
    conversion to (ε, δ) by Balle et al. 2020, Thm 21.
    """
    best = math.inf
    for a in INTEGER_ORDERS:
        terms = [
            math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1)
            + (a - k) * math.log1p(-q) + (k * math.log(q) if k else 0.0) + (k * k - k) / (2 * sigma**2)
            for k in range(a + 1)
        ]
        top = max(terms)
        log_a = top + math.log(sum(math.exp(t - top) for t in terms))
        rdp = steps * log_a / (a - 1)
        best = min(best, rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a))
    return best


# --- accounting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigma,q,steps,delta",
    [(1.0, 0.01, 1000, 1e-5), (0.8, 0.05, 200, 1e-4), (2.0, 0.25, 40, 1e-3), (1.1, 256 / 60000, 14062, 1e-5)],
)
def test_epsilon_spent_matches_opacus_and_the_formula(sigma, q, steps, delta):
    ours = epsilon_spent([(sigma, q, steps)], delta)
    accountant = RDPAccountant()
    for _ in range(steps):  # one step at a time, as the optimizer records them
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert ours == pytest.approx(accountant.get_epsilon(delta), abs=1e-9)
    # The independent formula uses integer orders only; Opacus adds fractional ones, so it
    # may only be (slightly) tighter.
    reference = independent_epsilon(sigma, q, steps, delta)
    assert ours <= reference + 1e-9
    assert ours >= 0.98 * reference


def test_epsilon_spent_known_answer_and_prv():
    # The module's doctest value: σ=1, q=0.01, 1000 steps, δ=1e-5.
    assert epsilon_spent([(1.0, 0.01, 1000)], 1e-5) == pytest.approx(2.1014, abs=1e-4)
    prv = PRVAccountant()
    prv.history = [(1.0, 0.01, 1000)]
    assert epsilon_spent([(1.0, 0.01, 1000)], 1e-5, "prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-6)
    assert epsilon_spent([], 1e-5) == 0.0
    # Composition: split histories give the ε of the whole.
    assert epsilon_spent([(1.0, 0.01, 400), (1.0, 0.01, 600)], 1e-5) == pytest.approx(
        epsilon_spent([(1.0, 0.01, 1000)], 1e-5), abs=1e-12
    )


def test_privacy_module_doctests_pass():
    result = doctest.testmod(common.privacy)
    assert result.attempted >= 3 and result.failed == 0


@pytest.mark.parametrize(
    "target,delta,q,steps,prior",
    [
        (8.0, 1e-5, 0.05, 100, []),
        (1.0, 1e-5, 0.01, 1000, []),
        (4.0, 1e-4, 0.25, 10, []),
        (8.0, 1e-5, 0.05, 50, [(1.2, 0.05, 50)]),  # a later round that must fit under the rest
    ],
)
def test_calibrate_noise_meets_target_and_is_near_tight(target, delta, q, steps, prior):
    sigma = calibrate_noise(target, delta, q, steps, prior)
    spent = epsilon_spent(prior + [(sigma, q, steps)], delta)
    assert spent <= target
    assert target - spent < 0.01  # within the default tolerance
    assert epsilon_spent(prior + [(0.98 * sigma, q, steps)], delta) > target  # less noise would not do


def test_calibrate_noise_refuses_a_spent_budget():
    with pytest.raises(BudgetExhausted, match="already spent"):
        calibrate_noise(1.0, 1e-5, 0.05, 10, prior=[(0.5, 0.05, 1000)])


# --- the ledger ----------------------------------------------------------------------------


def test_ledger_composes_across_restarts(tmp_path):
    path = tmp_path / "site" / "ledger.json"
    first = PrivacyLedger.open(path, "site-a", budget=8.0, delta=1e-5)
    first.noise_multiplier = 1.3
    first.record([(1.3, 0.05, 10)])
    first.charge("counts", [(4.0, 1.0, 1)])

    again = PrivacyLedger.open(path, "site-a", budget=8.0, delta=0.5)  # a larger δ cannot loosen the ledger
    assert again.delta == 1e-5 and again.rounds == 1 and again.noise_multiplier == 1.3
    again.record([(1.3, 0.05, 10)])
    third = PrivacyLedger.open(path, "site-a", budget=8.0, delta=1e-5)
    assert third.rounds == 2
    assert third.history == [(1.3, 0.05, 10), (4.0, 1.0, 1), (1.3, 0.05, 10)]  # every release, in order
    assert third.epsilon() == pytest.approx(epsilon_spent(third.history, 1e-5), abs=1e-12)
    assert set(third.epsilon_by_kind()) == {"dp-sgd", "counts"}
    assert third.epsilon_by_kind()["dp-sgd"] == pytest.approx(epsilon_spent([(1.3, 0.05, 20)], 1e-5))
    on_disk = json.loads(path.read_text())
    assert on_disk["site"] == "site-a" and on_disk["history"] == [list(h) for h in third.history]
    assert not list(path.parent.glob("*.tmp"))  # the atomic write leaves no temporary file
    with pytest.raises(LedgerRefused, match="belongs to 'site-a'"):
        PrivacyLedger.open(path, "site-b", budget=8.0, delta=1e-5)


def test_configuration_can_lower_the_budget_only_the_ledger_command_raises_it(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path, "s", budget=8.0, delta=1e-5).record([(1.0, 0.1, 10)])
    assert PrivacyLedger.open(path, "s", budget=100.0, delta=1e-5).budget == 8.0  # a larger node budget is ignored
    assert PrivacyLedger.open(path, "s", budget=2.0, delta=1e-5).budget == 2.0  # a smaller one tightens
    ledger = PrivacyLedger.open(path, "s", budget=8.0, delta=1e-5)
    ledger.raise_budget(16.0, "new agreement")
    reopened = PrivacyLedger.open(path, "s", budget=16.0, delta=1e-5)
    assert reopened.budget == 16.0
    assert reopened.events[-1]["from"] == 8.0 and reopened.events[-1]["to"] == 16.0
    assert reopened.events[-1]["reason"] == "new agreement" and "@" in reopened.events[-1]["by"]
    with pytest.raises(PrivacyError, match="above the current one"):
        reopened.raise_budget(4.0)


def test_a_per_data_ledger_from_before_becomes_one_site_ledger(tmp_path):
    """Format 1 kept an entry per data fingerprint; everything in it was spent on the same people."""
    path = tmp_path / "ledger.json"
    old = {fp: {"delta": d, "accountant": "rdp", "history": [[1.0, 0.1, 10]], "rounds": 1, "noise_multiplier": 1.0,
                "budget": 8.0} for fp, d in (("aaa", 1e-5), ("bbb", 1e-4))}
    path.write_text(json.dumps(old))
    ledger = PrivacyLedger.open(path, "site-0", budget=8.0, delta=1e-3)
    assert ledger.delta == 1e-5 and ledger.rounds == 2
    assert ledger.epsilon() == pytest.approx(epsilon_spent([(1.0, 0.1, 20)], 1e-5))


def test_a_missing_or_rolled_back_ledger_fails_closed(tmp_path):
    path, marker = tmp_path / "ledger.json", tmp_path / "state" / "site-0.marker.json"
    ledger = PrivacyLedger.open(path, "site-0", 8.0, 1e-5, marker=marker)
    ledger.record([(1.0, 0.1, 10)])
    older = path.read_text()
    ledger.record([(1.0, 0.1, 10)])
    path.write_text(older)  # a backup restored over the ledger
    with pytest.raises(LedgerRefused, match="an older copy"):
        PrivacyLedger.open(path, "site-0", 8.0, 1e-5, marker=marker)
    path.unlink()
    with pytest.raises(LedgerRefused, match="does not exist"):
        PrivacyLedger.open(path, "site-0", 8.0, 1e-5, marker=marker)
    marker.unlink()  # the documented way to start over deliberately
    assert PrivacyLedger.open(path, "site-0", 8.0, 1e-5, marker=marker).epsilon() == 0.0


def test_corrupt_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text('{"data-a": {"delta": 1e-5,')
    with pytest.raises(PrivacyError, match="corrupt"):
        PrivacyLedger.open(path, "data-a", budget=8.0, delta=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    sigma=st.floats(0.6, 4.0),
    sample_rate=st.floats(0.002, 0.5),
    steps=st.integers(1, 60),
    affordable=st.integers(0, 5),
    slack=st.floats(0.0, 0.98),
    extra=st.integers(1, 3),
)
@example(sigma=1.9, sample_rate=0.3031611549369303, steps=11, affordable=4, slack=0.0, extra=1)  # budget = ε exactly
def test_site_never_records_past_its_budget(tmp_path_factory, sigma, sample_rate, steps, affordable, slack, extra):
    """With a budget between the ε of ``affordable`` and ``affordable + 1`` rounds, a site
    restarted before every round trains exactly ``affordable`` rounds, refuses every later
    one, and its ledger never holds more than the budget."""
    delta = 1e-5
    eps_at = [epsilon_spent([(sigma, sample_rate, r * steps)] if r else [], delta) for r in range(affordable + 2)]
    budget = eps_at[affordable] + slack * (eps_at[affordable + 1] - eps_at[affordable])
    if budget <= 0:  # affordable = 0 and slack = 0: PrivacySettings requires ε > 0
        budget = eps_at[1] / 2
    path = tmp_path_factory.mktemp("ledger") / "ledger.json"
    outcomes = []
    for _ in range(affordable + extra):
        ledger = PrivacyLedger.open(path, "fp", budget, delta)  # a restart before every round
        before = ledger.epsilon()
        try:
            after = ledger.check(sigma, sample_rate, steps)
        except BudgetExhausted as err:
            assert f"budget ε={budget:g}" in str(err)
            outcomes.append("refused")
            assert PrivacyLedger.open(path, "fp", budget, delta).epsilon() == before  # nothing written
            continue
        assert after <= budget
        ledger.record([(sigma, sample_rate, steps)])
        outcomes.append("trained")
        assert PrivacyLedger.open(path, "fp", budget, delta).epsilon() == pytest.approx(after, abs=1e-9)
    assert outcomes == ["trained"] * affordable + ["refused"] * extra
    final = PrivacyLedger.open(path, "fp", budget, delta)
    assert final.rounds == affordable
    assert final.epsilon() <= budget
    assert final.epsilon() == pytest.approx(eps_at[affordable], abs=1e-9)  # one accountant over all rounds


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan")])
def test_epsilon_must_be_positive(epsilon):
    with pytest.raises(PrivacyError, match="epsilon must be > 0"):
        PrivacySettings(epsilon=epsilon)


@pytest.mark.parametrize("delta", [1.0, 1.5, 0.0])
def test_delta_must_be_below_one(delta):
    with pytest.raises(PrivacyError, match=r"delta must be in \(0, 1\)"):
        PrivacySettings(delta=delta)


def test_default_delta_is_below_one_over_n():
    assert PrivacySettings().delta_for(1000) == pytest.approx(1e-4)
    assert PrivacySettings(delta=1e-6).delta_for(1000) == 1e-6
    assert not PrivacySettings(epsilon=math.inf).private


# --- train_local with the ledger -------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tiny_bert, movietweetings):
    """A tiny model and 64 users' rows (lower states cached)."""
    data, split = movietweetings
    settings = ModelSettings(model=tiny_bert, max_tokens=32, item_tokens=16, max_history=10)
    model = Recommender.build(settings, list(data.catalogue.texts))
    rows = training_rows(data.catalogue, split, range(64), model.tokenizer, 32, 10, 4)
    return model, with_lower_states(model, rows)


def test_rounds_with_a_restored_ledger_equal_one_accountant(site, tmp_path):
    model, rows = site
    path = tmp_path / "ledger.json"
    privacy = PrivacySettings(epsilon=4.0, delta=1e-3, expected_batch=16)
    train = TrainSettings(local_steps=2)

    ledger = PrivacyLedger.open(path, "site-0", privacy.epsilon, privacy.delta)
    state, first = train_local(model, None, rows, train, privacy, ledger, planned_steps=4)
    restored = PrivacyLedger.open(path, "site-0", privacy.epsilon, privacy.delta)  # a restart
    assert restored.noise_multiplier == first["noise_multiplier"]
    _, second = train_local(model, state, rows, train, privacy, restored, planned_steps=4)

    sigma, q = second["noise_multiplier"], second["sample_rate"]
    assert sigma == first["noise_multiplier"] and q == 16 / 64
    one = RDPAccountant()
    for _ in range(4):
        one.step(noise_multiplier=sigma, sample_rate=q)
    assert abs(second["epsilon"] - one.get_epsilon(1e-3)) <= 1e-6
    assert abs(PrivacyLedger.open(path, "site-0", 4.0, 1e-3).epsilon() - one.get_epsilon(1e-3)) <= 1e-6
    assert first["epsilon"] < second["epsilon"] <= 4.0
    assert 4.0 - second["epsilon"] < 0.01  # calibrated for the whole plan, not per round

    # The plan is spent: a third round is refused before any data is touched or ε recorded.
    before = path.read_text()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(BudgetExhausted, match="site budget"):
        train_local(model, None, rows, train, privacy, PrivacyLedger.open(path, "site-0", 4.0, 1e-3), 4)
    assert path.read_text() == before
    assert all(p.equal(params[n]) for n, p in model.named_parameters())


def test_site_smaller_than_one_batch_sits_out(site, toy_dir, tiny_bert, tmp_path):
    model, rows = site
    with pytest.raises(TooFewUsers, match="the site has 64 users, fewer than one expected batch \\(100\\)"):
        train_local(model, None, rows, TrainSettings(local_steps=1), PrivacySettings(epsilon=8.0, expected_batch=100))
    # What the ClientApp calls: a refusal (state back untouched, nothing spent), not an error
    # that would fail the whole federation because one partner is small.
    from common.config import Settings
    from common.site import Site

    config = {"dataset": "csv", "data-path": str(toy_dir / "interactions.csv"), "model": tiny_bert, "num-sites": 2,
              "partition": "natural", "partition-column": "site", "max-tokens": 16, "max-history": 8}
    small = Site.open(Settings.from_config(config | {"expected-batch": 100}), 0, 2)
    ledger = PrivacyLedger.open(None, small.name, 8.0, 1e-3)
    state = {k: v.copy() for k, v in trainable_state(small.model).items()}
    new_state, metrics = small.train(state, ledger, small.settings.privacy, planned_rounds=2)
    assert metrics["refused"] == 1 and "fewer than one expected batch" in metrics["reason"]
    assert new_state is state and ledger.history == [] and ledger.epsilon() == 0.0
    fits = Site.open(Settings.from_config(config | {"expected-batch": 1}), 0, 2)
    _, metrics = fits.train(state, PrivacyLedger.open(None, fits.name, 8.0, 1e-3), fits.settings.privacy, planned_rounds=2)
    assert metrics["refused"] == 0 and metrics["steps"] > 0

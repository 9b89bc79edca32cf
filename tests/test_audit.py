"""``fedenc audit``: the one-run ε lower bound, the canaries, the no-noise control, and one
audit of the tiny config end to end (slow)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.audit_bound import K_FRACTIONS, auroc, epsilon_for_counts, epsilon_lower_bound, p_value, tpr_at_fpr
from common.config import Settings
from common.data import leave_one_out, load
from common.partition import partition_users
from simulations.audit import CANARY_PREFIX, CANARY_SITE, make_canaries, run_config, verdict, write_dataset

# (m, guesses, correct, δ) -> ε lower bound at 95 %, computed with jax-privacy 2.0.0
# (jax_privacy.auditing._epsilon_one_run(0.0, m, guesses, correct, 0.05, δ), installed in a
# throwaway venv, never a dependency): the paper's bound as DeepMind implements it.
JAX_PRIVACY = {
    (1000, 1000, 1000, 0.0): 5.8090683371730325,
    (1000, 100, 100, 0.0): 3.492965346169885,
    (1000, 100, 100, 1e-05): 3.465376229385333,
    (1000, 200, 150, 1e-05): 0.8199728373996844,
    (200, 200, 180, 0.001): 1.7404125922666,
    (100, 50, 40, 0.0001): 0.7683403399732257,
    (10000, 2000, 1500, 1e-06): 1.012597287902366,
    (200, 20, 20, 0.0): 1.822715468913766,
}


@pytest.mark.parametrize(("counts", "expected"), JAX_PRIVACY.items())
def test_bound_matches_jax_privacy(counts, expected):
    m, guesses, correct, delta = counts
    assert epsilon_for_counts(m, guesses, correct, delta, 0.05) == pytest.approx(expected, abs=1e-5)


def test_all_correct_guesses_closed_form():
    # δ = 0 and every guess right: P[W ≥ r] = q^r, so the bound solves q^r = 0.05 exactly.
    r = 300
    q = 0.05 ** (1 / r)
    assert epsilon_for_counts(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_bound_is_monotone():
    base = epsilon_for_counts(1000, 400, 300, 1e-5)
    assert 0 < base
    assert epsilon_for_counts(1000, 400, 320, 1e-5) > base  # more right guesses
    assert epsilon_for_counts(1000, 400, 300, 1e-3) < base  # a larger δ explains more
    assert epsilon_for_counts(1000, 400, 300, 1e-5, significance=0.01) < base  # more confidence
    # the δ term only ever raises the chance of the observation
    assert p_value(1000, 400, 300, 1.0, 1e-4) > p_value(1000, 400, 300, 1.0, 0.0)


def test_scores_without_signal_give_no_bound():
    rng = np.random.default_rng(3)
    for _ in range(5):
        included = rng.random(1000) < 0.5
        result = epsilon_lower_bound(rng.normal(size=1000), included, delta=1e-5)
        assert result["epsilon"] < 0.3, result
    # identical scores: the guesses are a fixed random order, so no better than chance
    assert epsilon_lower_bound(np.zeros(1000), rng.random(1000) < 0.5, delta=1e-5)["epsilon"] < 0.3


def test_choosing_k_is_paid_for():
    scores = np.r_[np.zeros(500), np.ones(500)]  # perfectly separated
    result = epsilon_lower_bound(scores, scores > 0, delta=0.0)
    assert result["significance"] == pytest.approx(0.05 / len(K_FRACTIONS))
    assert result["guesses"] == 1000 and result["correct"] == 1000
    assert result["epsilon"] == pytest.approx(epsilon_for_counts(1000, 1000, 1000, 0.0, 0.05 / len(K_FRACTIONS)))
    assert result["epsilon"] < epsilon_for_counts(1000, 1000, 1000, 0.0, 0.05)  # the price of the grid
    # a signal the attack sees grows the bound
    noisy = scores + np.random.default_rng(0).normal(0, 0.5, 1000)
    assert 0 < epsilon_lower_bound(noisy, scores > 0, 1e-5)["epsilon"] < result["epsilon"]


def test_auroc_and_tpr():
    included = np.array([False, False, False, True, True, True])
    assert auroc([0, 1, 2, 3, 4, 5], included) == 1.0
    assert auroc([5, 4, 3, 2, 1, 0], included) == 0.0
    assert auroc([1, 1, 1, 1, 1, 1], included) == 0.5  # ties count one half
    assert auroc([0, 3, 2, 1, 4, 5], included) == pytest.approx(7 / 9)
    assert tpr_at_fpr([0, 1, 2, 3, 4, 5], included) == 1.0
    assert tpr_at_fpr([0, 1, 4.5, 3, 4, 5], included) == pytest.approx(1 / 3)  # above the highest out
    # 200 out-canaries: 1 % lets the two highest through
    out, inn = np.arange(200.0), np.array([198.5, 196.5, 199.5])  # threshold 197: out 198 and 199 pass
    scores, mask = np.r_[out, inn], np.r_[np.zeros(200, bool), np.ones(3, bool)]
    assert tpr_at_fpr(scores, mask, 0.01) == pytest.approx(2 / 3)


def test_verdict():
    assert verdict(dp=0.1, control=3.0, claimed=8.0) == "consistent"
    assert verdict(dp=0.0, control=0.5, claimed=8.0) == "no power"  # the control sees nothing
    assert verdict(dp=1.2, control=1.1, claimed=8.0) == "no power"  # the control is no better
    assert verdict(dp=2.0, control=3.0, claimed=1.0) == "violation"


# --- canaries ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def movietweetings_split(movietweetings):
    return movietweetings[1]


def test_canaries(movietweetings_split):
    split = movietweetings_split
    canaries = make_canaries(split, 2000, 2, np.random.default_rng(0))
    targets = canaries.targets
    assert len(set(targets.tolist())) == 2000  # one secret per canary
    popularity = split.popularity()
    assert popularity[targets].max() <= np.sort(popularity)[2000]  # the least trained-on items
    others = np.concatenate([np.r_[s[:2], s[3:]] for s in canaries.sequences])
    assert not np.isin(others, targets).any()  # no canary gives another's secret away
    assert all(len(set(s.tolist())) == len(s) == 5 for s in canaries.sequences)
    cut = canaries.split(split.num_items)
    assert [int(t[-1]) for t in cut.train] == targets.tolist()  # the secret is the last training item
    assert 0.45 < canaries.included.mean() < 0.55  # each included with probability 1/2


def test_audit_dataset_keeps_the_federation_and_puts_canaries_at_one_site(synthetic_dir, tmp_path):
    config = {"dataset": "csv", "data-path": str(synthetic_dir / "interactions.csv"), "num-sites": 4, "seed": 1}
    settings = Settings.from_config(config)
    data = load(settings.data)
    split = leave_one_out(data)
    sites = partition_users(data, 4, "iid", None, 0.5, 1)
    canaries = make_canaries(split, 20, 2, np.random.default_rng(1))
    interactions, items = write_dataset(data, sites, canaries, tmp_path)
    audit = Settings.from_config(run_config(config, interactions, items, tmp_path / "run", control=False))
    audited = load(audit.data)

    assert audited.catalogue.texts == data.catalogue.texts and audited.catalogue.item_ids == data.catalogue.item_ids
    for u, uid in enumerate(data.user_ids):
        assert audited.sequences[audited.user_ids.index(uid)].tolist() == data.sequences[u].tolist()
    in_ids = {canaries.ids[i] for i in np.flatnonzero(canaries.included)}
    assert {uid for uid in audited.user_ids if uid.startswith(CANARY_PREFIX)} == in_ids  # the out ones are absent

    groups = partition_users(audited, 4, audit.split.partition, audit.split.partition_column)
    as_sets = [{audited.user_ids[u] for u in g} for g in groups]
    for original in sites:  # every real site is still one site
        ids = {data.user_ids[u] for u in original}
        assert any(ids <= s for s in as_sets)
    holding = [s for s in as_sets if s & in_ids]
    assert len(holding) == 1 and in_ids <= holding[0]
    assert {data.user_ids[u] for u in sites[CANARY_SITE]} <= holding[0]


def test_canaries_never_in_central_evaluation(synthetic_dir, tiny_bert, tmp_path):
    from common.evaluation import CentralEvaluator

    config = {"dataset": "csv", "data-path": str(synthetic_dir / "interactions.csv"), "num-sites": 2,
              "model": tiny_bert, "max-tokens": 16, "max-history": 8}
    data = load(Settings.from_config(config).data)
    canaries = make_canaries(leave_one_out(data), 30, 2, np.random.default_rng(2))
    interactions, items = write_dataset(data, partition_users(data, 2), canaries, tmp_path)
    for eval_users in (0, 100):
        settings = Settings.from_config(run_config(config, interactions, items, tmp_path / "run", False)
                                        | {"eval-users": eval_users})
        evaluator = CentralEvaluator(settings)
        ids = [evaluator.data.user_ids[u] for u in evaluator.users]
        assert not any(uid.startswith(CANARY_PREFIX) for uid in ids)
        assert len(ids) == (eval_users or len(data.user_ids))


def test_control_trains_without_noise_and_charges_nothing(tiny_bert, movietweetings):
    from common.examples import training_rows
    from common.ledger import PrivacyLedger
    from common.model import ModelSettings, Recommender
    from common.privacy import PrivacySettings
    from common.training import TrainSettings, train_local, with_lower_states

    data, split = movietweetings
    model = Recommender.build(ModelSettings(model=tiny_bert, max_tokens=16, item_tokens=16, max_history=8),
                              list(data.catalogue.texts))
    rows = with_lower_states(model, training_rows(data.catalogue, split, range(64), model.tokenizer, 16, 8, 4))
    train = TrainSettings(local_steps=2)
    control = Settings.from_config({"audit-control": True, "epsilon": 4.0, "delta": 1e-3, "expected-batch": 16}).privacy
    assert control.private and not control.noise

    ledger = PrivacyLedger.open(None, "site-0", 4.0, 1e-3)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state, metrics = train_local(model, None, rows, train, control, ledger, planned_steps=2)
    assert metrics["noise_multiplier"] == 0.0 and math.isinf(metrics["epsilon"])
    assert ledger.epsilon() == 0.0 and ledger.rounds == 1 and not ledger.history  # no finite ε to charge
    assert any(not np.allclose(state[n], start[n].cpu().numpy()) for n in start)  # it did train

    noisy = PrivacyLedger.open(None, "site-0", 4.0, 1e-3)
    _, metrics = train_local(model, None, rows, train, PrivacySettings(epsilon=4.0, delta=1e-3, expected_batch=16),
                             noisy, planned_steps=2)
    assert metrics["noise_multiplier"] > 0 and 0 < noisy.epsilon() <= 4.0


# --- end to end --------------------------------------------------------------------------------


def test_bad_input_is_one_error_line(tmp_path, tiny_bert):
    from test_simulate import TINY, assert_clean_error, fedenc

    proc = fedenc("audit", "--config", str(TINY), "--set", "epsilon=inf", "--out", str(tmp_path / "a"), cache=tmp_path)
    assert_clean_error(proc, "epsilon")
    proc = fedenc("audit", "--config", str(TINY), "--canaries", "1", "--out", str(tmp_path / "b"), cache=tmp_path)
    assert_clean_error(proc, "--canaries")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "audit.json").write_text("{}")
    proc = fedenc("audit", "--config", str(TINY), "--out", str(tmp_path / "c"), cache=tmp_path)
    assert_clean_error(proc, "--overwrite")


@pytest.mark.slow
def test_audit_of_the_tiny_config(tiny_bert, tmp_path):
    """Two tiny federations (DP at ε=8, and the control) with 200 canaries: about two minutes."""
    from test_simulate import TINY, explain, fedenc

    out = tmp_path / "audit"
    proc = fedenc("audit", "--config", str(TINY), "--set", f"model={tiny_bert}", "--out", str(out), cache=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "control" in proc.stdout and "round   2" in proc.stdout, explain(proc)  # progress of both runs
    result = json.loads((out / "audit.json").read_text())
    for key in ("epsilon_claimed", "delta", "epsilon_lower_bound", "control_epsilon_lower_bound", "canaries",
                "auroc", "tpr_at_1pct_fpr", "control_auroc", "control_tpr_at_1pct_fpr", "runs", "verdict"):
        assert key in result, key
    assert result["canaries"] == 200 and 0 < result["epsilon_claimed"] <= 8.0 + 1e-9 and 0 < result["delta"] < 1
    assert result["epsilon_lower_bound"] <= result["epsilon_claimed"]  # the DP claim survives the audit
    # without noise the canaries' secrets show (the exact prior counts alone separate them)
    assert result["control_epsilon_lower_bound"] >= 1.0
    assert result["control_epsilon_lower_bound"] > result["epsilon_lower_bound"]
    assert result["verdict"] == "consistent"
    assert (out / "audit.png").stat().st_size > 0
    canaries = json.loads((out / "canaries.json").read_text())
    assert len(canaries["scores"]["dp"]) == len(canaries["scores"]["control"]) == 200
    for run in ("dp", "control"):  # each run kept its own ledgers inside the audit's folder
        assert any((out / run / "ledgers").iterdir())

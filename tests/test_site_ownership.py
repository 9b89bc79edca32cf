"""Who owns which model: a process's sites share one (each request loads the state it uses),
the central evaluator builds its own, and nothing one trains leaks into the other."""

import math

import numpy as np
import pytest

from common.adapter import load_trainable_state, trainable_state
from common.config import Settings
from common.evaluation import CentralEvaluator
from common.site import SiteHost


@pytest.fixture
def settings(toy_dir, tiny_bert) -> Settings:
    return Settings.from_config({"dataset": "csv", "data-path": str(toy_dir / "interactions.csv"), "model": tiny_bert,
                                 "num-sites": 2, "max-tokens": 16, "max-history": 8, "epsilon": math.inf})


def _changed(state: dict) -> dict:
    return {k: v + 1.0 for k, v in state.items()}


def test_a_hosts_sites_share_its_model_and_the_evaluator_builds_its_own(settings):
    host = SiteHost()
    first, second = host.open(settings, 0, 2), host.open(settings, 1, 2)
    assert first.model is second.model  # built once per process: sites take turns on it
    assert host.open(settings, 0, 2) is first  # rows derived once, reused across messages
    assert SiteHost().open(settings, 0, 2).model is not first.model  # another host, another model
    evaluator = CentralEvaluator(settings)
    assert evaluator.model is not first.model
    # same seed, same frozen weights (FFA-LoRA's A): only the trainable state travels
    assert all(np.array_equal(a, b) for a, b in zip(trainable_state(first.model).values(),
                                                    trainable_state(evaluator.model).values(), strict=True))

    before = evaluator(evaluator.initial_state())
    first.set_prior(np.log1p(np.arange(len(first.data.catalogue), dtype=np.float32)))  # a site installs a prior
    load_trainable_state(first.model, _changed(trainable_state(first.model)))  # and trains
    assert evaluator(evaluator.initial_state()) == before  # neither reached the evaluator's model
    assert not evaluator.model.prior.any()


def test_initial_state_is_the_model_as_built_whatever_was_loaded_since(settings):
    evaluator = CentralEvaluator(settings)
    built = evaluator.initial_state()
    load_trainable_state(evaluator.model, _changed(built))  # e.g. a sweep's previous baseline trained it
    again = evaluator.initial_state()
    assert again.keys() == built.keys() and all(np.array_equal(again[k], built[k]) for k in built)
    assert not np.array_equal(trainable_state(evaluator.model)[next(iter(built))], built[next(iter(built))])

    evaluator.model.set_prior(np.log1p(np.arange(len(evaluator.data.catalogue), dtype=np.float32)))
    with_prior = evaluator.initial_state()  # the prior's weight now trains: it starts at its built value
    assert with_prior.keys() - built.keys() == {"prior_weight.weight"}
    assert float(with_prior["prior_weight.weight"]) == 1.0

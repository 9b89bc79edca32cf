"""The sequential recommender (common/sequential.py): exact per-user gradients under Opacus,
its item-index rows, training through train_local, the trainable state and adapter files.

The catalogue bank is a random (N, H) tensor passed to ``build``: the model never reads text
beyond the bank, so no encoder is loaded; rows come from the built-in MovieTweetings split.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from common.adapter import HEAD_FILE, load_adapter, load_trainable_state, save_adapter, trainable_state
from common.examples import evaluation_rows, training_rows
from common.model import ModelSettings, Recommender
from common.privacy import PrivacySettings
from common.sequence_rows import sequence_rows
from common.sequential import SequentialRecommender
from common.training import TrainSettings, _empty_batch, as_batch, evaluate, train_local

HISTORY = 6


def make(num_items: int, hidden: int = 8, seed: int = 0, **overrides) -> SequentialRecommender:
    torch.manual_seed(seed)
    bank = torch.randn(num_items, 16, generator=torch.Generator().manual_seed(seed))
    settings = ModelSettings(kind="sequential", max_history=HISTORY, sequence_hidden=hidden, **overrides)
    return Recommender.build(settings, [], bank=bank)


def no_dropout(model) -> None:
    """Dropout draws a fresh mask per call; a batch and its users alone would see different ones."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def rows(model, movietweetings, users):
    data, split = movietweetings
    return training_rows(data.catalogue, split, users, model.tokenizer, 0, model.settings.max_history, 1)


def test_build_dispatches_on_kind(movietweetings):
    model = make(len(movietweetings[0].catalogue))
    assert isinstance(model, SequentialRecommender)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "adapter.weight" in names and "scorer.bias" in names
    assert "scorer.weight" not in names  # the bank is frozen
    # nothing per item but the bias: the rest does not grow with the catalogue
    per_item = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n == "scorer.bias")
    assert per_item == len(movietweetings[0].catalogue)
    small = make(10)
    shared = sum(p.numel() for n, p in small.named_parameters() if p.requires_grad and n != "scorer.bias")
    assert shared == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n != "scorer.bias")


def test_training_rows_are_next_item_pairs_right_aligned(movietweetings):
    data, split = movietweetings
    user = next(u for u in range(len(split.train)) if len(split.train[u]) > HISTORY + 1)
    model = make(len(data.catalogue))
    items, mask, history, targets = rows(model, movietweetings, [user]).tensors
    seq = split.train[user]
    assert items[0].tolist() == list(seq[-HISTORY - 1 : -1])  # the last HISTORY inputs, oldest first
    assert targets[0].tolist() == list(seq[-HISTORY:])  # each the item after its input
    assert mask.all() and history.shape == (1, 0)
    short = sequence_rows([[7, 8]], [[9]], 4).tensors
    assert short[0].tolist() == [[-1, -1, 7, 8]] and short[1].tolist() == [[0, 0, 1, 1]]
    assert short[3].tolist() == [[9]]
    valid = evaluation_rows(data.catalogue, split, [user], None, 0, HISTORY, "valid")
    assert valid.dataset.tensors[0][0].tolist() == list(seq[-HISTORY:])  # newest in the last column
    assert valid.dataset.tensors[3][0, 0] == split.valid[user]


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_user_gradients_match_one_user_at_a_time(movietweetings, mode):
    """Opacus' per-sample gradient of every trainable parameter equals that user's own loss
    gradient computed alone, including the adapter used on both sides (docs/DESIGN.md,
    "Privacy model")."""
    data, split = movietweetings
    model = make(len(data.catalogue))
    model.set_prior(torch.randn(len(data.catalogue)))  # its weight trains with the bias
    model.double()
    no_dropout(model)
    with torch.no_grad():  # the item bias starts at zero; move it so its gradient is not special
        model.scorer.bias.normal_(0, 0.1)
    model.train()
    # user 0 has fewer items than HISTORY would make it, so padding is exercised too
    users = [u for u in range(len(split.train)) if len(split.train[u]) <= HISTORY][:2] + list(range(4))
    batch = as_batch(rows(model, movietweetings, users).tensors, "cpu")
    assert not batch["mask"].bool().all()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {n for n, _ in named}
    assert {"adapter.weight", "adapter.bias", "positions.weight", "prior_weight.weight", "scorer.bias"} <= names
    params = [p for _, p in named]
    one = [torch.autograd.grad(model.per_user_loss({k: v[i : i + 1] for k, v in batch.items()}).sum(), params)
           for i in range(len(users))]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=(mode == "functorch"))
    try:
        gsm(**batch).mean().backward()
        for j, (name, p) in enumerate(named):
            ref = torch.stack([one[i][j] for i in range(len(users))])
            assert ref.abs().max() > 0, f"{name}: zero gradient, the comparison would be vacuous"
            assert p.grad_sample.shape == (len(users), *p.shape), name
            diff = (p.grad_sample - ref).abs().max().item()
            assert diff <= 1e-9, f"{name}: per-user gradient off by {diff:.3g}"
    finally:
        gsm._close()


def test_a_users_scores_read_only_their_own_row(movietweetings):
    model = make(len(movietweetings[0].catalogue))
    model.eval()
    batch = as_batch(rows(model, movietweetings, range(5)).tensors, "cpu")
    alone = model.score_all({k: v[2:3] for k, v in batch.items()})
    torch.testing.assert_close(model.score_all(batch)[2:3], alone)


def test_an_empty_poisson_batch_gives_zero_loss_and_gradient(movietweetings):
    """Poisson sampling may draw no user; train_local then steps on a padding row, which must
    contribute exactly nothing (and nothing NaN)."""
    model = make(len(movietweetings[0].catalogue))
    model.train()
    loss = model(**_empty_batch(rows(model, movietweetings, range(3)), "cpu"))
    assert loss.tolist() == [0.0]
    loss.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("private", [True, False])
def test_train_local_trains_only_the_shared_state(movietweetings, private):
    data, split = movietweetings
    model = make(len(data.catalogue))
    train_rows = rows(model, movietweetings, range(200))
    before = trainable_state(model)
    bank = model.bank.clone()
    privacy = PrivacySettings(epsilon=8.0 if private else math.inf, expected_batch=32)
    state, metrics = train_local(model, None, train_rows, TrainSettings(local_steps=3, device="cpu"), privacy)
    assert set(state) == set(before)
    assert any(not np.allclose(state[k], before[k]) for k in state)
    assert torch.equal(model.bank, bank) and torch.equal(model.scorer.weight, bank)
    assert metrics["epsilon"] <= 8.0 if private else metrics["epsilon"] == 0.0


def test_training_lowers_validation_loss(movietweetings):
    data, split = movietweetings
    model = make(len(data.catalogue), hidden=16)
    users = range(300)
    valid = evaluation_rows(data.catalogue, split, users, model.tokenizer, 0, HISTORY, "valid")
    start = evaluate(model, valid, "cpu")["loss"]
    train = TrainSettings(local_steps=60, learning_rate=0.01, device="cpu")
    train_local(model, None, rows(model, movietweetings, users), train, PrivacySettings(epsilon=math.inf, expected_batch=64))
    assert evaluate(model, valid, "cpu")["loss"] < start - 0.05


def test_adapter_files_round_trip_without_an_encoder(movietweetings, tmp_path):
    n = len(movietweetings[0].catalogue)
    model = make(n)
    with torch.no_grad():
        model.scorer.bias.normal_()
    save_adapter(model, tmp_path, {"model-kind": "sequential"})
    assert (tmp_path / HEAD_FILE).is_file()
    other = make(n, seed=1)
    load_adapter(other, tmp_path)
    for key, value in trainable_state(model).items():
        np.testing.assert_array_equal(trainable_state(other)[key], value)
    fresh = make(n, seed=2)
    load_trainable_state(fresh, trainable_state(model))
    torch.testing.assert_close(fresh.adapter.weight, model.adapter.weight)

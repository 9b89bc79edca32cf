"""Model layer: exact per-user gradients, what trains, adapter files, the lower-layer split.

Runs on tiny random encoders saved to disk (tests/conftest.py: ``tiny_bert``,
``tiny_llama``) so that loading "by local path" is what is exercised, over small
slices of the built-in MovieTweetings data or the hand-made toy set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from peft import PeftModel

from common.adapter import HEAD_FILE, load_adapter, load_trainable_state, save_adapter, trainable_state
from common.data import leave_one_out
from common.encoder import LoraSettings, ModelError, SplitEncoder, add_lora, load_backbone
from common.examples import evaluation_rows, training_rows
from common.model import ModelSettings, Recommender
from common.privacy import PrivacySettings
from common.training import TrainSettings, as_batch, evaluate, resolve_device, train_local, with_lower_states

SMALL = dict(max_tokens=32, item_tokens=16, max_history=10)
TARGETS = 4


def make(path: str, texts, lora: LoraSettings = LoraSettings(), **overrides) -> Recommender:
    settings = ModelSettings(model=path, lora=lora, **(SMALL | overrides))
    return Recommender.build(settings, list(texts))


def rows_for(model, data_and_split, users, targets=TARGETS):
    data, split = data_and_split
    s = model.settings
    return training_rows(data.catalogue, split, users, model.tokenizer, s.max_tokens, s.max_history, targets)


def perturb(model, seed: int = 1, scale: float = 0.1) -> None:
    """Move every trainable parameter off its initial value (lora_B starts at zero, which would
    make every lora_A gradient zero and the comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def user(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


@pytest.fixture(scope="module")
def toy_split(toy):
    return toy, leave_one_out(toy)


# --- 1. per-sample gradients are exact, per USER --------------------------------------------


PER_SAMPLE_CASES = [
    # (encoder, ffa, grad_sample_mode, dtype)
    ("bert", False, "hooks", torch.float64),
    ("bert", True, "hooks", torch.float64),
    ("bert", False, "functorch", torch.float64),
    ("bert", True, "functorch", torch.float64),
    ("bert", False, "hooks", torch.float32),
    ("llama", False, "hooks", torch.float64),
    ("llama", True, "hooks", torch.float64),
    ("llama", False, "functorch", torch.float64),
]


@pytest.mark.parametrize(
    "encoder,ffa,mode,dtype",
    PER_SAMPLE_CASES,
    ids=[f"{e}-{'ffa' if f else 'lora'}-{m}-{str(d)[6:]}" for e, f, m, d in PER_SAMPLE_CASES],
)
def test_per_sample_gradients_match_one_user_at_a_time(
    request, movietweetings, toy_split, encoder, ffa, mode, dtype
):
    """Opacus' per-sample gradient of every trainable parameter equals the gradient of that
    user's own loss computed alone (docs/DESIGN.md, "Privacy model"; guards Opacus issue #820)."""
    if encoder == "bert":  # real catalogue (10k items), lower layers cached
        model = make(request.getfixturevalue("tiny_bert"), movietweetings[0].catalogue.texts,
                     LoraSettings(ffa=ffa), train_projection=True, learn_logit_scale=True, cache_fp16=False)
        rows = rows_for(model, movietweetings, range(8))
    else:  # decoder-only, last-token pooling; the toy catalogue keeps the bank cheap
        model = make(request.getfixturevalue("tiny_llama"), toy_split[0].catalogue.texts,
                     LoraSettings(ffa=ffa), train_projection=True, learn_logit_scale=True, cache_fp16=False)
        rows = rows_for(model, toy_split, range(4), targets=2)
    assert model.encoder.split == 1  # the lower layer is cached: the split path is what is checked
    model.set_prior(torch.randn(len(model.bank)))  # a popularity prior makes its weight trainable
    model.to(dtype)
    perturb(model)
    model.train()
    batch = as_batch(with_lower_states(model, rows).tensors, "cpu")
    assert batch["text"].dtype == dtype  # cache-fp16 off: the check runs at the model's precision
    n_users = batch["mask"].shape[0]

    named = trainable(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    expected = {"scale.log_scale", "projection.weight", "scorer.bias", "gate.linear.weight", "gate.linear.bias",
                "behaviour.recency.weight", "behaviour.content.weight", "prior_weight.weight"}
    assert expected <= set(names)
    assert any("lora_B" in n for n in names)
    assert any("lora_A" in n for n in names) == (not ffa)

    # Reference: each user's own loss, alone, on the plain model.
    reference = [torch.autograd.grad(model.per_user_loss(user(batch, i)).sum(), params) for i in range(n_users)]

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=(mode == "functorch"))
    try:
        # loss_reduction="mean" undoes the 1/B of the mean: grad_sample[i] = d loss_i / d θ.
        gsm(**batch).mean().backward()
        for j, (name, p) in enumerate(named):
            assert p.grad_sample is not None, name
            assert p.grad_sample.shape == (n_users, *p.shape), name
            ref = torch.stack([reference[i][j] for i in range(n_users)])
            assert ref.abs().max() > 0, f"{name}: zero gradient, the comparison would be vacuous"
            if dtype == torch.float64:
                diff = (p.grad_sample - ref).abs().max().item()
                assert diff <= 1e-5, f"{name}: per-sample gradient off by {diff:.3g}"
            else:  # float32: a 10k-term sum (the logit scale) carries ~1e-5 of rounding
                torch.testing.assert_close(p.grad_sample, ref, rtol=1e-4, atol=1e-5, msg=name)
            # The summed per-sample gradients are the ordinary batch gradient.
            torch.testing.assert_close(p.grad_sample.sum(0) / n_users, p.grad, rtol=1e-5, atol=1e-7)
    finally:
        gsm._close()


def test_each_hook_registered_once(tiny_bert, movietweetings):
    """Every trainable module is reachable by one path only: Opacus hooks each path it finds,
    and a module reachable twice got its per-sample gradients counted twice."""
    model = make(tiny_bert, movietweetings[0].catalogue.texts)
    assert len(model.state_dict()) == len(set(model.state_dict()))
    ids = [id(m) for _, m in model.named_modules(remove_duplicate=False)]
    assert len(ids) == len(set(ids)), "a submodule is registered under two names"


def test_user_loss_does_not_depend_on_other_users(tiny_bert, movietweetings):
    """No in-batch coupling: replacing user j's row leaves every other user's loss unchanged."""
    model = make(tiny_bert, movietweetings[0].catalogue.texts).to(torch.float64)  # no float32 rounding noise
    perturb(model)
    batch = as_batch(rows_for(model, movietweetings, range(6)).tensors, "cpu")
    other = as_batch(rows_for(model, movietweetings, range(100, 101)).tensors, "cpu")
    with torch.no_grad():
        before = model.per_user_loss(batch)
        j = 2
        changed = {k: v.clone() for k, v in batch.items()}
        for k in changed:
            changed[k][j] = other[k][0]
        after = model.per_user_loss(changed)
        alone = torch.cat([model.per_user_loss(user(batch, i)) for i in range(6)])
    assert abs(after[j] - before[j]) > 1e-3  # the change did reach user j
    keep = [i for i in range(6) if i != j]
    torch.testing.assert_close(after[keep], before[keep], rtol=0, atol=1e-10)
    torch.testing.assert_close(alone, before, rtol=0, atol=1e-10)


def test_trainable_state_names_survive_opacus_wrapping(tiny_bert, movietweetings):
    model = make(tiny_bert, movietweetings[0].catalogue.texts)
    plain = trainable_state(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        wrapped = trainable_state(gsm)
        assert list(wrapped) == list(plain)  # the "_module." prefix is removed
        changed = {k: v + 1.0 for k, v in wrapped.items()}
        load_trainable_state(gsm, changed)
        for k, v in trainable_state(model).items():
            np.testing.assert_array_equal(v, changed[k])
    finally:
        gsm._close()
    with pytest.raises(ValueError, match="does not match the model"):
        load_trainable_state(model, {k: v for k, v in plain.items() if "lora" not in k})


# --- 2. training moves only the adapter and the head ------------------------------------------


@pytest.mark.parametrize("private", [False, True], ids=["nondp", "dp"])
def test_train_local_changes_only_trainable_parameters(tiny_bert, movietweetings, private):
    model = make(tiny_bert, movietweetings[0].catalogue.texts, LoraSettings(ffa=True))
    rows = with_lower_states(model, rows_for(model, movietweetings, range(64)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    train_names = {n for n, _ in trainable(model)}
    privacy = PrivacySettings(epsilon=8.0 if private else float("inf"), expected_batch=16)
    state, metrics = train_local(model, None, rows, TrainSettings(local_steps=3), privacy)

    assert list(state) == list(trainable_state(model))
    assert metrics["steps"] == 3 and np.isfinite(metrics["train_loss"])
    if private:
        assert 0 < metrics["epsilon"] <= 8.0 and metrics["noise_multiplier"] > 0
    else:
        assert metrics["epsilon"] == 0.0
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert not any(n.startswith("_module.") for n in after)  # Opacus' wrapper is gone
    frozen_lora_a = [n for n in before if "lora_A" in n]
    assert frozen_lora_a and not set(frozen_lora_a) & train_names  # FFA: A frozen
    for name, old in before.items():
        if name in train_names:
            assert not torch.equal(after[name].detach(), old), f"trainable {name} did not change"
            np.testing.assert_array_equal(state[name], after[name].detach().numpy())
        else:
            assert torch.equal(after[name].detach(), old), f"frozen {name} changed"
    for name, old in buffers.items():
        assert torch.equal(dict(model.named_buffers())[name], old), f"buffer {name} changed"
    assert {n.split(".")[0] for n in train_names} == {"encoder", "behaviour", "gate", "scorer"}


# --- 3. adapter files ---------------------------------------------------------------------------


def test_save_and_load_adapter_round_trip(tiny_bert, movietweetings, tmp_path):
    texts = movietweetings[0].catalogue.texts
    model = make(tiny_bert, texts, LoraSettings(ffa=False), train_projection=True)
    perturb(model, seed=3)
    batch = as_batch(rows_for(model, movietweetings, range(5)).tensors, "cpu")
    model.eval()
    with torch.no_grad():
        expected = model.score_all(batch)
    save_adapter(model, tmp_path / "adapter", {"model": tiny_bert})
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / HEAD_FILE).is_file()

    fresh = make(tiny_bert, texts, LoraSettings(ffa=False), train_projection=True).eval()
    with torch.no_grad():
        assert not torch.equal(fresh.score_all(batch), expected)  # the check below is not vacuous
        load_adapter(fresh, tmp_path / "adapter")
        assert torch.equal(fresh.score_all(batch), expected)
    for name, value in trainable_state(model).items():
        np.testing.assert_array_equal(trainable_state(fresh)[name], value)

    # The directory is a plain PEFT adapter: the base model plus it gives the same LoRA weights.
    base, _ = load_backbone(tiny_bert)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    ours = {n.split("base_model.", 1)[1]: p for n, p in model.encoder.model.named_parameters() if "lora_" in n}
    theirs = {n.split("base_model.", 1)[1]: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


# --- 4. the lower-layer split ------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["tiny_bert", "tiny_llama"])
def test_split_forward_equals_full_forward_bit_for_bit(request, encoder):
    backbone, tokenizer = load_backbone(request.getfixturevalue(encoder))
    peft_model = add_lora(backbone, LoraSettings(layers=1, ffa=False))
    perturb(peft_model, seed=5)  # non-zero lora_B: the adapter changes the upper layer's output
    peft_model.eval()
    texts = ["Toy Story (1995) | Animation|Comedy", "Heat (1995) | Action; Alien (1979) | Horror|Sci-Fi; Up", "x"]
    tok = tokenizer(texts, padding=True, return_tensors="pt")  # right padding: uneven lengths
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert (mask == 0).any()
    last_token = encoder == "tiny_llama"
    full = SplitEncoder(peft_model, 0, last_token)
    split = SplitEncoder(peft_model, 1, last_token)
    with torch.no_grad():
        states = split.lower(ids, mask)
        assert states.shape == (*ids.shape, 32) and states.is_floating_point()
        adapted = full(ids, mask)
        assert torch.equal(split(states, mask), adapted)
        with peft_model.disable_adapter():  # the adapter does act on the upper layer
            assert not torch.allclose(full(ids, mask), adapted)
            assert torch.equal(split.lower(ids, mask), states)  # and not below the split
    # The block list is restored after the upper-only forward.
    assert len(split._layers) == 2 and len(getattr(split._parent, split._attr)) == 2


def test_fp16_cache_halves_the_states_and_keeps_the_scores(tiny_bert, movietweetings):
    """``cache-fp16`` stores the frozen states rounded to fp16; the layers above still run in
    fp32, so the scores move by rounding only. Without it the cache is exact."""
    exact = make(tiny_bert, movietweetings[0].catalogue.texts, cache_fp16=False)
    half = make(tiny_bert, movietweetings[0].catalogue.texts, cache_fp16=True)
    half.load_state_dict(exact.state_dict())
    rows = rows_for(exact, movietweetings, range(16))
    full = as_batch(rows.tensors, "cpu")  # token ids: the whole forward, nothing cached
    cached = {m: as_batch(with_lower_states(m, rows).tensors, "cpu") for m in (exact, half)}
    assert cached[exact]["text"].dtype == torch.float32 and cached[half]["text"].dtype == torch.float16
    assert cached[half]["text"].nbytes * 2 == cached[exact]["text"].nbytes
    uncached = make(tiny_bert, movietweetings[0].catalogue.texts, cache_lower_layers=False)
    uncached.load_state_dict(exact.state_dict())
    with torch.no_grad():
        reference = uncached.score_all(full)
        assert torch.equal(exact.score_all(full), reference) and torch.equal(exact.score_all(cached[exact]), reference)
        rounded = half.score_all(cached[half])
    assert not torch.equal(rounded, reference)  # the rounding is real ...
    torch.testing.assert_close(rounded, reference, rtol=0, atol=1e-2)  # ... and small next to scores of ~±8


# --- 6. training helps -------------------------------------------------------------------------


def test_training_lowers_validation_loss(tiny_bert, movietweetings):
    data, split = movietweetings
    torch.manual_seed(0)
    model = make(tiny_bert, data.catalogue.texts)
    users = range(400)
    valid = evaluation_rows(data.catalogue, split, users, model.tokenizer, SMALL["max_tokens"], SMALL["max_history"], "valid")
    before = evaluate(model, valid)
    rows = with_lower_states(model, rows_for(model, movietweetings, users, targets=8))
    _, metrics = train_local(model, None, rows, TrainSettings(local_steps=40, learning_rate=0.05),
                             PrivacySettings(epsilon=float("inf"), expected_batch=64))
    after = evaluate(model, valid)
    assert before["users"] == after["users"] == 400
    assert after["loss"] < before["loss"] - 0.3, (before["loss"], after["loss"])
    assert after["hr@10"] >= before["hr@10"]


# --- 7. bad input ------------------------------------------------------------------------------


def test_unknown_model_path_is_a_model_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match="cannot load model .*no-such-model"):
        load_backbone(missing)
    with pytest.raises(ModelError, match="cannot load model"):
        Recommender.build(ModelSettings(model=missing), ["an item"])


def test_lora_targets_not_in_model_is_a_model_error(tiny_bert):
    backbone, _ = load_backbone(tiny_bert)
    with pytest.raises(ModelError, match=r"lora-target-modules \['nope'\] not found"):
        add_lora(backbone, LoraSettings(target_modules=("nope",)))


def test_lora_layers_out_of_range_is_a_model_error(tiny_bert):
    backbone, _ = load_backbone(tiny_bert)
    with pytest.raises(ModelError, match=r"lora-layers must be in 1\.\.2"):
        add_lora(backbone, LoraSettings(layers=3))


# --- 8. device ----------------------------------------------------------------------------------


def test_device_and_trainable_state_on_cpu(tiny_bert, toy_split):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    model = make(tiny_bert, toy_split[0].catalogue.texts).to(resolve_device("auto"))
    model.to(torch.float64)  # whatever the device and dtype, the state travels as CPU float32
    state = trainable_state(model)
    assert state and all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    name, value = next(iter(state.items()))
    value += 1.0  # a copy: the model is untouched
    assert not np.array_equal(trainable_state(model)[name], value)

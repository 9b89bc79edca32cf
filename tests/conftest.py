"""Data fixtures: the hand-made toy set, a generated mid-size set, and the shared benchmark data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data import DataSpec, Interactions, load

TOY_DIR = Path(__file__).parent / "data" / "toy"
# Benchmark datasets that must never be copied into the repository live beside it.
SHARED_DATA = Path(os.environ.get("FEDENC_SHARED_DATA", Path(__file__).parents[1] / ".." / "shared" / "data"))


@pytest.fixture(scope="session")
def toy_dir() -> Path:
    return TOY_DIR


@pytest.fixture(scope="session")
def toy() -> Interactions:
    return load(DataSpec(dataset="csv", data_path=str(TOY_DIR / "interactions.csv")))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """300 users over 60 items in 6 categories, 7 sites; big enough for partition tests."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("synthetic")
    items = pd.DataFrame(
        {
            "item_id": [f"m{i:03d}" for i in range(60)],
            "title": [f"Movie {i}" for i in range(60)],
            "genres": [f"g{i % 6}|g{(i * 7) % 6}" for i in range(60)],
        }
    )
    items.to_csv(root / "items.csv", index=False)
    rows = []
    for u in range(300):
        favourite = u % 6  # users lean to one category so dirichlet has labels to skew
        weights = np.array([4.0 if i % 6 == favourite else 1.0 for i in range(60)])
        chosen = rng.choice(60, size=int(rng.integers(6, 20)), replace=False, p=weights / weights.sum())
        for t, i in enumerate(chosen):
            rows.append((f"user{u}", f"m{i:03d}", 1_000 * u + t, f"s{u % 7}"))
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "site"]).to_csv(
        root / "interactions.csv", index=False
    )
    return root


@pytest.fixture(scope="session")
def synthetic(synthetic_dir) -> Interactions:
    return load(DataSpec(dataset="csv", data_path=str(synthetic_dir / "interactions.csv")))


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    path = SHARED_DATA / "movielens-100k"
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {path} (set FEDENC_SHARED_DATA)")
    return path


# --- tiny encoders and model fixtures (tests/test_model.py, tests/test_privacy.py) ------------


@pytest.fixture(scope="session", autouse=True)
def fedenc_cache(tmp_path_factory) -> Path:
    """Derived artefacts (item banks) go to a temporary folder, never to ~/.cache."""
    path = tmp_path_factory.mktemp("fedenc-cache")
    old = os.environ.get("FEDENC_CACHE")
    os.environ["FEDENC_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FEDENC_CACHE", None)
    else:
        os.environ["FEDENC_CACHE"] = old


def _save_tiny(config, directory: Path) -> str:
    """Save a randomly initialised model from ``config`` with the MiniLM tokenizer beside it."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from common.encoder import resolve_model_path

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model_path("default"), local_files_only=True).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """Local path of a random 2-layer BERT (hidden 32, 2 heads) with the MiniLM vocabulary.

    Dropout is off so that separate forward passes of the same users agree exactly.
    """
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return _save_tiny(config, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Local path of a random 2-layer Llama (hidden 32), a decoder-only encoder (last-token pooling)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return _save_tiny(config, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def movietweetings():
    """The built-in MovieTweetings data and its leave-one-out split."""
    from common.data import leave_one_out

    data = load(DataSpec())
    return data, leave_one_out(data)

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

"""Datasets: read, preprocess into per-user sequences, split leave-one-out.

Three sources (preprocessing and split: docs/DESIGN.md, "Evaluation protocol"):

- ``movietweetings``: the MovieTweetings 100K snapshot shipped in
  ``common/datasets/movietweetings`` (the default; works offline);
- ``movielens``: a directory the user downloaded, ml-100k or ml-1m layout;
- ``csv``: an interactions CSV ``user_id,item_id,timestamp[,rating][,site]``
  plus an items CSV ``item_id,<text columns...>``.

Preprocessing is the same for all: optional rating threshold, chronological
stable sort per user (ties keep file order), duplicates dropped keeping the
first occurrence, users with fewer than ``k_core`` interactions dropped. The
item catalogue is never filtered: ranking is over every item.

Example::

    data = load(DataSpec())  # the built-in MovieTweetings
    split = leave_one_out(data)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common import sources
from common.settings import DATASETS, DataSpec
from common.sources import DataError, RawData
from common.text import render_item, template_fields

__all__ = [
    "Catalogue",
    "DataError",
    "DataSpec",
    "Interactions",
    "Split",
    "leave_one_out",
    "load",
    "preprocess",
    "spec_for",
    "summary",
]

@dataclass(frozen=True)
class Catalogue:
    """The public item catalogue; position in the tuples = internal item index."""

    item_ids: tuple[str, ...]
    texts: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.item_ids)

    def fingerprint(self) -> str:
        """SHA-256 over the item ids and item texts, in order: two parties with the same
        fingerprint put every item bias and count on the same item.

        >>> Catalogue(("a", "b"), ("A", "B"), ((), ())).fingerprint() == Catalogue(("b", "a"), ("B", "A"), ((), ())).fingerprint()
        False
        """
        h = hashlib.sha256(b"fedenc-catalogue-v1")
        for item, text in zip(self.item_ids, self.texts, strict=True):
            _update_framed(h, item.encode())
            _update_framed(h, text.encode())
        return h.hexdigest()


@dataclass(frozen=True, eq=False)  # eq=False: arrays and frames do not compare to one bool
class Interactions:
    """Preprocessed interactions: one chronological item sequence per user."""

    name: str
    catalogue: Catalogue
    user_ids: tuple[str, ...]
    sequences: tuple[np.ndarray, ...]
    user_attributes: pd.DataFrame
    raw_counts: dict = field(default_factory=dict)

    def fingerprint(self, users: Sequence[int] | None = None) -> str:
        """SHA-256 over the catalogue ids and the given users' ids and sequences.

        Stable across processes and machines (no Python ``hash``), so a site and
        the server can check they read the same data.

        Example::

            data.fingerprint() == data.fingerprint(range(len(data.user_ids)))  # True
        """
        h = hashlib.sha256(b"fedenc-interactions-v1")
        for item in self.catalogue.item_ids:
            _update_framed(h, item.encode())
        for u in range(len(self.user_ids)) if users is None else users:
            _update_framed(h, self.user_ids[u].encode())
            _update_framed(h, np.asarray(self.sequences[u], dtype="<i8").tobytes())
        return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Split:
    """Leave-one-out split: per user train prefix, validation item, test item.

    ``num_items`` (the catalogue size) sizes ``popularity``; it is filled by
    ``leave_one_out``.
    """

    train: tuple[np.ndarray, ...]
    valid: np.ndarray
    test: np.ndarray
    num_items: int

    def popularity(self, users: Sequence[int] | None = None) -> np.ndarray:
        """Per-item interaction counts over TRAIN items only (of the given users).

        Example::

            split.popularity([0, 3]).shape == (len(data.catalogue),)  # True
        """
        chosen = range(len(self.train)) if users is None else users
        seqs = [self.train[u] for u in chosen]
        flat = np.concatenate(seqs) if seqs else np.empty(0, dtype=np.int64)
        return np.bincount(flat, minlength=self.num_items).astype(np.float64)


def _update_framed(h, payload: bytes) -> None:
    # Length-prefix every field so that different splits of the bytes never collide.
    h.update(len(payload).to_bytes(8, "little"))
    h.update(payload)


def spec_for(dataset: str, items_path: str | None = None, **settings) -> DataSpec:
    """Turn a dataset name or path (as typed on the command line) into a DataSpec.

    A directory is a MovieLens download, a ``.csv`` file an interactions CSV.

    >>> spec_for("movietweetings").dataset
    'movietweetings'
    >>> spec_for("runs/interactions.csv").dataset
    'csv'
    """
    if dataset == "movietweetings":
        if items_path is not None:
            raise DataError("--items applies to a CSV dataset, not to the built-in movietweetings")
        return DataSpec(dataset="movietweetings", **settings)
    if dataset in ("movielens", "csv"):
        raise DataError(
            f"dataset '{dataset}' needs a path: give the MovieLens directory or the interactions .csv file"
        )
    path = Path(dataset).expanduser()
    if path.is_dir():
        return DataSpec(dataset="movielens", data_path=str(path), **settings)
    if path.suffix.lower() == ".csv":
        return DataSpec(dataset="csv", data_path=str(path), items_path=items_path, **settings)
    if path.exists():
        raise DataError(f"{path}: expected a MovieLens directory or an interactions .csv file")
    raise DataError(
        f"unknown dataset '{dataset}': expected 'movietweetings', a MovieLens directory or an interactions .csv file"
    )


def load(spec: DataSpec) -> Interactions:
    """Read and preprocess a dataset; raises DataError on any bad input.

    Example::

        data = load(DataSpec(dataset="movielens", data_path="data/ml-100k"))
        data.raw_counts  # {'users': 943, 'items': 1682, 'interactions': 100000}
    """
    if spec.dataset not in DATASETS:
        raise DataError(f"unknown dataset '{spec.dataset}': expected one of {', '.join(DATASETS)}")
    if spec.k_core < 1:
        raise DataError(f"k-core must be at least 1, got {spec.k_core}")
    if spec.dataset == "movietweetings":
        raw = sources.read_movietweetings()
    elif spec.data_path is None:
        raise DataError(f"dataset '{spec.dataset}' needs data-path")
    elif spec.dataset == "movielens":
        raw = sources.read_movielens(Path(spec.data_path))
    else:
        data_path = Path(spec.data_path)
        items_path = Path(spec.items_path) if spec.items_path else data_path.with_name("items.csv")
        raw = sources.read_csv_pair(data_path, items_path)
    catalogue = build_catalogue(raw, spec.text_columns, spec.item_template)
    return preprocess(
        raw.interactions,
        catalogue,
        name=raw.name,
        user_attributes=raw.user_attributes,
        rating_threshold=spec.rating_threshold,
        k_core=spec.k_core,
        source=raw.interactions_source,
    )


def build_catalogue(raw: RawData, text_columns: Sequence[str] | None, template: str | None) -> Catalogue:
    """Render every item's text from the chosen columns (or a template).

    Example::

        build_catalogue(sources.read_movietweetings(), None, None).texts[0]
        # "Fantômas - À l'ombre de la guillotine (1913) | Crime, Drama"
    """
    items = raw.items
    available = [c for c in items.columns if c != "item_id"]
    columns = list(text_columns) if text_columns else list(raw.default_text_columns or available)
    wanted = columns + (template_fields(template) if template else [])
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(
            f"{raw.items_source}: no item column {', '.join(map(repr, missing))} "
            f"(available: {', '.join(available)})"
        )
    values = items[available].fillna("").astype(str)
    ids = items["item_id"].astype(str).str.strip()
    if (ids == "").any():
        row = int(np.flatnonzero((ids == "").to_numpy())[0])
        raise DataError(f"{raw.items_source}: empty item_id (data row {row + 1})")
    texts = tuple(render_item(row, columns, template) for row in values.to_dict("records"))
    return Catalogue(tuple(items["item_id"]), texts, raw.categories)


def preprocess(
    interactions: pd.DataFrame,
    catalogue: Catalogue,
    *,
    name: str,
    user_attributes: pd.DataFrame | None = None,
    rating_threshold: float | None = None,
    k_core: int = 5,
    source: str = "interactions",
) -> Interactions:
    """Turn raw interaction rows (in file order) into per-user chronological sequences.

    ``interactions`` has string ``user_id`` and ``item_id``, numeric ``timestamp``
    and optionally ``rating``; its row order is the file order. ``user_attributes``
    is indexed by external user id.

    >>> rows = pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["b", "a", "b"], "timestamp": [2, 1, 3]})
    >>> cat = Catalogue(("a", "b"), ("A", "B"), ((), ()))
    >>> preprocess(rows, cat, name="toy", k_core=1).sequences[0].tolist()
    [0, 1]
    """
    for column in ("user_id", "item_id"):
        empty = interactions[column].isna() | (interactions[column].astype(str).str.strip() == "")
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise DataError(f"{source}: empty {column} (data row {row + 1}); every interaction needs a user and an item")
    raw_counts = {
        "users": int(interactions["user_id"].nunique()),
        "items": int(interactions["item_id"].nunique()),
        "interactions": len(interactions),
    }
    item_index = pd.Index(catalogue.item_ids)
    if not item_index.is_unique:
        dup = item_index[item_index.duplicated()][0]
        raise DataError(f"item id {dup!r} appears more than once in the item catalogue")
    items = item_index.get_indexer(interactions["item_id"])
    if (items < 0).any():
        unknown = interactions["item_id"][items < 0]
        examples = ", ".join(repr(v) for v in unknown.unique()[:3])
        raise DataError(
            f"{source}: {len(unknown)} interactions name item ids absent from the item catalogue, e.g. {examples}"
        )
    frame = pd.DataFrame(
        {
            "user": interactions["user_id"].to_numpy(),
            "item": items.astype(np.int64),
            "timestamp": interactions["timestamp"].to_numpy(),
        }
    )
    if rating_threshold is not None and "rating" in interactions.columns:
        frame = frame[interactions["rating"].to_numpy() >= rating_threshold]

    user_order = _sorted_ids(frame["user"].unique())
    user_code = pd.Index(user_order).get_indexer(frame["user"])
    # The file row is the last key, so ties in time keep file order whatever sort lexsort uses.
    order = np.lexsort((np.arange(len(frame)), frame["timestamp"].to_numpy(), user_code))
    frame = frame.iloc[order].assign(code=user_code[order])
    # After the chronological sort, "first" is the earliest occurrence of the pair.
    frame = frame.drop_duplicates(["code", "item"], keep="first")

    counts = np.bincount(frame["code"].to_numpy(), minlength=len(user_order))
    keep = counts >= k_core
    if not keep.any():
        longest = int(counts.max()) if len(counts) else 0
        raise DataError(
            f"{source}: k-core {k_core} leaves no users (the longest history has {longest} interactions); "
            f"lower k-core"
        )
    frame = frame[keep[frame["code"].to_numpy()]]
    kept_ids = [u for u, k in zip(user_order, keep, strict=True) if k]
    bounds = np.cumsum(counts[keep])[:-1]
    sequences = tuple(np.split(frame["item"].to_numpy(dtype=np.int64), bounds))

    if user_attributes is None:
        attributes = pd.DataFrame(index=pd.RangeIndex(len(kept_ids)))
    else:
        attributes = user_attributes.reindex(kept_ids).reset_index(drop=True)
    return Interactions(
        name=name,
        catalogue=catalogue,
        user_ids=tuple(kept_ids),
        sequences=sequences,
        user_attributes=attributes,
        raw_counts=raw_counts,
    )


def _sorted_ids(ids) -> list[str]:
    # Numeric ids sort as numbers ("2" before "10"), the rest as strings; never by hash.
    ids = [str(i) for i in ids]
    if all(i.isdigit() for i in ids):
        return sorted(ids, key=lambda i: (int(i), i))
    return sorted(ids)


def leave_one_out(data: Interactions) -> Split:
    """Last item = test, second-to-last = validation, the rest = train.

    >>> rows = pd.DataFrame({"user_id": ["u"] * 4, "item_id": list("abcd"), "timestamp": [4, 3, 2, 1]})
    >>> split = leave_one_out(preprocess(rows, Catalogue(tuple("abcd"), tuple("ABCD"), ((),) * 4), name="toy", k_core=3))
    >>> split.train[0].tolist(), int(split.valid[0]), int(split.test[0])
    ([3, 2], 1, 0)
    """
    short = [u for u, s in enumerate(data.sequences) if len(s) < 3]
    if short:
        raise DataError(
            f"leave-one-out needs at least 3 interactions per user; user {data.user_ids[short[0]]!r} has "
            f"{len(data.sequences[short[0]])} (set k-core to 3 or more)"
        )
    return Split(
        train=tuple(s[:-2] for s in data.sequences),
        valid=np.array([s[-2] for s in data.sequences], dtype=np.int64),
        test=np.array([s[-1] for s in data.sequences], dtype=np.int64),
        num_items=len(data.catalogue),
    )


def summary(data: Interactions, split: Split) -> dict:
    """Counts and shape of a preprocessed dataset, as ``fedenc data describe`` shows them.

    Example::

        summary(data, leave_one_out(data))["users"]  # 943 for MovieLens-100K
    """
    lengths = np.array([len(s) for s in data.sequences])
    interactions = int(lengths.sum())
    popularity = split.popularity()
    cold = popularity[split.test] == 0
    return {
        "users": len(data.user_ids),
        "catalogue_items": len(data.catalogue),
        "items_with_interactions": int(np.unique(np.concatenate(data.sequences)).size),
        "interactions": interactions,
        "density": interactions / (len(data.user_ids) * len(data.catalogue)),
        "history_percentiles": {
            p: float(np.percentile(lengths, q)) for p, q in (("p5", 5), ("p25", 25), ("p50", 50), ("p75", 75), ("p95", 95))
        }
        | {"max": int(lengths.max())},
        "cold_test_items": int(np.unique(split.test[cold]).size),
        "cold_test_users": int(cold.sum()),
    }

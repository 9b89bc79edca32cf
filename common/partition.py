"""Assign users to sites, with Flower Datasets' partitioners.

The privacy unit is the user, so sites partition users, never interactions:
every user (and all of that user's history) belongs to exactly one site.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

from common.data import DataError, Interactions

PARTITIONS = ("iid", "dirichlet", "natural")
UNKNOWN = "unknown"


def partition_users(
    data: Interactions,
    num_sites: int,
    kind: str = "iid",
    column: str | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split the users into ``num_sites`` sites; returns sorted user indices per site.

    - ``iid``: users shuffled with ``seed``, then cut into equal shards;
    - ``dirichlet``: label skew over each user's dominant category, Dirichlet(alpha);
    - ``natural``: by a user attribute (``column``, e.g. occupation or site); when it has
      more values than sites, whole values are packed into sites, largest first.

    >>> import pandas as pd
    >>> from common.data import Catalogue, preprocess
    >>> rows = pd.DataFrame({"user_id": [f"u{i // 3}" for i in range(30)], "item_id": list("abc") * 10, "timestamp": range(30)})
    >>> data = preprocess(rows, Catalogue(tuple("abc"), tuple("ABC"), ((),) * 3), name="toy", k_core=3)
    >>> sorted(len(s) for s in partition_users(data, 3, "iid"))
    [3, 3, 4]
    """
    num_users = len(data.user_ids)
    if num_sites < 1:
        raise DataError(f"number of sites must be at least 1, got {num_sites}")
    if num_sites > num_users:
        raise DataError(f"{num_sites} sites but only {num_users} users after filtering; use fewer sites")
    users = np.arange(num_users, dtype=np.int64)
    if kind == "iid":
        # IidPartitioner cuts contiguous shards; shuffling first makes the seed matter.
        dataset = Dataset.from_dict({"user": users}).shuffle(seed=seed)
        partitioner: Partitioner = IidPartitioner(num_partitions=num_sites)
    elif kind == "dirichlet":
        if not alpha > 0:
            raise DataError(f"dirichlet alpha must be positive, got {alpha}")
        dataset = Dataset.from_dict({"user": users, "label": dominant_categories(data)})
        partitioner = DirichletPartitioner(
            num_partitions=num_sites, partition_by="label", alpha=alpha,
            min_partition_size=1, self_balancing=True, seed=seed,
        )  # fmt: skip
    elif kind == "natural":
        dataset = Dataset.from_dict({"user": users, "site": _natural_sites(data, column, num_sites)})
        partitioner = NaturalIdPartitioner(partition_by="site")
    else:
        raise DataError(f"unknown partition '{kind}': expected one of {', '.join(PARTITIONS)}")
    partitioner.dataset = dataset
    sites = _load_all(partitioner, num_sites, kind, alpha)
    for site, members in enumerate(sites):
        if len(members) == 0:
            hint = "use fewer sites or a larger alpha" if kind == "dirichlet" else "use fewer sites"
            raise DataError(f"site {site} of {num_sites} got no users with partition '{kind}'; {hint}")
    return sites


def _load_all(partitioner: Partitioner, num_sites: int, kind: str, alpha: float) -> list[np.ndarray]:
    # The partitioners report retries as warnings and progress on stderr; a caller
    # only needs the result or one DataError.
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return [np.sort(np.asarray(partitioner.load_partition(i)["user"], dtype=np.int64)) for i in range(num_sites)]
    except ValueError as e:
        raise DataError(
            f"partition '{kind}' could not give each of {num_sites} sites a user (alpha {alpha}): {e} "
            f"Use fewer sites or a larger alpha."
        ) from e


def dominant_categories(data: Interactions) -> list[str]:
    """Per user, the most frequent category over their items (ties: alphabetical first).

    Users whose items have no categories get "unknown".

    Example (MovieLens genres)::

        dominant_categories(data)[:2]  # e.g. ['Drama', 'Comedy']
    ['Drama', 'Comedy']
    """
    categories = data.catalogue.categories
    labels = []
    for sequence in data.sequences:
        counts = Counter(c for i in sequence for c in categories[i])
        labels.append(min(counts, key=lambda c: (-counts[c], c)) if counts else UNKNOWN)
    return labels


def _natural_sites(data: Interactions, column: str | None, num_sites: int) -> list[int]:
    """Site number per user from a user attribute, grouping values when there are too many."""
    available = list(data.user_attributes.columns)
    if column is None:
        raise DataError(
            f"partition 'natural' needs a partition column; {data.name} has: {', '.join(available) or 'none'}"
        )
    if column not in available:
        raise DataError(
            f"{data.name}: no user column '{column}' for partition 'natural' (available: {', '.join(available) or 'none'})"
        )
    values = data.user_attributes[column].fillna(UNKNOWN).astype(str).tolist()
    sizes = Counter(values)
    if len(sizes) < num_sites:
        raise DataError(
            f"column '{column}' has {len(sizes)} distinct values, fewer than {num_sites} sites; use fewer sites"
        )
    # Greedy bin packing, largest value first into the currently smallest site (ties by
    # name and site number): deterministic and close to balanced.
    load = [0] * num_sites
    site_of: dict[str, int] = {}
    for value, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        site = min(range(num_sites), key=lambda s: (load[s], s))
        site_of[value] = site
        load[site] += size
    return [site_of[v] for v in values]


def site_values(data: Interactions, sites: list[np.ndarray], column: str) -> list[list[str]]:
    """The attribute values each site holds (for reports of natural partitions).

    Example::

        site_values(data, sites, "occupation")[0]  # e.g. ['educator', 'lawyer']
    ['student']
    """
    values = data.user_attributes[column].fillna(UNKNOWN).astype(str).to_numpy()
    return [sorted(set(values[s])) for s in sites]

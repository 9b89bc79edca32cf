"""``fedenc data describe``: what a dataset and its partition into sites look like."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from cli.errors import fail
from common.data import DataError, leave_one_out, load, spec_for, summary

console = Console()


class PartitionKind(StrEnum):
    iid = "iid"
    dirichlet = "dirichlet"
    natural = "natural"



def describe(
    dataset: Annotated[
        str, typer.Option(help="movietweetings, a MovieLens directory or an interactions .csv")
    ] = "movietweetings",
    items: Annotated[str | None, typer.Option(help="Items CSV (default: items.csv beside the interactions CSV).")] = None,
    sites: Annotated[int, typer.Option(min=1, help="Number of sites to partition users into.")] = 1,
    partition: Annotated[PartitionKind, typer.Option(help="How users are assigned to sites.")] = PartitionKind.iid,
    partition_column: Annotated[str | None, typer.Option(help="User column for --partition natural.")] = None,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration for --partition dirichlet.")] = 0.5,
    k_core: Annotated[int, typer.Option(help="Drop users with fewer interactions than this.")] = 5,
    rating_threshold: Annotated[float | None, typer.Option(help="Keep only ratings >= this.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the partition.")] = 0,
) -> None:
    """Print users, items, interactions, density, history lengths and per-site sizes."""
    # Imported here: flwr_datasets/datasets take a second to import and only this needs them.
    from common.partition import partition_users, site_values

    try:
        spec = spec_for(dataset, items, k_core=k_core, rating_threshold=rating_threshold)
        data = load(spec)
        split = leave_one_out(data)
        site_users = partition_users(data, sites, partition.value, column=partition_column, alpha=alpha, seed=seed)
    except DataError as e:
        fail(str(e))
    stats = summary(data, split)
    raw = data.raw_counts
    console = Console()

    table = Table(title=f"{data.name}", show_header=True)
    table.add_column("")
    table.add_column("before filtering", justify="right")
    table.add_column("after filtering", justify="right")
    table.add_row("users", f"{raw['users']:,}", f"{stats['users']:,}")
    table.add_row("items (with interactions)", f"{raw['items']:,}", f"{stats['items_with_interactions']:,}")
    table.add_row("items (catalogue)", f"{stats['catalogue_items']:,}", f"{stats['catalogue_items']:,}")
    table.add_row("interactions", f"{raw['interactions']:,}", f"{stats['interactions']:,}")
    table.add_row("density", f"{raw['interactions'] / (raw['users'] * stats['catalogue_items']):.5f}", f"{stats['density']:.5f}")
    console.print(table)
    pct = stats["history_percentiles"]
    console.print(
        "history length: " + "  ".join(f"{k} {v:g}" for k, v in pct.items())
        + f"\ncold-start test items (not in any training history): {stats['cold_test_items']:,} "
        f"items, {stats['cold_test_users']:,} users"
        + f"\nfilters: k-core {spec.k_core}"
        + (f", rating >= {spec.rating_threshold:g}" if spec.rating_threshold is not None else "")
    )

    lengths = np.array([len(s) for s in data.sequences])
    console.print(
        f"{sites} site(s), partition {partition.value}"
        + (f" by {partition_column}" if partition == PartitionKind.natural else "")
        + (f", alpha {alpha:g}" if partition == PartitionKind.dirichlet else "")
        + f", seed {seed}"
    )
    sites_table = Table()
    sites_table.add_column("site", justify="right")
    sites_table.add_column("users", justify="right")
    sites_table.add_column("interactions", justify="right")
    if partition == PartitionKind.natural:
        sites_table.add_column(partition_column or "")
    values = site_values(data, site_users, partition_column) if partition == PartitionKind.natural else None
    for i, members in enumerate(site_users):
        row = [str(i), f"{len(members):,}", f"{int(lengths[members].sum()):,}"]
        if values is not None:
            row.append(", ".join(values[i]))
        sites_table.add_row(*row)
    console.print(sites_table)

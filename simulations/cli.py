"""The ``fedenc`` command line.

>>> # fedenc data describe --dataset movietweetings --sites 10 --partition iid
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from common.data import DataError, leave_one_out, load, spec_for, summary

console = Console()
app = typer.Typer(help="Federated, differentially private recommendation with language-model encoders.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

from simulations.deploy import app as deploy_app  # noqa: E402  (cheap: heavy imports are inside its commands)

app.add_typer(deploy_app, name="deploy")


class PartitionKind(str, Enum):
    iid = "iid"
    dirichlet = "dirichlet"
    natural = "natural"


def fail(message: str) -> NoReturn:
    """End the command with one line on stderr and exit code 2 (bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def stopped(signal_name: str, exit_code: int) -> NoReturn:
    """End a command that SIGTERM or SIGINT interrupted, once its Flower processes are stopped:
    one line on stderr and the shell's exit code for that signal (143, 130)."""
    typer.echo(f"error: interrupted by {signal_name}; the Flower processes it started are stopped", err=True)
    raise typer.Exit(exit_code)


@data_app.command("describe")
def describe(
    dataset: Annotated[str, typer.Option(help="movietweetings, a MovieLens directory or an interactions .csv")] = "movietweetings",
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


def run_config(config: Path | None, overrides: list[str]) -> dict:
    """The run config a command was given: a TOML file, then ``--set`` pairs on top."""
    from common.config import load_config_file, parse_overrides

    return (load_config_file(config) if config else {}) | parse_overrides(overrides or [])


def show_round(progress: dict) -> None:
    console.print(
        f"round {progress['round']:>3}  sites {progress['sites']:>3}  loss {progress['train_loss']:.4f}  "
        f"ε {progress['epsilon']:.3f}  NDCG@10 {progress['ndcg@10']:.4f}  HR@10 {progress['hr@10']:.4f}  "
        f"{progress['seconds']:.0f}s"
    )


ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Run-config TOML (e.g. configs/tiny.toml).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: key=value (repeatable).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]


@app.command()
def simulate(
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
) -> None:
    """Run a federated simulation in the foreground; results go to --out."""
    from common.config import ConfigError
    from simulations.interrupt import Interrupted
    from simulations.simulate import SimulationFailed, simulate as run

    try:
        summary = run(run_config(config, set_), out, resume=resume, overwrite=overwrite, on_progress=show_round)
    except ConfigError as err:
        fail(str(err))
    except SimulationFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except Interrupted as stop:
        stopped(str(stop), stop.exit_code)
    best = summary["best_validation"]
    console.print(
        f"done in {summary['wall_seconds']:.0f}s: final NDCG@10 {summary['final']['ndcg@10']:.4f}, "
        f"best round {summary['best_round']} (NDCG@10 {best['ndcg@10']:.4f}), ε {summary['epsilon']:.3f}; results in {out}"
    )


@app.command()
def baseline(
    name: Annotated[str, typer.Argument(help="popularity | zeroshot | centralized | local")],
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run a baseline on the same split and evaluation as simulate; results go to --out."""
    from common.config import ConfigError
    from simulations.baselines import run_baseline

    try:
        summary = run_baseline(name, run_config(config, set_), out)
    except ConfigError as err:
        fail(str(err))
    best = summary["best_validation"]
    console.print(
        f"{name}: NDCG@10 {best['ndcg@10']:.4f}  HR@10 {best['hr@10']:.4f}  MRR@10 {best['mrr@10']:.4f} "
        f"(test, best-validation round {summary['best_round']}); cold-start NDCG@10 {best['cold/ndcg@10']:.4f} "
        f"over {best['cold/users']} users; ε {summary['epsilon']:.3f}; {summary['wall_seconds']:.0f}s; results in {out}"
    )


@app.command()
def sweep(
    out: OutOpt,
    epsilons: Annotated[str, typer.Option(help="Comma-separated ε values; inf = no DP.")] = "1,2,4,8,inf",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per cell (the `seed` setting is offset by 0..N-1).")] = 1,
    baselines: Annotated[str, typer.Option(help="Comma-separated baselines to run beside the federated cells ('' for none).")] = "popularity,zeroshot,centralized,local",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    report_only: Annotated[bool, typer.Option(help="Run nothing: table and plot from the cells finished so far.")] = False,
) -> None:
    """Federated runs at each ε plus baselines: sweep.csv and privacy_utility.png in --out (resumable)."""
    from common.config import ConfigError
    from simulations.interrupt import Interrupted
    from simulations.simulate import SimulationFailed
    from simulations.sweep import parse_epsilons, sweep as run

    try:
        eps = parse_epsilons(epsilons)
        names = [b.strip() for b in baselines.split(",") if b.strip()]
        run(run_config(config, set_), out, eps, seeds, names, log=console.print, report_only=report_only)
    except ConfigError as err:
        fail(str(err))
    except SimulationFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except Interrupted as stop:
        stopped(str(stop), stop.exit_code)


@app.command()
def bench(
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    sites: Annotated[str, typer.Option(help="Site counts for the scale test, comma-separated.")] = "100,1000",
) -> None:
    """Measure DP vs non-DP steps, bytes sent, framework overhead, memory and scale; writes bench.json."""
    from common.config import ConfigError, Settings
    from simulations.bench import bench as run
    from simulations.interrupt import Interrupted
    from simulations.simulate import SimulationFailed

    try:
        cfg = run_config(config, set_)
        Settings.from_config(cfg)
        counts = tuple(int(n) for n in sites.split(",") if n.strip())
    except (ConfigError, ValueError) as err:
        fail(str(err))
    try:
        result = run(cfg, out, site_counts=counts, progress=console.print)
    except SimulationFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except Interrupted as stop:
        stopped(str(stop), stop.exit_code)
    console.print(
        f"dp_step_ratio {result['dp_step_ratio']:.2f}  bytes_ratio 1/{1 / result['bytes_ratio']:.0f} "
        f"(fp16 1/{1 / result['bytes_ratio_fp16']:.0f})  framework_overhead_ratio {result['framework_overhead_ratio']:.2f}  "
        f"peak_rss_mb {result['peak_rss_mb']:.0f}  eval_users_per_s {result['eval_users_per_s']:.0f}  "
        f"max_sites {result['max_sites']}; {out}/bench.json"
    )


def main() -> None:
    """Entry point of the ``fedenc`` script."""
    app()


if __name__ == "__main__":
    main()

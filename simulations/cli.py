"""The ``fedenc`` command line.

Example::

    fedenc data describe --dataset movietweetings --sites 10 --partition iid
"""

from __future__ import annotations

import contextlib
import math
from enum import StrEnum
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

from client.ledger_cli import app as ledger_app  # noqa: E402  (no torch: the ledger needs only Opacus' accountant)

app.add_typer(ledger_app, name="ledger")


class PartitionKind(StrEnum):
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


@contextlib.contextmanager
def run_errors():
    """How a command that runs Flower ends on failure: a bad setting or input is one line and
    exit 2, a failed run one line and exit 1, SIGTERM/SIGINT :func:`stopped`."""
    from common.config import ConfigError
    from simulations.interrupt import Interrupted
    from simulations.simulate import SimulationFailed

    try:
        yield
    except ConfigError as err:
        fail(str(err))
    except SimulationFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except Interrupted as stop:
        stopped(str(stop), stop.exit_code)


@data_app.command("describe")
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


def run_config(config: Path | None, overrides: list[str]) -> dict:
    """The run config a command was given: a TOML file, then ``--set`` pairs on top."""
    from common.config import load_config_file, parse_overrides

    return (load_config_file(config) if config else {}) | parse_overrides(overrides or [])


def show_round(progress: dict) -> None:
    loss = progress.get("train_loss")  # None or NaN under DP: a site's training loss does not leave it
    shown = f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "–"
    console.print(
        f"round {progress['round']:>3}  sites {progress['sites']:>3}  loss {shown}  "
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
    from simulations.simulate import simulate as run

    with run_errors():
        summary = run(run_config(config, set_), out, resume=resume, overwrite=overwrite, on_progress=show_round)
    best = summary["best_validation"]
    console.print(
        f"done in {summary['wall_seconds']:.0f}s: final NDCG@10 {summary['final']['ndcg@10']:.4f}, "
        f"best round {summary['best_round']} (NDCG@10 {best['ndcg@10']:.4f}), ε {summary['epsilon']:.3f}; results in {out}"
    )
    from simulations.report import write_report

    written = write_report(out)
    console.print(f"model card {written['card']}, run report {written['plot']}")


@app.command()
def baseline(
    name: Annotated[str, typer.Argument(help="popularity | zeroshot | centralized | local | bpr | als | sasrec")],
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
    baselines: Annotated[
        str, typer.Option(help="Comma-separated baselines to run beside the federated cells ('' for none).")
    ] = "popularity,zeroshot,centralized,local",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    report_only: Annotated[bool, typer.Option(help="Run nothing: table and plot from the cells finished so far.")] = False,
) -> None:
    """Federated runs at each ε plus baselines: sweep.csv and privacy_utility.png in --out (resumable)."""
    from simulations.sweep import parse_epsilons, sweep as run

    with run_errors():
        eps = parse_epsilons(epsilons)
        names = [b.strip() for b in baselines.split(",") if b.strip()]
        run(run_config(config, set_), out, eps, seeds, names, log=console.print, report_only=report_only)


@app.command()
def audit(
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    canaries: Annotated[int, typer.Option(help="Canary users (each included with probability 1/2, all at site 0).")] = 200,
    overwrite: Annotated[bool, typer.Option(help="Replace the audit in --out.")] = False,
) -> None:
    """Empirical ε lower bound from canary users (one-run audit), beside the accountant's ε and a no-noise control."""
    from simulations.audit import MIN_CONTROL_EPSILON, audit as run, format_bound

    def progress(name: str, p: dict) -> None:
        console.print(f"{name:>7} ", end="")
        show_round(p)

    with run_errors():
        result = run(run_config(config, set_), out, count=canaries, overwrite=overwrite, on_progress=progress,
                     log=console.print)
    table = Table(title=f"privacy audit: {result['canaries']} canaries ({result['canaries_included']} in), "
                        f"{result['confidence']:.0%} confidence, δ = {result['delta']:.1e}")
    for column in ("run", "claimed ε", "ε lower bound", "correct / guesses", "AUROC", "TPR @ 1% FPR", "wall s"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, claimed in (("dp", format_bound(result["epsilon_claimed"])), ("control", "∞ (no noise)")):
        r = result[name]
        table.add_row(name, claimed, format_bound(r["epsilon_lower_bound"]), f"{r['correct']} / {r['guesses']}",
                      f"{r['auroc']:.3f}", f"{r['tpr_at_1pct_fpr']:.3f}", f"{result['wall_seconds'][name]:.0f}")
    console.print(table)
    if result["verdict"] == "violation":
        typer.echo(f"error: the lower bound ε ≥ {result['epsilon_lower_bound']:.3f} exceeds the claimed "
                   f"ε = {result['epsilon_claimed']:.3f}: the privacy claim does not hold; see {out}/audit.json", err=True)
        raise typer.Exit(1)
    if result["verdict"] == "no power":
        console.print(f"[bold]the attack has no power here:[/bold] the control without noise shows only ε ≥ "
                      f"{result['control_epsilon_lower_bound']:.3f} (it must reach {MIN_CONTROL_EPSILON:g} and beat the DP run), "
                      "so the DP run's bound says nothing about the claim; more canaries or white-box gradient canaries "
                      "would help")
    else:
        console.print(f"consistent: the DP run's lower bound ({result['epsilon_lower_bound']:.3f}) stays below the claimed "
                      f"ε ({result['epsilon_claimed']:.3f}) while the control shows the attack can see a leak "
                      f"(ε ≥ {result['control_epsilon_lower_bound']:.3f}); results in {out}")


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

    try:
        cfg = run_config(config, set_)
        Settings.from_config(cfg)
        counts = tuple(int(n) for n in sites.split(",") if n.strip())
    except (ConfigError, ValueError) as err:
        fail(str(err))
    with run_errors():
        result = run(cfg, out, site_counts=counts, progress=console.print)
    console.print(
        f"dp_step_ratio {result['dp_step_ratio']:.2f}  bytes_ratio 1/{1 / result['bytes_ratio']:.0f} "
        f"(fp16 1/{1 / result['bytes_ratio_fp16']:.0f})  framework_overhead_ratio {result['framework_overhead_ratio']:.2f}  "
        f"peak_rss_mb {result['peak_rss_mb']:.0f}  eval_users_per_s {result['eval_users_per_s']:.0f}  "
        f"max_sites {result['max_sites']}; {out}/bench.json"
    )


def history_queries(history: str | None, history_file: Path | None) -> list[str]:
    """The items a user gave: ``"title; title"`` or a file with one item per line (oldest first)."""
    if history_file is not None:
        try:
            lines = history_file.read_text().splitlines()
        except OSError as err:
            fail(f"--history-file: {err.strerror}: {history_file}")
        return [line.strip() for line in lines if line.strip()]
    return [part.strip() for part in (history or "").split(";") if part.strip()]


@app.command()
def recommend(
    run: Annotated[Path, typer.Option("--run", help="A finished run folder (with adapter/).")],
    history: Annotated[str | None, typer.Option(help='Items the user had, oldest first: "title; title" (or item ids).')] = None,
    history_file: Annotated[Path | None, typer.Option(help="A file with one title or item id per line, oldest first.")] = None,
    user: Annotated[str | None, typer.Option(help="A user id of the run's dataset: their whole history.")] = None,
    dataset: Annotated[str | None, typer.Option(help="With --user: the dataset holding the user (default: the run's).")] = None,
    items: Annotated[str | None, typer.Option(help="With --dataset CSV: the items CSV.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many items to recommend.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
) -> None:
    """Top-k catalogue items for a history, from a run's global model (never an item of the history)."""
    import json

    from transformers.utils import logging as hf_logging

    from common.recommend import RunError, describe_unknown, load_run

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the answer on a terminal
    if sum(x is not None for x in (history, history_file, user)) != 1:
        fail("give exactly one of --history, --history-file or --user")
    queries = [] if user is not None else history_queries(history, history_file)
    if user is None and not queries:
        fail("the history is empty: give at least one title or item id")
    try:
        model = load_run(run, device)
        unknown: dict[str, list[str]] = {}
        if user is not None:
            indices = user_history(model, user, dataset, items)
        else:
            indices, unknown = model.lookup(queries)
            if not indices:
                named = "; ".join(describe_unknown(q, c) for q, c in unknown.items())
                fail(f"no item of the history is in the catalogue: {named}")
        recs = model.recommend([indices], k=k)[0]
    except (RunError, DataError) as err:
        fail(str(err))
    for query, closest in unknown.items():
        typer.echo(f"warning: {describe_unknown(query, closest)}; left out of the history", err=True)
    cat = model.data.catalogue
    if json_out:
        typer.echo(json.dumps({
            "run": str(run), "k": k, "user": user,
            "history": [{"item_id": cat.item_ids[i], "title": model.titles[i]} for i in indices],
            "unknown": [{"query": q, "closest": c} for q, c in unknown.items()],
            "recommendations": [{"rank": r, "item_id": x.item_id, "title": x.title, "score": x.score}
                                for r, x in enumerate(recs, 1)],
        }, indent=1, ensure_ascii=False))
        return
    table = Table(title=f"top {len(recs)} for a history of {len(indices)} item(s)" + (f" (user {user})" if user else ""))
    for name, justify in (("#", "right"), ("score", "right"), ("title", "left"), ("item id", "left")):
        table.add_column(name, justify=justify)
    for r, x in enumerate(recs, 1):
        table.add_row(str(r), f"{x.score:.3f}", x.title, x.item_id)
    console.print(table)


def user_history(model, user: str, dataset: str | None, items: str | None) -> list[int]:
    """``user``'s whole history, from the run's dataset or from ``dataset`` (same catalogue)."""
    from common.recommend import RunError

    if dataset is None:
        return model.history_of(user)
    spec = model.settings.data
    data = load(spec_for(dataset, items, k_core=spec.k_core, rating_threshold=spec.rating_threshold))
    if data.catalogue.item_ids != model.data.catalogue.item_ids:
        raise RunError(f"--dataset {dataset}: its item catalogue is not the one the run's model ranks")
    if user not in data.user_ids:
        raise RunError(f"user {user!r} is not in {dataset}")
    return [int(i) for i in data.sequences[data.user_ids.index(user)]]


@app.command()
def report(run: Annotated[Path, typer.Argument(help="A run folder (with summary.json and metrics.jsonl).")]) -> None:
    """(Re)write a run's MODEL_CARD.md and report.png (and the model card in summary.json)."""
    from simulations.report import ReportError, write_report

    try:
        written = write_report(run)
    except ReportError as err:
        fail(str(err))
    console.print(f"wrote {written['card']} and {written['plot']}")


def main() -> None:
    """Entry point of the ``fedenc`` script."""
    app()


if __name__ == "__main__":
    main()

"""The commands that run Flower or train: ``simulate``, ``baseline``, ``sweep``, ``ablation``, ``audit``, ``bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.errors import fail, run_errors
from cli.progress import RunProgress, round_line

console = Console()


def run_config(config: Path | None, overrides: list[str]) -> dict:
    """The run config a command was given: a TOML file, then ``--set`` pairs on top."""
    from common.config import load_config_file, parse_overrides

    return (load_config_file(config) if config else {}) | parse_overrides(overrides or [])


def show_round(progress: dict) -> None:
    console.print(round_line(progress), soft_wrap=True)


ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Run-config TOML (e.g. configs/tiny.toml).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: key=value (repeatable).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]


def simulate(
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
) -> None:
    """Run a federated simulation in the foreground; results go to --out."""
    from simulations.simulate import simulate as run

    with run_errors(), RunProgress(console) as shown:
        summary = run(run_config(config, set_), out, resume=resume, overwrite=overwrite, on_progress=shown.round,
                      on_event=shown.event)
    best = summary["best_validation"]
    console.print(
        f"done in {summary['wall_seconds']:.0f}s: final NDCG@10 {summary['final']['ndcg@10']:.4f}, "
        f"best round {summary['best_round']} (NDCG@10 {best['ndcg@10']:.4f}), ε {summary['epsilon']:.3f}; results in {out}",
        soft_wrap=True,  # one line in a log, whatever its width
    )
    from simulations.report import write_report

    written = write_report(out)
    console.print(f"model card {written['card']}, run report {written['plot']}")


def baseline(
    name: Annotated[str, typer.Argument(help="popularity | zeroshot | centralized | local | bpr | als | sasrec")],
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run a baseline on the same split and evaluation as simulate; results go to --out."""
    from common.config import ConfigError
    from common.progress import following
    from simulations.baselines import run_baseline
    from simulations.library_baselines import progress_unit

    unit = progress_unit(name)
    try:
        with following(out / "metrics.jsonl", lambda line: console.print(round_line(line, unit), soft_wrap=True)):
            summary = run_baseline(name, run_config(config, set_), out)
    except ConfigError as err:
        fail(str(err))
    best = summary["best_validation"]
    console.print(
        f"{name}: NDCG@10 {best['ndcg@10']:.4f}  HR@10 {best['hr@10']:.4f}  MRR@10 {best['mrr@10']:.4f} "
        f"(test, best-validation round {summary['best_round']}); cold-start NDCG@10 {best['cold/ndcg@10']:.4f} "
        f"over {best['cold/users']} users; ε {summary['epsilon']:.3f}; {summary['wall_seconds']:.0f}s; results in {out}",
        soft_wrap=True,
    )


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


def ablation(
    out: OutOpt,
    epsilons: Annotated[str, typer.Option(help="Comma-separated ε values; inf = no DP.")] = "8,inf",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per cell (the `seed` setting is offset by 0..N-1).")] = 1,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    report_only: Annotated[bool, typer.Option(help="Run nothing: the table from the cells finished so far.")] = False,
) -> None:
    """What each part adds: prior alone, text tower alone, round 0, one trained part at a time, all parts;
    ablation.csv and ablation.md in --out (resumable)."""
    from simulations.ablation import ablation as run
    from simulations.sweep import parse_epsilons

    with run_errors():
        result = run(run_config(config, set_), out, parse_epsilons(epsilons), seeds, log=console.print,
                     report_only=report_only)
    console.print(result["markdown"], markup=False, highlight=False, soft_wrap=True)


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


def bench(
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    sites: Annotated[str, typer.Option(help="Site counts for the scale test, comma-separated.")] = "100,1000",
    parts: Annotated[str, typer.Option(help="Parts to run: steps, eval, overhead, scale.")] = "steps,eval,overhead,scale",
    time_limit: Annotated[float, typer.Option(min=0, help="Seconds for the whole bench: the part running when they "
                                                          "run out is stopped and later ones left out (0: none).")] = 1200,
) -> None:
    """Measure DP vs non-DP steps, bytes sent, framework overhead, memory and scale; writes bench.json
    (after every part: an interrupted or timed-out bench keeps what finished)."""
    from common.config import ConfigError, Settings
    from simulations.bench import bench as run

    try:
        cfg = run_config(config, set_)
        Settings.from_config(cfg)
        counts = tuple(int(n) for n in sites.split(",") if n.strip())
        chosen = tuple(p.strip() for p in parts.split(",") if p.strip())
    except (ConfigError, ValueError) as err:
        fail(str(err))
    with run_errors():
        result = run(cfg, out, site_counts=counts, progress=console.print, parts=chosen, time_limit=time_limit or None)
    shown = []  # the headline numbers of the parts that ran
    if "dp_step_ratio" in result:
        shown += [f"dp_step_ratio {result['dp_step_ratio']:.2f}", f"bytes_ratio 1/{1 / result['bytes_ratio']:.0f} "
                  f"(fp16 1/{1 / result['bytes_ratio_fp16']:.0f})"]
    if "eval_users_per_s" in result:
        shown.append(f"eval_users_per_s {result['eval_users_per_s']:.0f}")
    if "framework_overhead_ratio" in result:
        shown += [f"framework_overhead_ratio {result['framework_overhead_ratio']:.2f}",
                  f"peak_pss_mb {result['peak_pss_mb']:.0f}"]
    if "max_sites" in result:
        shown.append(f"max_sites {result['max_sites']}")
    console.print("  ".join(shown) + f"; {out}/bench.json")
    ran = result["parts"]
    if not ran["complete"]:
        typer.echo(f"error: bench.json is partial ({ran['stopped'] or 'time limit'}): ran {', '.join(ran['done']) or 'nothing'}; "
                   f"left out {', '.join(ran['skipped']) or 'nothing'}", err=True)
        raise typer.Exit(1)

"""``fedenc deploy``: certificates, keys, SuperLink, SuperNodes and runs across partner sites.

What each machine runs is in the README's "Deploy across sites"; the library behind these
commands is :mod:`deploy`. Every command that starts a Flower process has ``--print`` to show
the command instead of running it.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import fail, stopped
from deploy import DeployError
from deploy.certs import make_certs, make_site_keys
from deploy.processes import Interrupted, interrupt_on_signals, stop_tree, uninterrupted
from deploy.sites import check_site_data, node_config, run_site, split_builtin, supernode_command, worker_command
from deploy.superlink import deploy_env, register_key, run_federation, superlink_command, write_connection

app = typer.Typer(help="Deploy across partner sites: certificates, keys, SuperLink, SuperNodes, runs.", no_args_is_help=True)


def _exec(cmd: list[str], env: dict | None, show: bool) -> None:
    """Run a Flower process in the foreground and exit with its code; SIGTERM or Ctrl-C stop
    it and everything it started (Flower's processes start sessions of their own)."""
    if show:
        typer.echo(shlex.join(cmd))
        return
    typer.echo(f"$ {shlex.join(cmd)}", err=True)
    try:
        with interrupt_on_signals():
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            try:
                code = proc.wait()
            finally:
                if proc.poll() is None:
                    with uninterrupted():
                        stop_tree(proc)
    except Interrupted as stop:
        stopped(str(stop), stop.exit_code)
    raise typer.Exit(code)


HomeOpt = Annotated[Path, typer.Option("--home", help="Flower's home folder (FLWR_HOME) for this federation.")]


@app.command("certs")
def certs_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Name or IP the sites use to reach the SuperLink (repeatable).")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 365,
) -> None:
    """Create a CA and a SuperLink TLS certificate. Give ca.crt (only) to every site."""
    try:
        paths = make_certs(out, tuple(host or ("127.0.0.1", "localhost")), days)
    except DeployError as err:
        fail(str(err))
    typer.echo(f"CA certificate (give to sites): {paths['ca']}\nSuperLink certificate: {paths['cert']}\n"
               f"SuperLink key (keep private): {paths['key']}\nCA key (keep offline): {paths['ca_key']}")


@app.command("keys")
def keys_cmd(
    site: Annotated[str, typer.Option("--site", help="Site name, e.g. site-a.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for SITE.key and SITE.key.pub.")],
) -> None:
    """Create a site's SuperNode authentication key pair. Send only SITE.key.pub to the operator."""
    try:
        private, public = make_site_keys(site, out)
    except DeployError as err:
        fail(str(err))
    typer.echo(f"private key (stays at the site): {private}\npublic key (send to the operator): {public}")


@app.command("demo-data")
def demo_data_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for site-K.csv, server.csv and items.csv.")],
    sites: Annotated[int, typer.Option(min=1, help="Number of sites.")] = 3,
    users: Annotated[int, typer.Option(min=0, help="Users per site (0: all).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the user split.")] = 0,
) -> None:
    """Split the built-in MovieTweetings into per-site CSVs and a server evaluation set (to try a deployment)."""
    try:
        files = split_builtin(out, sites, seed, users)
    except DeployError as err:
        fail(str(err))
    typer.echo("\n".join(f"{k}: {v}" for k, v in files.items()) + f"\nitems: {out / 'items.csv'}")


@app.command("superlink")
def superlink_cmd(
    certs: Annotated[Path, typer.Option("--certs", help="Folder made by `fedenc deploy certs`.")],
    state: Annotated[Path, typer.Option("--state", help="Folder for the SuperLink's database and log.")],
    port: Annotated[int, typer.Option(help="The one port of the SuperLink (Fleet, Control, Runtime APIs).")] = 9093,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for remote sites).")] = "127.0.0.1",
    show: Annotated[bool, typer.Option("--print", help="Print the command instead of running it.")] = False,
) -> None:
    """Start flower-superlink with TLS and SuperNode authentication (foreground)."""
    try:
        cmd = superlink_command(certs, port, state, host)
    except DeployError as err:
        fail(str(err))
    state.mkdir(parents=True, exist_ok=True)
    _exec(cmd, deploy_env(state / "flwr-home"), show)


@app.command("connection")
def connection_cmd(
    home: HomeOpt,
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port.")] = "127.0.0.1:9093",
    ca: Annotated[Path, typer.Option(help="CA certificate (ca.crt).")] = Path("certs/ca.crt"),
    name: Annotated[str, typer.Option(help="Connection name for `flwr run . NAME`.")] = "fedenc",
) -> None:
    """Write a TLS connection into FLWR_HOME/config.toml (for `flwr run` and `flwr supernode register`)."""
    try:
        path = write_connection(home, name, superlink, ca)
    except DeployError as err:
        fail(str(err))
    typer.echo(f"connection {name!r} -> {superlink} written to {path}; use FLWR_HOME={home}")


@app.command("register")
def register_cmd(
    key: Annotated[Path, typer.Argument(help="A site's public key (SITE.key.pub).")],
    home: HomeOpt,
    name: Annotated[str, typer.Option(help="Connection name.")] = "fedenc",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the SuperLink.")] = 60.0,
) -> None:
    """Register a site's public key with the SuperLink (flwr supernode register)."""
    try:
        node = register_key(key, name, deploy_env(home), timeout)
    except DeployError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"registered {key} as node {node}")


@app.command("supernode")
def supernode_cmd(
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port.")],
    ca: Annotated[Path, typer.Option(help="The operator's CA certificate (ca.crt).")],
    key: Annotated[Path, typer.Option(help="This site's private key (SITE.key).")],
    data_path: Annotated[Path, typer.Option(help="This site's interactions CSV.")],
    site_id: Annotated[int, typer.Option(help="This site's number (as the server reports it).")],
    ledger_path: Annotated[
        Path | None, typer.Option(help="This site's privacy ledger (JSON; kept across runs). Required.")
    ] = None,
    epsilon_budget: Annotated[float | None, typer.Option(help="The most ε this site's ledger may ever hold. Required.")] = None,
    items_path: Annotated[Path | None, typer.Option(help="Items CSV (default: items.csv beside data-path).")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="The site's state beside its ledger: marker, kept replies, row cache (default ~/.local/state/fedenc)."),
    ] = None,
    delta: Annotated[float | None, typer.Option(help="A cap on δ (default 1/(10 n) rounded down to a power of ten).")] = None,
    allow_non_private: Annotated[bool, typer.Option(help="Serve runs that ask for no DP (exact releases).")] = False,
    port: Annotated[int, typer.Option(help="Local port of this SuperNode (one per SuperNode on a machine).")] = 9094,
    max_wait: Annotated[float, typer.Option(help="Give up after this many seconds without a SuperLink (0: never).")] = 60.0,
    worker: Annotated[
        bool,
        typer.Option(help="Run the site's resident worker beside the SuperNode (libraries and data kept in memory "
                          "between messages; --no-worker: every message opens the site afresh)."),
    ] = True,
    show: Annotated[bool, typer.Option("--print", help="Print the commands instead of running them.")] = False,
) -> None:
    """Start flower-supernode for this site over TLS with node authentication (foreground),
    and beside it the site's worker (client/worker.py); both stop together.

    The site's privacy policy (budget, δ, non-private runs) is set here, at the site; a run
    config can only ask for less.
    """
    for name, value in (("--ledger-path", ledger_path), ("--epsilon-budget", epsilon_budget)):
        if value is None:
            fail(f"{name} is required: a site keeps its own privacy ledger and budget, whatever the server asks")
    try:
        about = check_site_data(data_path, items_path)
        config = node_config(str(data_path.resolve()), site_id, str(ledger_path.resolve()), epsilon_budget,
                             str(items_path.resolve()) if items_path else None,
                             str(state_dir.resolve()) if state_dir else None, delta, allow_non_private)
        cmd = supernode_command(superlink, ca, key, port, config, max_wait or None)
    except DeployError as err:
        fail(str(err))
    helper = worker_command(config) if worker else None
    if show:
        for line in filter(None, (helper, cmd)):
            typer.echo(shlex.join(line))
        return
    typer.echo(f"site {site_id}: {about}", err=True)
    for line in filter(None, (helper, cmd)):
        typer.echo(f"$ {shlex.join(line)}", err=True)
    try:
        with interrupt_on_signals():
            code = run_site(cmd, helper, deploy_env(ledger_path.resolve().parent / ".flwr"),
                            lambda line: typer.echo(line, err=True))
    except Interrupted as stop:
        stopped(str(stop), stop.exit_code)
    raise typer.Exit(code)


@app.command("run")
def run_cmd(
    home: HomeOpt,
    config: Annotated[Path, typer.Option("--config", help="Run-config TOML; its out-dir is where results go (server side).")],
    name: Annotated[str, typer.Option(help="Connection name.")] = "fedenc",
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
) -> None:
    """Run fedenc on the federation in the foreground (flwr run . NAME); non-zero exit on failure."""
    from common.config import ConfigError, Settings, load_config_file

    try:
        settings = Settings.from_config(load_config_file(config))
    except ConfigError as err:
        fail(str(err))
    if not settings.run.out_dir:
        fail(f"{config}: set out-dir (a folder on the server machine) so the run's results can be found")
    try:
        summary = run_federation(name, config, settings.run.out_dir, deploy_env(home), timeout)
    except DeployError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"done in {summary['wall_seconds']:.0f}s: NDCG@10 {summary['final']['ndcg@10']:.4f}, "
               f"ε {summary['epsilon']:.3f}; results in {settings.run.out_dir}")

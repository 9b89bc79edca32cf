"""``fedenc ledger``: what a site has spent, and the one way to raise its budget.

Both commands run at the site, on the site's own ledger file; the server cannot call them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.errors import fail

app = typer.Typer(help="A site's privacy ledger (run at the site).", no_args_is_help=True)


@app.command("show")
def show(
    path: Annotated[Path, typer.Argument(help="The site's ledger (node config ledger-path).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (keys epsilon, delta, budget, ...).")] = False,
) -> None:
    """Spent ε (in all and per kind of release), δ, budget, accountant, releases, rounds."""
    from common.ledger import PrivacyLedger  # Opacus' accountant: imported by the ledger commands only
    from common.privacy import PrivacyError

    try:
        about = PrivacyLedger.read(path).summary()
    except PrivacyError as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps(about, indent=1))
        return
    table = Table(title=f"privacy ledger of {about['site']} ({path})", show_header=False)
    table.add_row("ε spent", f"{about['epsilon']:.4f} of {about['budget']:g}")
    for kind, eps in about["epsilon_by_kind"].items():
        table.add_row(f"  {kind} alone", f"{eps:.4f}")
    table.add_row("δ", f"{about['delta']:g}")
    table.add_row("accountant", about["accountant"])
    table.add_row("releases / rounds / runs", f"{about['releases']} / {about['rounds']} / {about['runs']}")
    for event in about["events"]:
        details = {k: v for k, v in event.items() if k not in ("kind", "time")}
        table.add_row(f"{event.get('time', '')} {event['kind']}", json.dumps(details))
    Console().print(table)


@app.command("raise-budget")
def raise_budget(
    path: Annotated[Path, typer.Argument(help="The site's ledger.")],
    to: Annotated[float, typer.Option("--to", help="The new ε budget (above the current one).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the ledger beside who and when).")],
) -> None:
    """Raise the site's ε budget: a deliberate act of the site, logged in its ledger."""
    from common.ledger import PrivacyLedger
    from common.privacy import PrivacyError

    try:
        site = PrivacyLedger.read(path).site
        with PrivacyLedger.hold(path, site, float("inf"), 1.0) as ledger:  # locked against a running round
            before = ledger.budget
            ledger.raise_budget(to, reason)
    except PrivacyError as err:
        fail(str(err))
    typer.echo(f"{site}: budget ε {before:g} -> {to:g} (spent {ledger.epsilon():.4f}); logged in {path}")

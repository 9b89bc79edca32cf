"""The ``fedenc`` command: one typer app assembled from the command groups in :mod:`cli`.

Example::

    fedenc data describe --dataset movietweetings --sites 10 --partition iid
    fedenc simulate --config configs/tiny.toml --out runs/tiny

Heavy libraries (torch, Flower) are imported inside the commands that need them, so
``fedenc --help`` and the ledger commands start in a moment.
"""

from __future__ import annotations

import typer

from cli import data, model, runs
from cli.deploy import app as deploy_app
from cli.ledger import app as ledger_app

app = typer.Typer(help="Federated, differentially private recommendation with language-model encoders.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
data_app.command("describe")(data.describe)
app.add_typer(data_app, name="data")
for command in (runs.simulate, runs.baseline, runs.sweep, runs.ablation, runs.audit, runs.bench, model.recommend, model.report):
    app.command()(command)
app.add_typer(deploy_app, name="deploy")
app.add_typer(ledger_app, name="ledger")


def main() -> None:
    """Entry point of the ``fedenc`` script."""
    app()


if __name__ == "__main__":
    main()

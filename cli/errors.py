"""How every ``fedenc`` command ends on bad input, a failed run, or a signal."""

from __future__ import annotations

import contextlib
from typing import NoReturn

import typer


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
    from deploy.processes import Interrupted
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

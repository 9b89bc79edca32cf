"""Using a trained model: ``fedenc recommend`` and ``fedenc report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.errors import fail
from common.data import DataError, load, spec_for

console = Console()


def history_queries(history: str | None, history_file: Path | None) -> list[str]:
    """The items a user gave: ``"title; title"`` or a file with one item per line (oldest first)."""
    if history_file is not None:
        try:
            lines = history_file.read_text().splitlines()
        except OSError as err:
            fail(f"--history-file: {err.strerror}: {history_file}")
        return [line.strip() for line in lines if line.strip()]
    return [part.strip() for part in (history or "").split(";") if part.strip()]


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


def report(run: Annotated[Path, typer.Argument(help="A run folder (with summary.json and metrics.jsonl).")]) -> None:
    """(Re)write a run's MODEL_CARD.md and report.png (and the model card in summary.json)."""
    from simulations.report import ReportError, write_report

    try:
        written = write_report(run)
    except ReportError as err:
        fail(str(err))
    console.print(f"wrote {written['card']} and {written['plot']}")

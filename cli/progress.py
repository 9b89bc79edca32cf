"""What ``fedenc simulate`` shows while a run goes: the phase as it starts (Flower starting,
data loading, the item bank, the evaluation users, the sites' steps) and each round's
numbers as soon as ``metrics.jsonl`` has them.

On a terminal: a bar over the rounds whose status line names the current phase and each
site's step; elsewhere (CI, a pipe): one line per event, never redrawn.
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def round_line(progress: dict, unit: str = "round") -> str:
    """One round's numbers (a ``metrics.jsonl`` line), as every command that trains prints
    them; a library baseline's line is an ``epoch`` and has no sites.

    >>> round_line({"round": 2, "sites": 5, "train_loss": None, "epsilon": 1.5, "ndcg@10": 0.05,
    ...             "hr@10": 0.1, "seconds": 61.2})
    'round   2  sites   5  loss –  ε 1.500  NDCG@10 0.0500  HR@10 0.1000  61s'
    >>> round_line({"round": 45, "sites": 0, "train_loss": 6.7, "epsilon": 0.0, "ndcg@10": 0.0856,
    ...             "hr@10": 0.165, "seconds": 1620.0}, unit="epoch")
    'epoch  45  loss 6.7000  ε 0.000  NDCG@10 0.0856  HR@10 0.1650  1620s'
    """
    loss = progress.get("train_loss")  # None or NaN under DP: a site's training loss does not leave it
    shown = f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "–"
    sites = f"  sites {progress['sites']:>3}" if unit == "round" else ""
    return (f"{unit} {progress['round']:>3}{sites}  loss {shown}  "
            f"ε {progress['epsilon']:.3f}  NDCG@10 {progress['ndcg@10']:.4f}  HR@10 {progress['hr@10']:.4f}  "
            f"{progress['seconds']:.0f}s")


def event_line(event: dict) -> str:
    """One progress event (common/progress.py) as a line.

    >>> event_line({"source": "site-1", "phase": "training", "round": 2, "step": 10, "steps": 10})
    'site-1: round 2 trained (10 steps)'
    >>> event_line({"source": "server", "phase": "central evaluation", "round": 0})
    'server: central evaluation, round 0'
    >>> event_line({"source": "site-0", "phase": "starting", "round": 1})
    'site-0: round 1 starting'
    """
    source, phase = event.get("source", "?"), event.get("phase", "")
    if phase == "training" and "step" in event:
        done = event["step"] == event["steps"]
        return f"{source}: round {event['round']} " + (f"trained ({event['steps']} steps)" if done
                                                       else f"step {event['step']}/{event['steps']}")
    if "round" not in event:
        return f"{source}: {phase}"
    if source.startswith("site-"):
        return f"{source}: round {event['round']} {phase}"
    return f"{source}: {phase}, round {event['round']}"


class RunProgress:
    """Receives ``simulate``'s ``on_event`` and ``on_progress`` calls and shows them on ``console``.

    Example::

        with RunProgress(console) as shown:
            simulate(config, out, on_progress=shown.round, on_event=shown.event)
    """

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.started = time.monotonic()
        self.phase = "starting"
        self.sites: dict[str, str] = {}  # each site's step in the current round
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> RunProgress:
        if self.live:
            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task(self.phase, total=None, completed=0)
        return self

    def __exit__(self, kind, *_) -> None:
        if self._bar is not None:
            if kind is None:  # the last phase is over
                self._bar.update(self._task, description="finished")
            self._bar.stop()

    def event(self, event: dict) -> None:
        """A phase started, or a site finished a step."""
        source = event.get("source", "")
        if "rounds" in event and self._bar is not None:
            self._bar.update(self._task, total=event["rounds"])
        if source.startswith("site-"):
            if event.get("phase") == "training" and "step" in event:
                self.sites[source] = f"{source} {event['step']}/{event['steps']}"
                if event["step"] != event["steps"]:  # off a terminal only the last step of a round is a line
                    self._refresh()
                    return
            else:
                self.sites[source] = f"{source} starting"
        else:
            self.phase = event_line(event).removeprefix(f"{source}: ")
            if event.get("phase") in ("sites training", "central evaluation"):
                self.sites.clear()
        if not self.live:
            self.console.print(f"{time.monotonic() - self.started:>6.0f}s  {event_line(event)}", soft_wrap=True)
        self._refresh()

    def round(self, line: dict) -> None:
        """A round is recorded (its ``metrics.jsonl`` line)."""
        if self._bar is None:
            self.console.print(round_line(line), soft_wrap=True)
            return
        self._bar.console.print(round_line(line))
        self._bar.update(self._task, completed=line["round"])

    def _refresh(self) -> None:
        if self._bar is not None:
            sites = "  ".join(self.sites[s] for s in sorted(self.sites))
            self._bar.update(self._task, description=self.phase + (f" — {sites}" if sites else ""))

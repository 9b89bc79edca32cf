"""A run's progress as it happens: ``progress.jsonl`` in the run folder, one event a line.

The ServerApp appends its phases (loading data, building the item bank, encoding the
evaluation users, the count query, training and evaluating round k, and
:data:`ROUND_RECORDED` once a round's line is in ``metrics.jsonl``); in simulation each
site appends when it starts a round and after each local step. ``fedenc simulate``
follows this file and ``metrics.jsonl`` (one line per finished round) to show progress
from the first seconds, instead of reading Flower's log.

An event is ``{"t": unix seconds, "source": "server" | "site-N", "phase": text}`` plus,
for a site's steps, ``round``, ``step`` and ``steps``. Nothing in it is private: phases,
round and step numbers are the public schedule, and a deployed site writes none (its
events would stay on its own machine anyway).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

EVENTS = "progress.jsonl"
ROUND_RECORDED = "round recorded"  # the server's event once a round's line is in metrics.jsonl


class ProgressLog:
    """Appends events to ``progress.jsonl`` in ``folder``; ``folder`` None writes nothing.

    Every event is one ``write`` of one line to a file opened for appending, so the lines of
    the server and of several site processes interleave but never mix.

    Example::

        log = ProgressLog("runs/demo", "server")
        log.note("loading data")
    """

    def __init__(self, folder: str | Path | None, source: str):
        self.path = Path(folder) / EVENTS if folder else None
        self.source = source

    def note(self, phase: str, **fields) -> None:
        """Append one event: ``phase`` (what starts now) and any public ``fields``."""
        if self.path is None:
            return
        line = json.dumps({"t": round(time.time(), 3), "source": self.source, "phase": phase} | fields) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError:  # progress is a courtesy: a run never fails for want of it
            return
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def steps(self, round_: int) -> Callable[[int, int, float], None]:
        """A ``train_local`` progress callback noting each finished step of ``round_`` (the loss is
        not written: under DP it is the site's own)."""

        def step(done: int, total: int, _loss: float) -> None:
            self.note("training", round=round_, step=done, steps=total)

        return step


class Follower:
    """New complete lines of a JSON-lines file another process appends to.

    A file replaced by a new one (``metrics.jsonl`` is rewritten when a run starts) is read
    again from its start; a line still being written is left for the next call.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> follow = Follower(path)
    >>> follow()
    []
    >>> _ = path.write_text('{"round": 0}\\n{"rou')
    >>> follow()
    [{'round': 0}]
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""

    def __call__(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self._inode or os.fstat(f.fileno()).st_size < self._offset:
                    self._inode, self._offset, self._partial = inode, 0, b""
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: the recorder drops it on resume
                continue
        return out


@contextmanager
def following(path: str | Path, show: Callable[[dict], None], every: float = 1.0) -> Iterator[None]:
    """Call ``show`` with each line this process's body adds to the JSON-lines file ``path``,
    from a thread polling every ``every`` s, and with the last ones when the body ends: the
    rounds (epochs) of a baseline that records them in this process, shown as they come.
    Lines the file held before are not shown.

    Example::

        with following(out / "metrics.jsonl", lambda line: print(line["round"])):
            run_baseline("sasrec", config, out)
    """
    follow = Follower(path)
    follow()  # a previous run's lines: already there, not this run's
    stop = threading.Event()

    def show_new() -> None:
        for line in follow():
            show(line)

    def poll() -> None:
        while not stop.wait(every):
            show_new()

    thread = threading.Thread(target=poll, name=f"following {Path(path).name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()  # then the last lines are read here alone
        show_new()

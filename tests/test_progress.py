"""Progress while a run goes (fast, no Flower): the events file the server and sites append
to, the follower that reads it and ``metrics.jsonl``, and what ``fedenc simulate`` prints on
and off a terminal. tests/test_simulate.py checks the same through a real run."""

from __future__ import annotations

import io
import json
import os

from rich.console import Console
from rich.text import Text

from cli.progress import RunProgress
from common.progress import EVENTS, Follower, ProgressLog, following

ROUND = {"round": 1, "sites": 2, "train_loss": None, "epsilon": 4.0, "ndcg@10": 0.05, "hr@10": 0.1, "seconds": 30.0}


def test_events_from_several_writers_are_whole_lines(tmp_path):
    server, site = ProgressLog(tmp_path, "server"), ProgressLog(tmp_path, "site-3")
    step = site.steps(2)
    server.note("loading data")
    for k in range(1, 4):
        step(k, 3, 0.25)
    events = Follower(tmp_path / EVENTS)()
    assert [(e["source"], e["phase"]) for e in events] == [("server", "loading data")] + [("site-3", "training")] * 3
    assert [e["step"] for e in events[1:]] == [1, 2, 3] and all(e["round"] == 2 and e["steps"] == 3 for e in events[1:])
    assert all("loss" not in e for e in events)  # a site's loss is its own under DP
    ProgressLog(None, "site-0").note("starting", round=1)  # a deployed site: nothing written anywhere
    assert len(Follower(tmp_path / EVENTS)()) == 4


def test_follower_reads_each_line_once_and_starts_over_on_a_replaced_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follow = Follower(path)
    assert follow() == []  # not there yet
    path.write_text('{"round": 0}\n{"round": 1')
    assert follow() == [{"round": 0}]
    with open(path, "a") as f:
        f.write('}\n')
    assert follow() == [{"round": 1}] and follow() == []
    tmp = tmp_path / "new"
    tmp.write_text('{"round": 0}\n')
    os.replace(tmp, path)  # a resumed run rewrites metrics.jsonl with the rounds it keeps
    assert follow() == [{"round": 0}]


def run_events(progress: RunProgress) -> None:
    progress.event({"source": "driver", "phase": "starting Flower", "rounds": 2, "sites": 2})
    progress.event({"source": "server", "phase": "loading data"})
    progress.event({"source": "site-0", "phase": "starting", "round": 1})
    for k in (1, 2):
        progress.event({"source": "site-0", "phase": "training", "round": 1, "step": k, "steps": 2})
    progress.round(ROUND)


def test_off_a_terminal_one_line_per_event_and_no_step_chatter():
    out = io.StringIO()
    console = Console(file=out, width=40, force_terminal=False)
    with RunProgress(console) as progress:
        run_events(progress)
    lines = [line.split("s  ", 1)[-1] if line.lstrip()[0].isdigit() else line for line in out.getvalue().splitlines()]
    assert lines == ["driver: starting Flower", "server: loading data", "site-0: round 1 starting",
                     "site-0: round 1 trained (2 steps)",
                     "round   1  sites   2  loss –  ε 4.000  NDCG@10 0.0500  HR@10 0.1000  30s"]  # never wrapped


def test_on_a_terminal_a_bar_over_rounds():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True)
    with RunProgress(console) as progress:
        run_events(progress)
        task = progress._bar.tasks[0]
        assert (task.completed, task.total) == (1, 2)
        assert task.description == "loading data — site-0 2/2"
    assert "NDCG@10 0.0500" in Text.from_ansi(out.getvalue()).plain  # printed above the bar


def test_progress_file_is_valid_json_per_line(tmp_path):
    ProgressLog(tmp_path, "server").note("central evaluation", round=0)
    (line,) = (tmp_path / EVENTS).read_text().splitlines()
    assert json.loads(line)["round"] == 0


def test_following_shows_the_bodys_lines_as_they_come_and_the_last_at_the_end(tmp_path):
    import time

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 9}\n')  # a previous run's line: not this run's
    shown: list[int] = []
    with following(path, lambda line: shown.append(line["round"]), every=0.05):
        fresh = tmp_path / "metrics.jsonl.tmp"
        fresh.write_text('{"round": 0}\n')
        os.replace(fresh, path)  # the run starts its file afresh, as RunRecorder does
        deadline = time.monotonic() + 5
        while not shown and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_during = list(shown)
        with open(path, "a") as f:
            f.write('{"round": 1}\n')  # written just before the body ends: only the last read sees it
    assert seen_during == [0]  # shown while the body still ran
    assert shown == [0, 1]

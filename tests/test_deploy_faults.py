"""A real TLS deployment (3 SuperNodes, tests/test_deploy.py's federation) that loses a
machine mid-run: the server (resumed, no site pays twice) or a site (the run finishes
with the other two and records the loss). The tests run in this order on one federation."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import tomli_w
from test_deploy import FEDENC, _ledger_epsilon, _lines, _releases, federation  # noqa: F401  (a fixture here too)

import deploy.certs
import deploy.sites
import deploy.superlink


def crash(pid: int) -> None:
    """SIGKILL a process and everything under it: a machine that dies says no goodbye."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for proc in tree:
        proc.kill()
    psutil.wait_procs(tree, timeout=10)


def in_background(federation, name: str, **changes) -> tuple[Path, threading.Thread, dict]:  # noqa: F811
    """Start ``deploy.superlink.run_federation`` on a thread; returns (out, thread, result)."""
    out = federation.root / name
    path = federation.root / f"{name}.toml"
    path.write_text(tomli_w.dumps(federation.run | {"out-dir": str(out)} | changes))
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = deploy.superlink.run_federation("fedenc", path, out, federation.env, timeout=1200)
        except Exception as err:  # the caller asserts on it, with the reason
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return out, thread, result


def steps(ledger: Path) -> int:
    return _ledger_epsilon(ledger)[1] if ledger.exists() else 0


@pytest.mark.deploy
def test_a_server_killed_mid_round_resumes_and_no_site_pays_twice(federation):  # noqa: F811
    """The ServerApp is killed after a site paid for round 2 and before the server recorded
    it; the run started again resumes at round 1, asks round 2 again, and the sites send the
    update they kept: every site ends with exactly 3 rounds of DP-SGD and one count release,
    as an uninterrupted run would."""
    changes = {"num-server-rounds": 3, "fraction-evaluate": 0.0}
    out, thread, result = in_background(federation, "resumed", **changes)
    start = time.monotonic()
    per_round = federation.run["local-steps"]
    while not any(steps(p) >= 2 * per_round for p in federation.ledgers.values()):
        assert thread.is_alive() and time.monotonic() - start < 900, result
        time.sleep(0.2)
    assert [r["round"] for r in _lines(out / "metrics.jsonl")] == [0, 1], "round 2 was recorded before the kill"
    token = json.loads((out / "run.json").read_text())["run-token"]
    serverapp = [p for p in psutil.Process(federation.procs[0].pid).children(recursive=True)
                 if any(Path(part).name == "flwr-serverapp" for part in p.cmdline()[:2])]
    assert serverapp, "no ServerApp process under the SuperLink"
    for proc in serverapp:
        crash(proc.pid)
    thread.join(600)
    assert "error" in result, "the killed run cannot have finished"

    _, thread, result = in_background(federation, "resumed", **changes)
    thread.join(1200)
    assert "summary" in result, result.get("error")
    assert [r["round"] for r in _lines(out / "metrics.jsonl")] == [0, 1, 2, 3]
    assert json.loads((out / "run.json").read_text())["run-token"] == token
    for i, ledger in federation.ledgers.items():
        eps, dp_steps = _ledger_epsilon(ledger)
        assert dp_steps == 3 * per_round and _releases(ledger) == 1, (i, dp_steps)
        assert result["summary"]["sites"][str(i)]["epsilon"] == pytest.approx(eps)
    print(f"\nserver killed and resumed: {time.monotonic() - start:.0f}s; DP-SGD steps per site "
          f"{[_ledger_epsilon(p)[1] for p in federation.ledgers.values()]}")


@pytest.mark.deploy
def test_a_site_killed_during_training_is_recorded_and_the_run_finishes(federation):  # noqa: F811
    for ledger in federation.ledgers.values():  # the test above spent the budgets: the sites raise them
        done = subprocess.run([*FEDENC, "ledger", "raise-budget", str(ledger), "--to", "16", "--reason", "fault test"],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr
    start = time.monotonic()
    out, thread, result = in_background(federation, "lost-site", epsilon=16.0, **{"min-sites": 2, "round-timeout": 60.0,
                                                                                   "fraction-evaluate": 0.0})
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert thread.is_alive() and time.monotonic() - start < 900, result
        time.sleep(0.5)
    crash(federation.procs[3].pid)  # site 2's SuperNode, as round 1's training is sent out
    thread.join(1200)
    assert "summary" in result, result.get("error")
    rows = _lines(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["sites"] == 2 and sorted(row["participation"]["trained"]) == ["0", "1"]
    assert "2" in rows[1]["participation"]["failed"] and rows[1]["failed"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][1]["failed"] == rows[1]["participation"]["failed"]
    print(f"\nlost site: {time.monotonic() - start:.0f}s; round 1 failed: {rows[1]['participation']['failed']}, "
          f"round 2 failed: {rows[2]['participation']['failed']}")

"""A real TLS deployment (3 SuperNodes, tests/test_deploy.py's federation) that loses a
machine mid-run: the server (resumed, no site pays twice) or a site, during training or
during evaluation (the run finishes with the other two and records the loss). The tests
run in this order on one federation."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import tomli_w
from test_deploy import FEDENC, _ledger_epsilon, _lines, _releases, _start, federation  # noqa: F401  (a fixture here too)

import deploy.certs
import deploy.sites
import deploy.superlink
from deploy.processes import free_port, stop_tree


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


def clientapps(supernode: subprocess.Popen) -> set[int]:
    """The ClientApp processes a SuperNode runs now (Flower starts one per message)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return {p.pid for p in psutil.Process(supernode.pid).children(recursive=True)
                if any(Path(part).name == "flwr-clientapp" for part in p.cmdline()[:2])}
    return set()


@pytest.mark.deploy
def test_a_site_killed_during_evaluation_is_recorded_and_the_run_finishes(federation):  # noqa: F811
    """Federated evaluation is served only to runs without DP by sites that allow them: the
    three SuperNodes are restarted with allow-non-private, a run without DP evaluates every
    round on every site, and site 2 is killed while its round-1 evaluation runs (the first
    ClientApp after the one that kept its round-1 update). The evaluation failure is logged
    and round 2 goes on with sites 0 and 1."""
    for proc in federation.procs[1:]:
        stop_tree(proc)
    files = federation.root / "data"
    for i in range(3):
        config = deploy.sites.node_config(str(files / f"site-{i}.csv"), i, str(federation.ledgers[i]), 8.0,
                                          state_dir=str(federation.root / f"site-{i}" / "state"), allow_non_private=True)
        cmd = deploy.sites.supernode_command(federation.address, federation.certs["ca"], federation.keys[f"site-{i}"][0],
                                             free_port(), config, max_wait=120)
        federation.procs[1 + i] = _start(cmd, federation.root / f"supernode-open-{i}.out", federation.env)
    kept = federation.root / "site-2" / "state" / "site-2.kept"  # site 2's kept update per run
    kept_before = sorted((p.name, p.stat().st_mtime_ns) for p in kept.rglob("*")) if kept.exists() else []
    start = time.monotonic()
    changes = {"epsilon": math.inf, "fraction-evaluate": 1.0, "min-sites": 2, "round-timeout": 60.0, "wait-for-sites": 120.0}
    out, thread, result = in_background(federation, "lost-in-evaluation", **changes)
    site2 = federation.procs[3]
    while not kept.exists() or sorted((p.name, p.stat().st_mtime_ns) for p in kept.rglob("*")) == kept_before:
        assert thread.is_alive() and time.monotonic() - start < 900, result  # site 2 has not trained round 1 yet
        time.sleep(0.1)
    training = clientapps(site2)  # the ClientApp that just kept its round-1 update (if still there)
    while not clientapps(site2) - training:  # the next one: round 1's evaluation
        assert thread.is_alive() and time.monotonic() - start < 900, result
        time.sleep(0.1)
    assert [r["round"] for r in _lines(out / "metrics.jsonl")] == [0], "round 1 was recorded before its evaluation"
    crash(site2.pid)
    thread.join(1200)
    assert "summary" in result, result.get("error")
    rows = _lines(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["sites"] == 3 and sorted(rows[1]["participation"]["trained"]) == ["0", "1", "2"]
    assert math.isfinite(rows[1]["ndcg@10"]) and math.isfinite(rows[2]["ndcg@10"])
    second = rows[2]["participation"]
    assert rows[2]["sites"] == 2 and sorted(second["trained"]) == ["0", "1"]
    log = (out / "flower.log").read_text(errors="replace")
    assert "evaluation failed at site 2" in log, log[-2000:]
    lost = rows[1]["evaluation"]  # round 1's federated evaluation, where site 2 went
    assert sorted(lost["sampled"]) == ["0", "1", "2"] and list(lost["failed"]) == ["2"], lost
    assert "2" in second["failed"] or "2" not in second["sampled"], second  # asked and lost, or no longer asked
    summary = json.loads((out / "summary.json").read_text())
    assert next(r for r in summary["rounds"] if r["round"] == 2)["failed"] == second["failed"]
    print(f"\nlost site during evaluation: {time.monotonic() - start:.0f}s; round 2 sampled {second['sampled']}, "
          f"failed {second['failed']}")


@pytest.mark.deploy
def test_sites_served_by_their_workers_run_a_federation(federation):  # noqa: F811
    """Each site started as an operator would (``fedenc deploy supernode``: flower-supernode
    and the site's worker beside it): every message is answered by the worker, and the run
    completes as with in-process ClientApps."""
    for proc in federation.procs[1:]:
        stop_tree(proc)
    files = federation.root / "data"
    for i in range(3):
        cmd = [*FEDENC, "deploy", "supernode", "--superlink", federation.address, "--ca", str(federation.certs["ca"]),
               "--key", str(federation.keys[f"site-{i}"][0]), "--data-path", str(files / f"site-{i}.csv"),
               "--items-path", str(files / "items.csv"), "--site-id", str(i), "--ledger-path", str(federation.ledgers[i]),
               "--epsilon-budget", "8", "--state-dir", str(federation.root / f"site-{i}" / "state"),
               "--port", str(free_port()), "--allow-non-private", "--max-wait", "120"]
        federation.procs[1 + i] = _start(cmd, federation.root / f"site-worker-{i}.out", federation.env)
    start = time.monotonic()
    logs = [federation.root / f"site-worker-{i}.out" for i in range(3)]
    while not all("site worker: serving" in log.read_text(errors="replace") for log in logs):
        assert time.monotonic() - start < 300, [log.read_text(errors="replace")[-500:] for log in logs]
        time.sleep(0.5)  # a message that comes sooner runs in-process, and is not what this test is about
    out, thread, result = in_background(federation, "with-workers", epsilon=math.inf, **{"fraction-evaluate": 1.0})
    thread.join(1200)
    assert "summary" in result, result.get("error")
    assert [(r["round"], r["sites"]) for r in _lines(out / "metrics.jsonl")][1:] == [(1, 3), (2, 3)]
    for i in range(3):
        log = logs[i].read_text(errors="replace")
        assert log.count("site worker: train answered") == 2 and log.count("site worker: evaluate answered") == 2, log[-2000:]
    print(f"\nsites with workers, 2 rounds + evaluation: {time.monotonic() - start:.0f}s wall")

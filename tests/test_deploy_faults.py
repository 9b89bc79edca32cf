"""A real TLS deployment (3 SuperNodes, tests/test_deploy.py's federation) in which one
site's machine dies mid-run: the run finishes with the other two and records the loss."""

from __future__ import annotations

import json
import threading
import time

import psutil
import pytest
import tomli_w

from simulations import deploy
from test_deploy import _lines, federation  # noqa: F401  (federation: a fixture of this module too)


def crash(pid: int) -> None:
    """SIGKILL a process and everything under it: a machine that dies says no goodbye."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for proc in tree:
        proc.kill()
    psutil.wait_procs(tree, timeout=10)


@pytest.mark.deploy
def test_a_site_killed_during_training_is_recorded_and_the_run_finishes(federation):  # noqa: F811
    out = federation.root / "lost-site"
    config = federation.run | {"out-dir": str(out), "min-sites": 2, "round-timeout": 60.0, "fraction-evaluate": 0.0}
    path = federation.root / "lost-site.toml"
    path.write_text(tomli_w.dumps(config))
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = deploy.run_federation("fedenc", path, out, federation.env, timeout=1200)
        except Exception as err:  # reported by the assertion below, with the reason
            result["error"] = err

    thread = threading.Thread(target=run)
    start = time.monotonic()
    thread.start()
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

"""A scheduler's kill (SIGTERM) or Ctrl-C (SIGINT) stops ``fedenc simulate`` and every
process it started: the SuperLink, Flower's simulation runtime, Ray and its workers.

These run in sessions of their own, so nothing but ``fedenc`` itself can stop them. The
test starts a real simulation (tiny random model), waits until Ray's workers run, sends
the signal to the ``fedenc`` process only, and checks that the whole tree it had is gone.
About a minute per signal on two cores. A run that finishes must leave nothing behind either.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
STARTUP = 300  # seconds until Ray's workers run, on two busy cores
GRACE = 45  # seconds for fedenc to stop the tree and exit (its own grace is 15 s, then kill)


def fedenc_script() -> str:
    beside = Path(sys.executable).parent / "fedenc"
    return str(beside) if beside.exists() else shutil.which("fedenc") or pytest.fail("the fedenc script is not installed")


def simulate_env(tmp_path: Path) -> dict:
    """The environment of a `fedenc simulate` under test: offline, its own cache, this venv's scripts."""
    env = os.environ.copy()
    env.update(FEDENC_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def kill_leftovers(tree: dict[int, psutil.Process], proc: subprocess.Popen) -> None:
    """Whatever a test saw fail, leave nothing of ``proc``'s tree running for the next test."""
    for p in tree.values():
        try:
            if p.is_running():  # compares start times too: a reused pid is not ours
                p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return "(gone)"


def describe(p: psutil.Process) -> str:
    return f"{p.pid} {cmdline(p)[:160]}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_leaves_no_process_behind(sig, tiny_bert, tmp_path):
    env = simulate_env(tmp_path)
    out = tmp_path / "run"
    cmd = [fedenc_script(), "simulate", "--config", str(TINY), "--set", f"model={tiny_bert}",
           "--set", "num-server-rounds=50", "--out", str(out)]  # far more rounds than the test waits for
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # the signal goes to fedenc alone, as `kill PID` sends it
    tree: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + STARTUP
        # Collected while everything runs: once a parent dies its children are re-parented away.
        while not any("default_worker.py" in cmdline(p) for p in tree.values()):
            assert proc.poll() is None, f"fedenc exited ({proc.returncode}) before Ray started:\n{proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, f"no Ray worker within {STARTUP}s; saw {[describe(p) for p in tree.values()]}"
            for p in descendants(proc):
                tree.setdefault(p.pid, p)
            time.sleep(0.5)
        names = " ".join(cmdline(p) for p in tree.values())
        assert "flower-superlink" in names and "flwr-simulation" in names and "raylet" in names, names

        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=GRACE)
        assert proc.returncode == 128 + sig, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"interrupted by {sig.name}" in errors[0], stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]

        _, alive = psutil.wait_procs(list(tree.values()), timeout=5)
        assert not alive, f"{len(alive)} of {len(tree)} processes outlived fedenc: {[describe(p) for p in alive]}"
    finally:
        kill_leftovers(tree, proc)


@pytest.mark.slow
def test_a_finished_run_leaves_no_process_behind(tiny_bert, tmp_path):
    """Once the summary is written, ``fedenc simulate`` gives Flower's tree a second and then
    kills it rather than wait for Ray's graceful stop: nothing of that tree may outlive it."""
    env = simulate_env(tmp_path)
    cmd = [fedenc_script(), "simulate", "--config", str(TINY), "--set", f"model={tiny_bert}",
           "--set", "num-server-rounds=1", "--out", str(tmp_path / "run")]
    tree: dict[int, psutil.Process] = {}
    seen: list[str] = []  # their command lines, read while they run
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        while proc.poll() is None:  # collected while they run: a dead parent's children are re-parented away
            for p in descendants(proc):
                if p.pid not in tree:
                    tree[p.pid] = p
                    seen.append(cmdline(p))
            time.sleep(0.2)
        assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
        assert (tmp_path / "run" / "summary.json").exists()
        names = " ".join(seen)
        assert "flower-superlink" in names and "flwr-simulation" in names and "raylet" in names, names
        _, alive = psutil.wait_procs(list(tree.values()), timeout=5)
        assert not alive, f"{len(alive)} of {len(tree)} processes outlived fedenc: {[describe(p) for p in alive]}"
    finally:
        kill_leftovers(tree, proc)


@pytest.mark.deploy
def test_deploy_superlink_stops_flower_on_sigterm(tmp_path):
    """`fedenc deploy superlink` runs flower-superlink in the foreground: a SIGTERM to fedenc
    (a service manager stopping it) must stop the SuperLink too, not leave it serving."""
    from deploy.certs import make_certs
    from deploy.processes import free_port
    from deploy.superlink import wait_superlink

    certs = make_certs(tmp_path / "certs")
    port = free_port()
    cmd = [fedenc_script(), "deploy", "superlink", "--certs", str(tmp_path / "certs"), "--state", str(tmp_path / "state"),
           "--port", str(port)]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    tree: dict[int, psutil.Process] = {}
    try:
        wait_superlink(f"127.0.0.1:{port}", certs["ca"], timeout=90)
        for p in descendants(proc):
            tree.setdefault(p.pid, p)
        assert any("flower-superlink" in cmdline(p) for p in tree.values()), [describe(p) for p in tree.values()]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=GRACE)
        assert proc.returncode == 143, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        _, alive = psutil.wait_procs(list(tree.values()), timeout=5)
        assert not alive, f"outlived fedenc: {[describe(p) for p in alive]}"
    finally:
        kill_leftovers(tree, proc)

"""``fedenc bench`` keeps what finished: bench.json after every part, which parts ran, and why
one stopped (a signal, the time limit). The measurements themselves are stubbed here (fast);
tests/test_sweep.py runs the whole bench on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cli.main import app
from common.config import ConfigError
from deploy.processes import Interrupted
from simulations import bench as bench_module


def fake_steps(seconds: float = 0.0):
    def step_table(settings, batch_sizes):
        time.sleep(seconds)
        row = {"non_dp": {"median_s": 0.01, "median_cpu_s": 0.01}, "dp_hooks": {"median_s": 0.03, "median_cpu_s": 0.02}}
        return {str(b): row for b in batch_sizes} | {"parameters": {"adapter_update_bytes": 10, "model_parameter_bytes": 1000}}

    return step_table


def test_tree_memory_follows_a_child_that_grows_and_counts_it_once(tmp_path):
    """PSS is re-read only when a process's RSS moves: a child that allocates 200 MB after
    the sampler has read it must still show in the peak (the sampler's first reads see it small)."""
    go = tmp_path / "go"
    grow = (f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)\n"
            "block = bytearray(200 * 2**20)\nprint('ready', flush=True)\ntime.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", grow], stdout=subprocess.PIPE, text=True)
    try:
        with bench_module.TreeMemory(interval=0.05) as mem:
            time.sleep(0.5)
            small = mem.peak
            go.touch()
            assert child.stdout.readline() == "ready\n"
            time.sleep(0.5)
        assert small > 0 and mem.peak - small >= 190 * 2**20, (small, mem.peak)
        assert mem.peak < small + 260 * 2**20  # counted once, not once per sample
    finally:
        child.kill()
        child.wait()


def test_sigterm_during_a_part_leaves_the_finished_parts_and_says_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_module, "step_table", fake_steps())

    def killed(settings):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first
        raise AssertionError("SIGTERM did not stop the part")

    monkeypatch.setattr(bench_module, "eval_throughput", killed)
    with pytest.raises(Interrupted):
        bench_module.bench({}, tmp_path, step_batches=(8,), progress=lambda _: None, parts=("steps", "eval", "overhead"))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["dp_step_ratio"] == pytest.approx(2.0) and "eval_users_per_s" not in saved
    assert saved["parts"]["requested"] == ["steps", "eval", "overhead"]
    assert saved["parts"]["done"] == ["steps"] and not saved["parts"]["complete"]
    assert saved["parts"]["stopped"].startswith("eval: Interrupted")


def test_the_time_limit_stops_the_running_part_and_leaves_out_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_module, "step_table", fake_steps())

    def slow(settings):
        time.sleep(30)  # cut short by the limit
        return 1.0

    monkeypatch.setattr(bench_module, "eval_throughput", slow)
    start = time.monotonic()
    result = bench_module.bench({}, tmp_path, step_batches=(8,), progress=lambda _: None, parts=("scale", "eval", "steps"),
                                time_limit=1.5)
    assert time.monotonic() - start < 10
    ran = result["parts"]
    assert ran["requested"] == ["steps", "eval", "scale"]  # always in the order of PARTS
    assert ran["done"] == ["steps"] and ran["skipped"] == ["scale"] and not ran["complete"]
    assert ran["stopped"] == "eval: the time limit (1.5 s) ran out" and "eval_users_per_s" not in result
    assert json.loads((tmp_path / "bench.json").read_text())["parts"] == ran


def test_cli_bench_parts_and_partial_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_module, "step_table", fake_steps(seconds=0.3))
    done = CliRunner().invoke(app, ["bench", "--parts", "steps", "--out", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    assert "dp_step_ratio 2.00" in done.output and json.loads((tmp_path / "a" / "bench.json").read_text())["parts"]["complete"]
    partial = CliRunner().invoke(app, ["bench", "--parts", "steps,eval", "--time-limit", "0.1", "--out", str(tmp_path / "b")])
    assert partial.exit_code == 1
    assert "error: bench.json is partial (steps: the time limit (0.1 s) ran out): ran nothing; left out eval" in partial.output
    wrong = CliRunner().invoke(app, ["bench", "--parts", "steps,nope", "--out", str(tmp_path / "c")])
    assert wrong.exit_code == 2 and "error: bench parts: nope" in wrong.output and not (tmp_path / "c").exists()
    with pytest.raises(ConfigError):
        bench_module.bench({}, tmp_path / "d", parts=())

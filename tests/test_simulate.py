"""End to end through the real Flower path: ``fedenc simulate`` as a user runs it.

One tiny run (2 sites, 2 rounds, a random 2-layer BERT with the MiniLM vocabulary) is
shared by the assertions on its outputs; a resumed copy of it, a run whose clients
fail, and the bad-input exits run beside it. Each simulation takes one to two minutes
on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
TARGET_EPSILON = 8.0  # configs/tiny.toml
ROUND_KEYS = ("round", "hr@10", "ndcg@10", "mrr@10", "epsilon", "train_loss", "bytes_up", "seconds")
SITE_KEYS = ("epsilon", "delta", "budget", "noise_multiplier", "steps", "accountant")
TIMEOUT = 900


PRIOR = ("--set", "popularity-prior=0.1")


def fedenc_script() -> str:
    """The installed ``fedenc`` script: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "fedenc"
    if beside.exists():
        return str(beside)
    found = shutil.which("fedenc")
    if not found:
        pytest.fail("the fedenc script is not installed (pip install -e .)")
    return found


def fedenc(*args: str, cache: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    env.update(FEDENC_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # the venv's bin first, so the flower-superlink and flwr that simulate starts are this install's
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run(
        [fedenc_script(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr that contains every needle, no traceback."""
    assert proc.returncode == 2, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, explain(proc)
    for needle in needles:
        assert needle in errors[0], explain(proc)
    assert "Traceback" not in proc.stderr + proc.stdout, explain(proc)
    return errors[0]


@pytest.fixture(scope="module")
def sim_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sim-cache")  # item banks shared by the runs of this module


@pytest.fixture(scope="module")
def finished_run(tiny_bert, sim_cache, tmp_path_factory) -> Path:
    """A completed 2-round simulation with the tiny model and the DP popularity prior (so the
    sites' count release, a query message, runs through Flower too)."""
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = fedenc("simulate", "--config", str(TINY), "--set", f"model={tiny_bert}", *PRIOR, "--out", str(out),
                  cache=sim_cache)
    assert proc.returncode == 0, explain(proc)
    assert "round   2" in proc.stdout, explain(proc)  # progress is shown per round
    (out.parent / "stdout.txt").write_text(proc.stdout)  # for test_progress_from_the_first_seconds
    return out


# -- a successful run -----------------------------------------------------------------------


def test_metrics_per_round(finished_run):
    rows = read_metrics(finished_run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        missing = [k for k in ROUND_KEYS if k not in row]
        assert not missing, (row["round"], missing)
        for k in ("hr@10", "ndcg@10", "mrr@10"):
            assert 0.0 <= row[k] <= 1.0
    # round 0: the prior's count release (10% of ε=8) and central evaluation, no training
    assert rows[0]["epsilon"] == pytest.approx(0.8, abs=0.02) and rows[0]["bytes_up"] == 0
    for row in rows[1:]:
        assert row["bytes_up"] > 0
        assert row["train_loss"] is None  # a site's training loss is not a DP release: it stays there
        assert row["sites"] == 2 and row["refused"] == 0
    # ε composes over rounds and stays within the target
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] <= TARGET_EPSILON + 1e-9


def test_progress_from_the_first_seconds(finished_run):
    """Off a terminal, one line per event in the order things happen: Flower starting, the
    server's phases before round 0, each site's round, each round's numbers once recorded;
    progress.jsonl holds every site step and nothing but the public schedule."""
    lines = (finished_run.parent / "stdout.txt").read_text().splitlines()

    def at(text: str) -> int:
        found = [i for i, line in enumerate(lines) if text in line]
        assert found, (text, lines)
        return found[0]

    expected = ["driver: starting Flower", "server: loading data", "server: building the model and the item bank",
                "server: encoding the 200 evaluation users", "server: central evaluation, round 0", "round   0  sites",
                "site-0: round 1 starting", "site-0: round 1 trained (2 steps)", "server: central evaluation, round 1",
                "round   1  sites", "round   2  sites"]
    assert [at(text) for text in expected] == sorted(at(text) for text in expected), lines
    events = [json.loads(line) for line in (finished_run / "progress.jsonl").read_text().splitlines()]
    steps = sorted((e["source"], e["round"], e["step"]) for e in events if e["phase"] == "training")
    assert steps == [(f"site-{s}", r, k) for s in (0, 1) for r in (1, 2) for k in (1, 2)]
    assert all(set(e) <= {"t", "source", "phase", "round", "step", "steps"} for e in events), events


def test_summary(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    rows = read_metrics(finished_run)
    assert summary["final"]["round"] == 2
    assert summary["final"]["ndcg@10"] == rows[-1]["ndcg@10"]
    assert summary["best_validation"]["round"] in (0, 1, 2)
    assert summary["epsilon"] == pytest.approx(rows[-1]["epsilon"])
    assert summary["wall_seconds"] > 0
    sites = summary["sites"]
    assert len(sites) == 2
    for site in sites.values():
        missing = [k for k in SITE_KEYS if k not in site]
        assert not missing, missing
        assert 0 < site["epsilon"] <= TARGET_EPSILON + 1e-9
        assert 0 < site["delta"] < 1
        assert site["noise_multiplier"] > 0 and site["steps"] > 0 and site["accountant"] == "rdp"
        assert site["budget"] == TARGET_EPSILON
    for name, site in sites.items():  # the ledger stays at the site (in simulation: ledger-dir)
        ledger = json.loads((finished_run / "ledgers" / f"site-{name}.json").read_text())
        assert [r["kind"] for r in ledger["releases"]] == ["counts", "dp-sgd", "dp-sgd"]
        assert ledger["history"][0][1:] == [1.0, 1]  # the prior's count release, then the DP-SGD steps
        assert ledger["history"][1][0] == pytest.approx(site["noise_multiplier"])
        assert ledger["epsilon"] == pytest.approx(site["epsilon"])
    assert max(site["epsilon"] for site in sites.values()) == pytest.approx(summary["epsilon"])


def test_adapter_loads_with_peft(finished_run, tiny_bert):
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    adapter = finished_run / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert any(adapter.glob("adapter_model.*"))
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(adapter))
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b, "no LoRA weights in the saved adapter"
    # adapter/ is the best-validation round's model: B starts at zero and has moved unless
    # validation chose round 0 (the untrained start), which a tiny DP run sometimes does
    best_round = json.loads((finished_run / "summary.json").read_text())["best_round"]
    assert any(torch.count_nonzero(p) > 0 for p in lora_b.values()) == (best_round > 0)


def test_ledgers_written(finished_run):
    ledgers = sorted((finished_run / "ledgers").glob("*.json"))
    assert [p.name for p in ledgers] == ["site-0.json", "site-1.json"]
    for path in ledgers:  # each with its marker outside the file (a deleted ledger fails closed)
        marker = json.loads((finished_run / "ledgers" / "state" / f"{path.stem}.marker.json").read_text())
        assert marker["ledger"] == str(path) and marker["releases"] == len(json.loads(path.read_text())["releases"])


# -- bad input: one clear line, exit 2 --------------------------------------------------------


def test_refuses_an_out_dir_holding_a_run(finished_run, tiny_bert, sim_cache):
    before = (finished_run / "metrics.jsonl").read_text()
    proc = fedenc("simulate", "--config", str(TINY), "--set", f"model={tiny_bert}", "--out", str(finished_run), cache=sim_cache)
    assert_clean_error(proc, "--resume", "--overwrite")
    assert (finished_run / "summary.json").is_file()  # the finished run is left as it was
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_unknown_key(tmp_path, sim_cache):
    proc = fedenc("simulate", "--config", str(TINY), "--set", "nope=1", "--out", str(tmp_path / "out"), cache=sim_cache)
    assert_clean_error(proc, "nope")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_bad_value(tmp_path, sim_cache):
    proc = fedenc("simulate", "--set", "epsilon=0", "--out", str(tmp_path / "out"), cache=sim_cache)
    assert_clean_error(proc, "epsilon")


def test_missing_data_path(tmp_path, sim_cache):
    proc = fedenc(
        "simulate", "--config", str(TINY), "--set", "dataset=movielens", "--set", "data-path=/does/not/exist",
        "--out", str(tmp_path / "out"), cache=sim_cache,
    )
    assert_clean_error(proc, "/does/not/exist")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_no_site_large_enough_for_one_dp_batch(tmp_path, sim_cache):
    proc = fedenc("simulate", "--config", str(TINY), "--set", "expected-batch=100000", "--out", str(tmp_path / "out"),
                  cache=sim_cache)
    assert_clean_error(proc, "expected-batch", "no site could train")


# -- resume and failure (each a further simulation) -------------------------------------------


def test_resume_continues_without_repeating(finished_run, tiny_bert, sim_cache, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns(".flwr"))
    before = (out / "metrics.jsonl").read_text().splitlines()
    ledgers_before = {p.name: p.read_text() for p in (out / "ledgers").glob("site-*.json")}
    assert len(ledgers_before) == 2, sorted(p.name for p in (out / "ledgers").iterdir())
    proc = fedenc(
        "simulate", "--config", str(TINY), "--set", f"model={tiny_bert}", *PRIOR, "--set", "num-server-rounds=3",
        "--resume", "--out", str(out), cache=sim_cache,
    )
    assert proc.returncode == 0, explain(proc)
    assert "round   3  sites" in proc.stdout and "round   2  sites" not in proc.stdout, explain(proc)  # new rounds only
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # rounds 1-2 were not repeated
    assert (out / "metrics.jsonl").read_text().splitlines()[:3] == before  # earlier lines kept as they were
    third = rows[3]
    # The noise was calibrated for 2 rounds, so ε ≈ 7.99 after round 2 and a third round
    # would cross the target: both sites' ledgers (restored from disk) refuse it, and
    # nothing is sent or spent.
    assert (third["sites"], third["refused"], third["bytes_up"]) == (0, 2, 0), third
    refusals = third["participation"]["refused"]
    assert sorted(refusals) == ["0", "1"] and all("budget" in why for why in refusals.values()), refusals
    assert third["epsilon"] == pytest.approx(rows[2]["epsilon"])
    for name, text in ledgers_before.items():
        assert json.loads((out / "ledgers" / name).read_text())["history"] == json.loads(text)["history"], name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["round"] == 3
    assert summary["epsilon"] <= TARGET_EPSILON + 1e-9


def test_failing_client_fails_the_run(tiny_bert, sim_cache, tmp_path):
    """Site 0's privacy ledger is corrupt: the site refuses to guess what it spent, inside
    the ClientApp. With min-sites = 2 the run cannot carry on without it, so it fails and
    says which site and why. (With the default min-sites = 1 it carries on with site 1:
    tests/test_faults.py.)"""
    out, ledgers = tmp_path / "failing", tmp_path / "ledgers"
    ledgers.mkdir()
    (ledgers / "site-0.json").write_text("{not json")
    proc = fedenc(
        "simulate", "--config", str(TINY), "--set", f"model={tiny_bert}", "--set", f"ledger-dir={ledgers}",
        "--set", "num-server-rounds=1", "--set", "eval-users=20", "--set", "min-sites=2", "--out", str(out),
        cache=sim_cache,
    )
    assert proc.returncode == 1, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, explain(proc)
    assert "site 0" in errors[0] and "is corrupt" in errors[0] and "min-sites = 2" in errors[0], explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    assert not (out / "summary.json").exists()
    log = (out / "flower.log").read_text(errors="replace")
    # the failure came from the site, not from a check before Flower started
    assert "is corrupt" in log, log[-3000:]

"""Baselines and the privacy sweep: the popularity baseline against a hand computation, the
local baseline's per-site routing, the baseline/summary files, and a 2-ε sweep on the tiny
config through the real Flower path (slow: ~3 minutes)."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import types

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from common.config import Settings
from common.evaluation import CentralEvaluator
from simulations.baselines import routed_ranks, run_baseline
from simulations.sweep import COLUMNS, Cell, parse_epsilons, plan, y_limits

L3, L4 = 1 / math.log2(3), 1 / math.log2(4)


@pytest.fixture(scope="module")
def toy_config(toy_dir, tiny_bert) -> dict:
    return {
        "dataset": "csv",
        "data-path": str(toy_dir / "interactions.csv"),
        "model": tiny_bert,
        "num-sites": 2,
        "partition": "natural",
        "partition-column": "site",
        "num-server-rounds": 2,
        "local-steps": 1,
        "expected-batch": 2,
        "max-tokens": 16,
        "max-history": 8,
        "epsilon": math.inf,
    }


def test_popularity_matches_hand_computation(toy_config, tmp_path):
    # Train-only counts: i3 3, i4 3, i2 2, i7 2, i1 1, i5 1, i6 1, i8 0; ties -> lower index first,
    # so the order is i3 i4 i2 i7 i1 i5 i6 i8. Each user's history is excluded, the target kept.
    # valid: u1 (train i1 i3 i2 i4 -> i5): i7 i5 => 1; u10 (i7 i6 i4 -> i2): i3 i2 => 1;
    #        u2 (i2 i7 i3 -> i5): i4 i1 i5 => 2; u3 (i5 i4 i3 -> i2): i2 => 0
    # test:  u1 (+i5 -> i6): i7 i6 => 1; u10 (+i2 -> i3): => 0; u2 (+i5 -> i1): i4 i1 => 1;
    #        u3 (+i2 -> i1): i7 i1 => 1
    summary = run_baseline("popularity", toy_config, tmp_path)
    best = summary["best_validation"]
    assert best["valid/ndcg@10"] == pytest.approx((2 * L3 + L4 + 1) / 4)
    assert best["ndcg@10"] == pytest.approx((3 * L3 + 1) / 4)
    assert best["hr@10"] == 1.0
    assert best["mrr@10"] == pytest.approx((3 * 0.5 + 1) / 4)
    assert best["cold/users"] == 0  # every toy test item occurs in some training history
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0]
    for key in ("hr@10", "ndcg@10", "mrr@10", "epsilon", "train_loss", "bytes_up", "seconds"):
        assert key in lines[0]
    assert lines[0]["bytes_up"] == 0 and summary["method"] == "popularity"
    assert not (tmp_path / "adapter").exists()  # no model, no adapter


def test_popularity_builds_no_model_and_ranks_as_the_central_evaluator(synthetic_dir, tiny_bert, tmp_path, monkeypatch):
    """300 users with many tied counts: ranking only the held-out items gives exactly the
    metrics the full central evaluator (model rows, lower-layer states) gave the same scorer."""
    from common.training import rank_of_targets
    from simulations.baselines import PopularityScorer

    config = {"dataset": "csv", "data-path": str(synthetic_dir / "interactions.csv"), "model": tiny_bert,
              "num-sites": 2, "max-tokens": 16, "max-history": 8, "eval-users": 250, "epsilon": math.inf}
    ev = CentralEvaluator(Settings.from_config(config))
    scorer = PopularityScorer(ev.split.popularity())
    expected = ev.metrics({w: rank_of_targets(scorer, rows, ev.device) for w, rows in ev.rows.items()})
    counts = ev.split.popularity()
    assert len(np.unique(counts)) < len(counts) and 0 < expected["test/ndcg@10"] < 1  # ties, hits and misses

    def no_model(*_):
        raise AssertionError("the popularity baseline built the model and its evaluation rows")

    monkeypatch.setattr(CentralEvaluator, "__init__", no_model)
    run_baseline("popularity", config, tmp_path)
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {k: line[k] for k in expected} == expected


def test_local_routes_each_user_to_its_own_site(toy_config):
    """Site A (u1, u2) and site B (u10, u3): a state that puts item i1 first helps exactly
    the users of the site that holds it (u2 and u3 both have test item i1)."""
    settings = Settings.from_config(toy_config)
    ev = CentralEvaluator(settings)
    users = [ev.data.user_ids[u] for u in ev.users]
    owner = np.array([0 if u in ("u1", "u2") else 1 for u in users])
    base = ev.initial_state()
    bias_key = next(k for k in base if k.endswith("scorer.bias"))
    i1 = ev.data.catalogue.item_ids.index("i1")
    boosted = dict(base) | {bias_key: np.where(np.arange(len(base[bias_key])) == i1, 1e4, -1e4).astype(np.float32)}
    rows = ev.rows["test"]
    ranks_a, _ = routed_ranks(ev.model, rows, owner, [boosted, base], ev.device)
    ranks_b, _ = routed_ranks(ev.model, rows, owner, [base, boosted], ev.device)
    assert ranks_a[users.index("u2")] == 0 and ranks_b[users.index("u3")] == 0
    # only the boosted site's user is forced to the top; the other's rank comes from the base model
    none, _ = routed_ranks(ev.model, rows, owner, [base, base], ev.device)
    assert ranks_a[users.index("u3")] == none[users.index("u3")]
    assert ranks_b[users.index("u2")] == none[users.index("u2")]


@pytest.mark.parametrize("name", ["zeroshot", "centralized", "local"])
def test_model_baselines_write_simulate_files(name, toy_config, tmp_path):
    summary = run_baseline(name, toy_config, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected_rounds = [0] if name == "zeroshot" else [0, 1, 2]
    assert [x["round"] for x in lines] == expected_rounds
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert {"final", "best_validation", "wall_seconds", "settings"} <= set(summary)
    assert "cold/ndcg@10" in summary["final"] and summary["method"] == name


def test_every_baseline_starts_from_the_untrained_model(toy_config, tmp_path):
    """The model object is shared within a process: a trained baseline must not leak its
    state into the next one (a sweep runs its baselines in one process)."""
    first = run_baseline("zeroshot", toy_config, tmp_path / "z1")["final"]
    run_baseline("centralized", toy_config | {"learning-rate": 0.5}, tmp_path / "c")
    again = run_baseline("zeroshot", toy_config, tmp_path / "z2")["final"]
    run_baseline("local", toy_config | {"popularity-prior": 0.0}, tmp_path / "l")  # the prior would change round 0 by design
    local0 = json.loads((tmp_path / "l" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("valid/loss", "test/loss", "valid/ndcg@10"):
        assert again[key] == pytest.approx(first[key]) and local0[key] == pytest.approx(first[key])


def test_dp_local_and_centralized_stay_in_budget(toy_config, tmp_path):
    cfg = toy_config | {"epsilon": 8.0, "expected-batch": 1}
    central = run_baseline("centralized", cfg, tmp_path / "c")
    assert 0 < central["epsilon"] <= 8.0
    assert central["sites"]["pooled"]["steps"] == 2 * 1  # a round = the federation's work: sites × local-steps
    local = run_baseline("local", cfg, tmp_path / "l")
    assert 0 < local["epsilon"] <= 8.0 and local["trained_sites"] == 2


def test_bad_baseline_and_epsilons(toy_config, tmp_path):
    result = CliRunner().invoke(app, ["baseline", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown baseline" in result.output
    assert parse_epsilons("inf,8, 1") == [1.0, 8.0, math.inf]
    result = CliRunner().invoke(app, ["sweep", "--epsilons", "0,8", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "ε must be > 0" in result.output


def test_baseline_command_shows_each_round_then_the_result(toy_config, tmp_path):
    args = ["baseline", "centralized", "--out", str(tmp_path / "c")]
    for key, value in toy_config.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rounds = [(m.group(1), m.start()) for m in re.finditer(r"round +(\d+)  sites", result.output)]
    assert [r for r, _ in rounds] == ["0", "1", "2"]
    assert result.output.index("centralized: NDCG@10") > rounds[-1][1]  # the result comes after the rounds


def test_library_baselines_run_once_per_seed_without_privacy(monkeypatch):
    monkeypatch.setitem(sys.modules, "implicit", types.ModuleType("implicit"))  # the extra, as far as plan looks
    cells = plan([1.0, 8.0], 2, ["popularity", "bpr", "local"])
    assert [c for c in cells if c.method == "bpr"] == [Cell("bpr", math.inf, 0), Cell("bpr", math.inf, 1)]
    assert len([c for c in cells if c.method == "local"]) == 4  # the private baseline still follows ε


def test_sweep_without_the_library_extra_fails_before_any_cell(toy_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "implicit", None)  # import implicit now raises ImportError
    args = ["sweep", "--epsilons", "8", "--baselines", "popularity,als", "--out", str(tmp_path / "s")]
    for key in ("dataset", "data-path", "model", "num-sites", "partition", "partition-column"):
        args += ["--set", f"{key}={toy_config[key]}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: baseline 'als' needs the 'implicit' package: pip install 'fedenc[baselines]'"
    )
    assert not any((tmp_path / "s").glob("*/summary.json"))  # not even the cheap popularity cell ran


@pytest.mark.slow
def test_two_epsilon_sweep_on_tiny_config(tiny_bert, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--epsilons", "8,inf", "--config", "configs/tiny.toml", "--set", f"model={tiny_bert}",
            "--baselines", "popularity", "--out", str(out)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "ran 3 cell(s), skipped 0 finished" in first.output
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["method"], r["epsilon"]) for r in rows] == [("federated", "8"), ("federated", "inf"), ("popularity", "inf")]
    fed8 = rows[0]
    assert float(fed8["noise_multiplier"]) > 0 and 0 < float(fed8["delta"]) < 1 and fed8["rounds"] == "2"
    assert rows[1]["noise_multiplier"] == "0"
    for r in rows:
        assert 0 <= float(r["ndcg@10"]) <= float(r["hr@10"]) <= 1 and r["seeds"] == "1"
    assert (out / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "federated-eps8-seed0" / "summary.json").read_text())
    assert 0 < summary["epsilon"] <= 8.0 and "cold/users" in summary["best_validation"]
    mtime = (out / "federated-eps8-seed0" / "summary.json").stat().st_mtime
    again = CliRunner().invoke(app, args)  # resumable: every cell is finished, nothing runs
    assert again.exit_code == 0, again.output
    assert "ran 0 cell(s), skipped 3 finished" in again.output
    assert (out / "federated-eps8-seed0" / "summary.json").stat().st_mtime == mtime
    # --report-only: a cell not run yet (ε=4) is left out of the table, and nothing runs
    report = CliRunner().invoke(app, [*args[:2], "4,8,inf", *args[3:], "--report-only"])
    assert report.exit_code == 0, report.output
    assert "ran 0 cell(s), skipped 3 finished, left out 1 unfinished" in report.output
    assert not (out / "federated-eps4-seed0").exists()
    with open(out / "sweep.csv") as f:
        assert [r["epsilon"] for r in csv.DictReader(f)] == ["8", "inf", "inf"]


@pytest.mark.slow
def test_bench_writes_every_measurement(tiny_bert, tmp_path):
    """The benchmark end to end on the tiny model (slow: it runs simulations)."""
    from simulations.bench import bench

    config = {"model": tiny_bert, "num-sites": 2, "num-server-rounds": 1, "local-steps": 2,
              "expected-batch": 8, "eval-users": 50, "max-tokens": 16}
    result = bench(config, tmp_path, site_counts=(4,), step_batches=(8,), progress=lambda _: None)
    saved = json.loads((tmp_path / "bench.json").read_text())
    for key in ("dp_step_ratio", "bytes_ratio", "bytes_ratio_fp16", "framework_overhead_ratio", "peak_pss_mb",
                "eval_users_per_s", "max_sites"):
        assert saved[key] == pytest.approx(result[key]) and result[key] > 0, key
    assert result["bytes_ratio_fp16"] == pytest.approx(result["bytes_ratio"] / 2)
    at_peak = " ".join(result["peak_pss_by_process_mb"])  # the user's command and Flower's runtime, measured apart
    assert "fedenc simulate" in at_peak and "flwr-simulation" in at_peak
    assert result["max_sites"] == 4
    # both arms ran as commands of their own and wrote a run's outputs
    for arm in ("bare", "simulate"):
        assert {"metrics.jsonl", "summary.json", "adapter"} <= {p.name for p in (tmp_path / arm).iterdir()}, arm
    assert 0 <= result["bare_loop_ndcg@10"] <= 1 and "bare_loop_peak_pss_mb" in result
    assert saved["parts"]["complete"] and saved["parts"]["done"] == ["steps", "eval", "overhead", "scale"]


def test_plot_range_leaves_room_around_the_best_baseline_and_the_error_bars():
    """matplotlib puts no margin above a horizontal line: the best baseline (here SASRec,
    above every curve) sat on the frame of docs/privacy_utility_*.png."""
    rows = [{"method": "federated", "epsilon": "8", "ndcg@10": 0.060, "ndcg@10_std": 0.004},
            {"method": "sasrec", "epsilon": "inf", "ndcg@10": 0.089, "ndcg@10_std": 0.003},
            {"method": "zeroshot", "epsilon": "inf", "ndcg@10": 0.028, "ndcg@10_std": 0.0},
            {"method": "bpr", "epsilon": "inf", "ndcg@10": math.nan, "ndcg@10_std": math.nan}]
    lo, hi = y_limits(rows)
    span = hi - lo
    assert hi - (0.089 + 0.003) > 0.03 * span and 0.028 - lo > 0.03 * span
    assert hi - lo < 0.2 and math.isfinite(lo) and math.isfinite(hi)

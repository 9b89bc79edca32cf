"""Library baselines (simulations/library_baselines.py): their ranks follow fedenc's exclusion
and tie rules, the summary's best epoch is the best validation NDCG@10, and a missing
optional extra is one `error:` line. Training tests skip when the `baselines` extra
(implicit, cornac) is not installed; CI installs only `.[test]`."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import simulations.library_baselines as lib
from cli.main import app
from common.config import Settings
from common.evaluation import CentralEvaluator
from simulations.baselines import run_baseline


@pytest.fixture(scope="module")
def config(synthetic_dir, tiny_bert) -> dict:
    return {
        "dataset": "csv",
        "data-path": str(synthetic_dir / "interactions.csv"),
        "model": tiny_bert,
        "num-sites": 2,
        "max-tokens": 16,
        "max-history": 8,
        "epsilon": math.inf,
    }


def test_ranks_follow_the_exclusion_and_tie_rules(config):
    evaluator = CentralEvaluator(Settings.from_config(config))
    n = evaluator.split.num_items
    scores = np.random.default_rng(3).integers(0, 4, size=(len(evaluator.users), n)).astype(float)  # many ties
    ranked = lib.library_ranks(evaluator, lambda users, histories: scores)
    split = evaluator.split
    for which in ("valid", "test"):
        ranks = ranked[which][0]
        for row, user in enumerate(evaluator.users[:5]):
            history = list(split.train[user]) + ([int(split.valid[user])] if which == "test" else [])
            target = int(split.valid[user] if which == "valid" else split.test[user])
            allowed = [j for j in range(n) if j == target or j not in history]  # history out, target kept
            assert ranks[row] == sum(scores[row, j] > scores[row, target] for j in allowed), (which, user)


def _lines(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_best_validation(summary, lines, epochs):
    assert [x["round"] for x in lines] == epochs
    valid = [x["valid/ndcg@10"] for x in lines]
    assert len(set(valid)) > 1  # training moved the model, so the choice is a real one
    best = lines[int(np.argmax(valid))]  # first epoch with the highest validation NDCG@10
    assert summary["best_round"] == best["round"]
    assert summary["best_validation"]["ndcg@10"] == best["ndcg@10"] == best["test/ndcg@10"]


def test_bpr_reports_test_at_the_best_validation_epoch(config, tmp_path, monkeypatch):
    pytest.importorskip("implicit", reason="the baselines extra (implicit) is not installed")
    hp = dict(lib.LIBRARY_BASELINES["bpr"][1], epochs=40, every=5)
    monkeypatch.setitem(lib.LIBRARY_BASELINES, "bpr", ("implicit", hp))
    summary = run_baseline("bpr", config, tmp_path)
    _assert_best_validation(summary, _lines(tmp_path), list(range(5, 41, 5)))
    assert summary["method"] == "bpr" and summary["library"].startswith("implicit ")
    assert summary["best_validation"]["ndcg@10"] > 0


def test_sasrec_reports_test_at_the_best_validation_epoch(config, tmp_path, monkeypatch):
    pytest.importorskip("cornac", reason="the baselines extra (cornac) is not installed")
    hp = dict(lib.LIBRARY_BASELINES["sasrec"][1], epochs=6, every=2, embedding_dim=16, max_len=10)
    monkeypatch.setitem(lib.LIBRARY_BASELINES, "sasrec", ("cornac", hp))
    summary = run_baseline("sasrec", config, tmp_path)
    _assert_best_validation(summary, _lines(tmp_path), [2, 4, 6])
    assert summary["library"].startswith("cornac ")


def test_missing_extra_is_one_error_line(config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "implicit", None)  # import implicit now raises ImportError
    args = ["baseline", "bpr", "--out", str(tmp_path / "bpr")]
    for key in ("dataset", "data-path", "model", "num-sites", "epsilon"):
        args += ["--set", f"{key}={config[key]}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: baseline 'bpr' needs the 'implicit' package: pip install 'fedenc[baselines]'"
    )
    assert "Traceback" not in result.output and not (tmp_path / "bpr" / "metrics.jsonl").exists()

"""The ablation: each arm runs with its own trained parts, the prior arm ranks the full run's
prior by the popularity rule, the table has every row at every ε, and a second run runs
nothing. The federated runs are stood in for by a fake that records its settings and
writes a run's files (the real path: the slow test at the end)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from common.config import Settings
from common.evaluation import HeldOutUsers
from common.prior import log_prior
from simulations.ablation import ARMS


@pytest.fixture()
def toy_args(toy_dir, tiny_bert) -> list[str]:
    pairs = {"dataset": "csv", "data-path": toy_dir / "interactions.csv", "model": tiny_bert, "num-sites": 2,
             "partition": "natural", "partition-column": "site", "expected-batch": 2, "max-tokens": 16, "max-history": 8}
    return [arg for key, value in pairs.items() for arg in ("--set", f"{key}={value}")]


def _fake_run(prior: np.ndarray, calls: list):
    """A federated run's files: round 0, then a round best on validation and a later round
    best on test. Test NDCG@10 encodes the trained parts, so each row shows whose run it read."""

    def simulate(cfg, out, resume=False, overwrite=False, on_progress=None, **_):
        s = Settings.from_config(cfg)
        trains = (s.model.train_lora, s.model.train_fusion, s.model.train_bias)
        calls.append((s.privacy.epsilon, s.run.seed, trains, out.name))
        code = sum(bit << i for i, bit in enumerate(trains)) / 100  # 0.01 .. 0.07
        lines = [{"round": 0, "valid/ndcg@10": 0.1, "test/ndcg@10": 0.005, "test/hr@10": 0.05},
                 {"round": 1, "valid/ndcg@10": 0.3, "test/ndcg@10": code, "test/hr@10": 2 * code},
                 {"round": 2, "valid/ndcg@10": 0.2, "test/ndcg@10": 0.9, "test/hr@10": 0.95}]
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        np.save(out / "prior.npy", prior)
        summary = {"best_validation": lines[1] | {"ndcg@10": code}, "best_round": 1, "settings": s.as_dict()}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    return simulate


def test_ablation_arms_settings_and_table(toy_args, toy_dir, tiny_bert, tmp_path, monkeypatch):
    import simulations.simulate

    config = {"dataset": "csv", "data-path": str(toy_dir / "interactions.csv"), "model": tiny_bert}
    held = HeldOutUsers(Settings.from_config(config))
    prior = log_prior(held.split.popularity())  # the exact counts: the prior arm must equal most-popular
    calls: list = []
    monkeypatch.setattr(simulations.simulate, "simulate", _fake_run(prior, calls))
    out = tmp_path / "ablation"
    args = ["ablation", "--epsilons", "inf,8", "--out", str(out), *toy_args]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output

    # ε = 8 first (finite ones first), the full run before the single-part arms, each with its part alone
    assert calls == [(e, 0, trains, f"{arm}-eps{label}-seed0") for e, label in ((8.0, "8"), (math.inf, "inf"))
                     for arm, trains in (("federated", (True, True, True)), ("lora-only", (True, False, False)),
                                         ("fusion-only", (False, True, False)), ("bias-only", (False, False, True)))]
    with open(out / "ablation.csv") as f:
        rows = {(r["arm"], r["epsilon"]): r for r in csv.DictReader(f)}
    assert list(rows) == [(arm, e) for arm, _, _ in ARMS for e in ("8", "inf")]
    popularity = json.loads((out / "popularity-epsinf-seed0" / "summary.json").read_text())["best_validation"]
    for e in ("8", "inf"):
        # test metrics of the best-VALIDATION round (round 1), not the best test round (2)
        for arm, code in (("lora-only", 0.01), ("fusion-only", 0.02), ("bias-only", 0.04), ("federated", 0.07)):
            assert float(rows[arm, e]["ndcg@10"]) == pytest.approx(code) and rows[arm, e]["rounds"] == "1"
            assert float(rows[arm, e]["hr@10"]) == pytest.approx(2 * code)
            assert float(rows[arm, e]["over_round0"]) == pytest.approx(code - 0.005)
            assert float(rows[arm, e]["x_popularity"]) == pytest.approx(code / popularity["ndcg@10"], rel=1e-5)
        assert float(rows["round0", e]["ndcg@10"]) == 0.005 and rows["round0", e]["rounds"] == "0"
        assert rows["round0", e]["over_round0"] == rows["prior", e]["over_round0"] == ""
        assert float(rows["prior", e]["ndcg@10"]) == pytest.approx(popularity["ndcg@10"])
        assert float(rows["prior", e]["hr@10"]) == pytest.approx(popularity["hr@10"])
        assert float(rows["prior", e]["x_popularity"]) == pytest.approx(1.0)
    zeroshot = json.loads((out / "zeroshot-epsinf-seed0" / "summary.json").read_text())["best_validation"]
    assert float(rows["zeroshot", "8"]["ndcg@10"]) == pytest.approx(zeroshot["test/ndcg@10"], rel=1e-5)
    table = (out / "ablation.md").read_text()
    assert table in first.output
    assert "| part | ε=8 NDCG@10 | HR@10 | × pop. | Δ own round 0 | ε=∞ NDCG@10 | HR@10 | × pop. | Δ own round 0 |" in table
    for _, part, _ in ARMS:
        assert f"| {part} |" in table
    assert "| + LoRA only | 0.0100 | 0.0200 |" in table and "| +0.0050 |" in table

    again = CliRunner().invoke(app, args)  # resumable: every cell is finished, nothing runs
    assert again.exit_code == 0, again.output
    assert len(calls) == 8 and "ran 0 cell(s), skipped 12 finished" in again.output


def test_ablation_refuses_a_run_without_prior(toy_args, tmp_path):
    result = CliRunner().invoke(app, ["ablation", "--out", str(tmp_path), *toy_args, "--set", "popularity-prior=0"])
    assert result.exit_code == 2 and "popularity-prior is 0" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ablation_arms_train_their_parts_through_flower(tiny_bert, tmp_path):
    """One ε, one round, through the real Flower path: the three single-part runs together
    send exactly the parameters the full run sends (the prior's weight with the bias)."""
    out = tmp_path / "ablation"
    args = ["ablation", "--epsilons", "8", "--config", "configs/tiny.toml", "--set", f"model={tiny_bert}",
            "--set", "num-server-rounds=1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sent = {}
    for arm in ("federated", "lora-only", "fusion-only", "bias-only"):
        summary = json.loads((out / f"{arm}-eps8-seed0" / "summary.json").read_text())
        assert 0 < summary["epsilon"] <= 8.0
        sent[arm] = summary["bytes_per_update"]
    assert 0 < min(sent.values()) and sent["federated"] == sent["lora-only"] + sent["fusion-only"] + sent["bias-only"]
    with open(out / "ablation.csv") as f:
        assert [r["arm"] for r in csv.DictReader(f)] == [arm for arm, _, _ in ARMS]

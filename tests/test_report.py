"""The run report: MODEL_CARD.md (and ``model_card`` in summary.json) and report.png, from a
run folder built in-process (the centralised baseline beside a popularity baseline, as in a
sweep) and from hand-written run files (per-site ε per round, DP runs without a train loss,
runs without DP)."""

from __future__ import annotations

import json
import math
import struct

import pytest
from test_simulate import TINY
from typer.testing import CliRunner

from cli.main import app
from common.config import load_config_file
from simulations.baselines import run_baseline
from simulations.card import card_markdown, model_card
from simulations.report import plot_report, site_epsilons, write_report


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def sweep_dir(tiny_bert, tmp_path_factory):
    """A DP run (centralised, one pooled site) and the popularity baseline beside it."""
    root = tmp_path_factory.mktemp("report")
    config = load_config_file(TINY) | {"model": tiny_bert, "popularity-prior": 0.1}
    run_baseline("popularity", config | {"epsilon": math.inf}, root / "popularity-epsinf-seed0")
    run_baseline("centralized", config, root / "run")
    return root


@pytest.fixture(scope="module")
def reported(sweep_dir):
    run = sweep_dir / "run"
    before = json.loads((run / "summary.json").read_text())
    written = write_report(run)
    return run, before, written


def test_model_card_facts(reported, tiny_bert, sweep_dir):
    run, before, written = reported
    summary = strict_json(run / "summary.json")
    card = summary["model_card"]
    assert summary["final"]["test/ndcg@10"] == before["final"]["test/ndcg@10"]  # the rest is kept
    assert card["model"]["base_encoder"] == tiny_bert
    adapter = card["model"]["adapter"]
    assert (adapter["rank"], adapter["alpha"], adapter["ffa_lora"]) == (4, 8.0, True)
    assert adapter["target_modules"] == ["query", "value"]
    site = card["privacy"]["sites"]["pooled"]
    assert site["epsilon"] == before["sites"]["pooled"]["epsilon"] and 0 < site["epsilon"] <= 8.0
    assert site["delta"] == before["sites"]["pooled"]["delta"]
    assert card["privacy"]["accountant"] == "rdp" and card["privacy"]["epsilon_budget"] == 8.0 and card["privacy"]["private"]
    assert card["model"]["popularity_prior"] is True
    final = card["evaluation"]["final"]
    assert final["test"]["ndcg@10"] == before["final"]["test/ndcg@10"] and final["test"]["users"] == 200
    assert final["test"]["recall@10"] == final["test"]["hr@10"] and 0 < final["test"]["auc"] <= 1
    popularity = json.loads((sweep_dir / "popularity-epsinf-seed0" / "summary.json").read_text())
    [base] = card["evaluation"]["baselines"]
    assert base["method"] == "popularity" and base["ndcg@10"] == popularity["best_validation"]["ndcg@10"]
    assert card["protected"] and any("evaluation numbers" in x for x in card["not_protected"])
    assert any("pools every user's data" in x for x in card["not_protected"])  # a centralised run says so
    popularity_card = model_card(sweep_dir / "popularity-epsinf-seed0")
    assert not popularity_card["privacy"]["private"] and popularity_card["protected"] == []
    assert popularity_card["not_protected"][0].startswith("Nothing: the most-popular baseline ranks by exact")


def test_model_card_markdown(reported, tiny_bert):
    run, before, written = reported
    text = written["card"].read_text()
    card = strict_json(run / "summary.json")["model_card"]
    assert text == card_markdown(card)  # the file and summary.json say the same
    for needle in (f"`{tiny_bert}`", "rank 4", f"{before['sites']['pooled']['epsilon']:.4g}", "accountant `rdp`",
                   "README.md#what-leaves-a-site", f"{before['final']['test/ndcg@10']:.4g}", "| popularity",
                   "### Not protected", "recall@k = HR@k"):
        assert needle in text, needle


def test_report_png(reported):
    run, _, written = reported
    assert written["plot"] == run / "report.png"
    width, height = png_size(written["plot"])
    assert width >= 1000 and height >= 700


def fake_run(folder, rows: list[dict], sites: dict, settings: dict):
    """A run folder with only summary.json and metrics.jsonl, as a future or older version may write them."""
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"final": rows[-1], "best_validation": rows[-1], "best_round": rows[-1]["round"], "sites": sites,
               "epsilon": rows[-1]["epsilon"], "settings": settings}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def line(rnd: int, eps: float, **extra) -> dict:
    return {"round": rnd, "epsilon": eps, "train_loss": None, "valid/ndcg@10": 0.01 * rnd, "test/ndcg@10": 0.02 * rnd,
            "valid/loss": 9.0 - rnd, "test/users": 50} | extra


def test_per_site_epsilon_per_round_and_no_train_loss(tmp_path):
    rows = [line(0, 0.5, site_epsilon={"0": 0.5, "1": 0.4}), line(1, 3.0, site_epsilon={"0": 3.0, "1": 2.5}),
            line(2, 6.0, site_epsilon={"0": 6.0, "1": 2.5, "2": None})]
    sites = {"0": {"epsilon": 6.0, "budget": 8.0}, "1": {"epsilon": 2.5, "delta": 1e-4, "refused": 1}, "2": "garbled"}
    run = fake_run(tmp_path / "dp", rows, sites, {"dataset": "csv", "epsilon": 8.0, "num-sites": 3})
    assert site_epsilons(rows) == {"0": [(0, 0.5), (1, 3.0), (2, 6.0)], "1": [(0, 0.4), (1, 2.5), (2, 2.5)]}
    assert png_size(plot_report(run))[0] >= 1000
    card = model_card(run)
    assert card["privacy"]["sites"] == {"0": {"epsilon": 6.0, "budget": 8.0}, "1": {"epsilon": 2.5, "delta": 1e-4, "refused": 1}}
    text = card_markdown(card)
    assert "| 1 | 2.5 | 0.0001 | – | – |" in text and "No baseline runs" in text


def test_a_run_without_dp_says_so(tmp_path):
    rows = [line(0, 0.0, train_loss=float("nan")), line(1, 0.0, train_loss=5.0)]
    run = fake_run(tmp_path / "nodp", rows, {"0": {"epsilon": 0.0}}, {"dataset": "movietweetings", "epsilon": None})
    written = write_report(run)
    card = strict_json(run / "summary.json")["model_card"]
    assert not card["privacy"]["private"] and card["protected"] == []
    assert card["not_protected"][0].startswith("Nothing: this run trained without differential privacy")
    assert "**No differential privacy**" in written["card"].read_text()
    assert png_size(written["plot"])[0] >= 1000


def test_fedenc_report_cli(reported, tmp_path):
    run, _, written = reported
    (run / "report.png").unlink()
    ok = CliRunner().invoke(app, ["report", str(run)])
    assert ok.exit_code == 0, ok.output
    assert (run / "report.png").is_file() and "MODEL_CARD.md" in ok.stdout
    for bad, needle in ((tmp_path / "missing", "no such run folder"), (tmp_path, "no summary.json")):
        result = CliRunner().invoke(app, ["report", str(bad)])
        errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], result.output
        assert "Traceback" not in result.output


def test_sweep_table_carries_recall_and_auc(sweep_dir, tmp_path):
    from simulations.sweep import COLUMNS, Cell, table, write_csv

    [row] = table([Cell("popularity", math.inf, 0)], sweep_dir)
    best = json.loads((sweep_dir / "popularity-epsinf-seed0" / "summary.json").read_text())["best_validation"]
    assert row["auc"] == best["test/auc"] and 0 < row["auc"] < 1
    assert row["recall@10"] == row["hr@10"] == best["test/hr@10"]
    write_csv([row], tmp_path / "sweep.csv")
    header = (tmp_path / "sweep.csv").read_text().splitlines()[0].split(",")
    assert header == list(COLUMNS) and {"recall@10", "auc"} <= set(header)

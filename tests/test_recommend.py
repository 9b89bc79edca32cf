"""Using a finished run: the Python API (common.recommend), ``fedenc recommend``, and the
recall@K / AUC metrics.

The API is tested on a run folder built in-process without Flower (the centralised
baseline writes the same adapter/, summary.json and metrics.jsonl through the same
RunRecorder as the ServerApp); the end-to-end test through ``fedenc simulate`` is slow.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_simulate import TINY, explain, fedenc, read_metrics
from typer.testing import CliRunner

from cli.main import app
from common.config import load_config_file
from common.recommend import RunError, UnknownItems, load_run
from common.training import ranking_metrics
from simulations.baselines import run_baseline

TOY_CSV = Path(__file__).parent / "data" / "toy" / "interactions.csv"  # another catalogue than the run's

L3 = 1 / math.log2(3)


# -- recall@K and AUC -------------------------------------------------------------------------


def test_recall_equals_hit_rate_and_auc_known_answers():
    ranks = np.array([0, 1, 30])
    m = ranking_metrics(ranks, rankable=np.array([101, 2, 31]))
    assert m["recall@10"] == m["hr@10"] == pytest.approx(2 / 3)
    assert m["recall@20"] == m["hr@20"] == pytest.approx(2 / 3)
    # per user 1 - rank/(rankable - 1): 1 - 0/100, 1 - 1/1, 1 - 30/30
    assert m["auc"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert ranking_metrics(ranks, rankable=101)["auc"] == pytest.approx((1 + 0.99 + 0.7) / 3)
    # the keys that were there before keep their values
    assert ranking_metrics(ranks)["ndcg@10"] == pytest.approx((1 + L3) / 3) and "auc" not in ranking_metrics(ranks)
    with pytest.raises(ValueError, match="rankable"):
        ranking_metrics(np.array([5]), rankable=5)


@pytest.fixture(scope="module")
def toy_config(toy_dir, tiny_bert) -> dict:
    return {"dataset": "csv", "data-path": str(toy_dir / "interactions.csv"), "model": tiny_bert, "num-sites": 2,
            "partition": "natural", "partition-column": "site", "epsilon": math.inf, "max-tokens": 16}


def test_auc_through_central_evaluation(toy_config, tmp_path):
    """Most-popular on the toy set (8 items; ranks as in test_sweep's hand computation). Each
    user's history is excluded, so a user with h history items has 8 - h rankable items."""
    best = run_baseline("popularity", toy_config, tmp_path)["best_validation"]
    # valid: u1 rank 1 of 4 (4 history items), u10 1 of 5, u2 2 of 5, u3 0 of 5
    assert best["valid/auc"] == pytest.approx((1 - 1 / 3 + 1 - 1 / 4 + 1 - 2 / 4 + 1) / 4)
    # test (history + validation item): u1 1 of 3, u10 0 of 4, u2 1 of 4, u3 1 of 4
    assert best["test/auc"] == pytest.approx((1 - 1 / 2 + 1 + 1 - 1 / 3 + 1 - 1 / 3) / 4)
    assert best["test/recall@10"] == best["test/hr@10"] == 1.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "test/auc" in lines[0] and "valid/recall@20" in lines[0]


# -- the Python API on a run built in-process ----------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_bert, tmp_path_factory):
    """A finished DP run of the tiny config (centralised: one pooled site) with a popularity prior."""
    out = tmp_path_factory.mktemp("api") / "run"
    config = load_config_file(TINY) | {"model": tiny_bert, "popularity-prior": 0.1}
    run_baseline("centralized", config, out)
    return out


@pytest.fixture(scope="module")
def model(run_dir):
    return load_run(run_dir, device="cpu")


def test_api_reproduces_the_runs_test_ndcg(model, run_dir):
    """adapter/ is the best-validation round's model: the API scores what the summary reports."""
    final = json.loads((run_dir / "summary.json").read_text())["best_validation"]
    again = model.evaluate()
    for key in ("test/ndcg@10", "valid/ndcg@10", "test/hr@10", "test/auc", "cold/ndcg@10"):
        assert abs(again[key] - final[key]) <= 1e-6, key
    held = model.held_out("test")
    assert len(held.user_ids) == final["test/users"] == 200
    assert abs(ranking_metrics(held.ranks, rankable=held.rankable)["ndcg@10"] - final["test/ndcg@10"]) <= 1e-6


def test_recommend_ranks_as_central_evaluation_does(model):
    """The position of a user's test item in recommend() over the whole catalogue, for the
    history central evaluation uses (train + validation item), is its evaluated rank."""
    held = model.held_out("test")
    split = model.evaluator.split
    for j in range(5):
        u = model.evaluator.users[j]
        history = [int(i) for i in np.append(split.train[u], split.valid[u])]
        everything = model.recommend([history], k=len(model.data.catalogue))[0]
        position = [r.item_id for r in everything].index(held.item_ids[j])
        assert position == held.ranks[j]


def test_recommend_returns_k_items_outside_the_history(model):
    history = model.history_of(model.data.user_ids[3])
    recs = model.recommend([history], k=10)[0]
    assert len(recs) == 10 and len({r.item_id for r in recs}) == 10
    history_ids = {model.data.catalogue.item_ids[i] for i in history}
    assert not history_ids & {r.item_id for r in recs}
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
    assert recs[0].title == model.titles[model.data.catalogue.item_ids.index(recs[0].item_id)]


def test_batches_score_each_history_alone(model):
    a, b = model.history_of(model.data.user_ids[0]), model.history_of(model.data.user_ids[1])
    together = model.recommend([a, b], k=5)
    alone = [model.recommend([a], k=5)[0], model.recommend([b], k=5)[0]]
    for got, want in zip(together, alone, strict=True):
        assert [r.item_id for r in got] == [r.item_id for r in want]
        assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-5)


def test_items_by_id_title_or_text(model):
    i = 42
    cat = model.data.catalogue
    for name in (cat.item_ids[i], model.titles[i].upper(), cat.texts[i]):
        assert model.lookup([name]) == ([i], {})
    typo = model.titles[i][:-3] + "x" + model.titles[i][-2:]  # "Title (201x)" for "Title (2013)"
    found, unknown = model.lookup([typo])
    assert found == [] and model.titles[i] in unknown[typo]
    with pytest.raises(UnknownItems) as err:
        model.recommend([[model.titles[i], "no such film at all zzz"]])
    assert "no such film at all zzz" in str(err.value) and list(err.value.closest) == ["no such film at all zzz"]


def test_a_title_several_items_share_is_not_guessed(model):
    titles = model.titles
    shared = next(t for t in titles if titles.count(t) > 1)
    found, unknown = model.lookup([shared])
    assert found == [] and len(unknown[shared]) == titles.count(shared)
    assert all("item id" in c for c in unknown[shared])


def test_one_user_in_under_five_seconds(model):
    history = model.history_of(model.data.user_ids[7])
    start = time.perf_counter()
    model.recommend([history], k=10)
    assert time.perf_counter() - start < 5.0


def test_load_run_refuses_a_folder_without_a_model(tmp_path, run_dir):
    with pytest.raises(RunError, match="no such run folder"):
        load_run(tmp_path / "nothing")
    with pytest.raises(RunError, match="no model in adapter"):
        load_run(tmp_path)


# -- fedenc recommend ------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, ["recommend", *args])


def one_error_line(result) -> str:
    """Exit 2 with exactly one ``error:`` line on stderr and no traceback; returns the line."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_cli_json_for_a_history_of_titles(model, run_dir):
    history = [model.titles[i] for i in model.history_of(model.data.user_ids[5])[:4]]
    result = invoke("--run", str(run_dir), "--history", "; ".join(history), "-k", "7", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"run", "k", "user", "history", "unknown", "recommendations"}
    assert [h["title"] for h in out["history"]] == history and out["unknown"] == []
    recs = out["recommendations"]
    assert [r["rank"] for r in recs] == list(range(1, 8))
    assert {"item_id", "title", "score"} <= set(recs[0])
    assert not {h["item_id"] for h in out["history"]} & {r["item_id"] for r in recs}


def test_cli_reports_unknown_titles_and_uses_the_rest(model, run_dir):
    known = model.titles[10]
    typo = known.replace(" (", "x (", 1)
    result = invoke("--run", str(run_dir), "--history", f"{known}; {typo}", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [h["title"] for h in out["history"]] == [known]
    assert out["unknown"][0]["query"] == typo and known in out["unknown"][0]["closest"]
    assert "warning: unknown item" in result.stderr and known in result.stderr


def test_cli_only_unknown_titles_is_one_error(run_dir):
    result = invoke("--run", str(run_dir), "--history", "Not A Film (1234)")
    assert "no item of the history is in the catalogue" in one_error_line(result)


def test_cli_user_and_history_file(model, run_dir, tmp_path):
    user = model.data.user_ids[2]
    result = invoke("--run", str(run_dir), "--user", user, "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["user"] == user and len(out["history"]) == len(model.history_of(user)) and len(out["recommendations"]) == 3
    file = tmp_path / "history.txt"
    file.write_text("\n".join(model.data.catalogue.item_ids[i] for i in model.history_of(user)) + "\n")
    from_file = json.loads(invoke("--run", str(run_dir), "--history-file", str(file), "--json", "-k", "3").stdout)
    assert from_file["recommendations"] == out["recommendations"]
    table = invoke("--run", str(run_dir), "--user", user, "-k", "3")
    assert table.exit_code == 0 and out["recommendations"][0]["title"] in table.stdout
    named = json.loads(invoke("--run", str(run_dir), "--user", user, "--dataset", "movietweetings", "--json", "-k", "3").stdout)
    assert named["recommendations"] == out["recommendations"]


@pytest.mark.parametrize("args, needle", [
    (["--history", "x"], "no such run folder"),
    ([], "exactly one of"),
    (["--history", "a", "--user", "b"], "exactly one of"),
    (["--user", "nobody-here"], "is not in the run's dataset"),
    (["--history", " ; "], "history is empty"),
    (["--user", "u1", "--dataset", str(TOY_CSV)], "catalogue is not the one the run's model ranks"),
    (["--history", "x", "--device", "cuda:7"] if not torch.cuda.is_available() else ["--history", "x", "--device", "tpu"],
     "device"),
])
def test_cli_bad_input(args, needle, run_dir, tmp_path):
    run = str(tmp_path / "missing") if needle == "no such run folder" else str(run_dir)
    assert needle in one_error_line(invoke("--run", run, *args))


# -- end to end through Flower (slow) -------------------------------------------------------------


@pytest.mark.slow
def test_simulate_then_recommend_end_to_end(tiny_bert, tmp_path):
    """``fedenc simulate`` on the tiny config leaves MODEL_CARD.md and report.png; ``fedenc
    recommend`` answers from the run; the API reproduces its test NDCG@10."""
    cache = tmp_path / "cache"
    cache.mkdir()
    out = tmp_path / "run"
    proc = fedenc("simulate", "--config", str(TINY), "--set", f"model={tiny_bert}", "--set", "popularity-prior=0.1",
                  "--out", str(out), cache=cache)
    assert proc.returncode == 0, explain(proc)
    assert (out / "MODEL_CARD.md").is_file() and (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_card"]["privacy"]["sites"] and "test/auc" in read_metrics(out)[-1]
    run = load_run(out, device="cpu")
    assert abs(run.evaluate()["test/ndcg@10"] - summary["best_validation"]["test/ndcg@10"]) <= 1e-6  # adapter/'s round
    history = [run.titles[i] for i in run.history_of(run.data.user_ids[0])[-3:]]
    proc = fedenc("recommend", "--run", str(out), "--history", "; ".join(history), "--json", cache=cache)
    assert proc.returncode == 0, explain(proc)
    recs = json.loads(proc.stdout)["recommendations"]
    assert len(recs) == 10 and not set(history) & {r["title"] for r in recs}

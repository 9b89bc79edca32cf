"""Nothing lost: output folders, crash-safe checkpoints, strict JSON; and the data checks
that real logs need (per-user columns that vary, empty ids, NaN scores)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_simulate import TINY, assert_clean_error, fedenc
from torch.utils.data import TensorDataset

from common import adapter
from common.config import ConfigError, Settings
from common.data import Catalogue, DataError, DataSpec, load
from common.examples import EvalRows
from common.files import atomic_write_text, default_mode, dumps
from common.partition import partition_users
from common.training import rank_of_targets, ranking_metrics
from server import recorder as central
from server.recorder import RunRecorder, usable_checkpoint
from simulations.outdir import Replaced, settle


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict readers do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


METRICS = {"test/hr@10": math.nan, "test/ndcg@10": 0.2, "test/mrr@10": 0.1, "valid/ndcg@10": math.nan}


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    """A recorder whose adapter saving writes a stand-in file (the swap is what is tested)."""
    def fake_adapter(model, directory, settings):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "adapter_model.safetensors").write_text("weights")

    monkeypatch.setattr(adapter, "save_adapter", fake_adapter)  # the recorder imports it when it saves
    return RunRecorder.open(tmp_path / "run", Settings.from_config())


def test_metrics_and_summary_are_strict_json(recorder):
    recorder.round_done(0, METRICS, {"train_loss": math.inf}, None, {})
    recorder.round_done(1, METRICS | {"valid/ndcg@10": 0.3}, {"train_loss": math.nan}, None, {"w": np.ones(2, np.float32)})
    rows = [strict_json(line) for line in (recorder.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] is None and rows[0]["hr@10"] is None and rows[1]["valid/ndcg@10"] == 0.3
    recorder.finish(None, {"w": np.ones(2, np.float32)})
    summary = strict_json((recorder.out / "summary.json").read_text())
    assert summary["best_round"] == 1 and summary["final"]["train_loss"] is None
    for name in ("summary.json", "metrics.jsonl", "run.json"):  # as readable as a plain write makes them
        assert (recorder.out / name).stat().st_mode & 0o777 == default_mode(), name
    assert dumps({"x": np.float32("nan"), "y": [np.inf]}) == '{"x": null, "y": [null]}'


def _loaded_states(monkeypatch) -> list[dict]:
    """The states the recorder loads into the model it saves as adapter/."""
    loaded = []
    monkeypatch.setattr(adapter, "load_trainable_state", lambda model, state: loaded.append(state))
    return loaded


def test_the_adapter_is_the_best_validation_round_round_0_included(recorder, monkeypatch):
    """Model selection on validation picks what ships: here the untrained start (round 0)
    beats both trained rounds, so adapter/ holds round 0's state, not the last round's."""
    loaded = _loaded_states(monkeypatch)
    for rnd, valid in enumerate([0.5, 0.3, 0.4]):
        recorder.round_done(rnd, METRICS | {"valid/ndcg@10": valid}, {}, None, {"w": np.full(2, rnd, np.float32)})
    summary = recorder.finish(object(), {"w": np.full(2, 2, np.float32)})
    assert summary["best_round"] == 0 and summary["best_validation"]["valid/ndcg@10"] == 0.5
    assert summary["final"]["round"] == 2
    np.testing.assert_array_equal(loaded[-1]["w"], [0, 0])


def test_the_best_round_survives_a_resume(recorder, monkeypatch):
    for rnd, valid in enumerate([0.1, 0.5, 0.2]):
        recorder.round_done(rnd, METRICS | {"valid/ndcg@10": valid}, {}, None, {"w": np.full(2, rnd, np.float32)})
    resumed = RunRecorder.open(recorder.out, recorder.settings)
    assert resumed.start_round == 2 and resumed.best_round == 1
    loaded = _loaded_states(monkeypatch)
    resumed.round_done(3, METRICS | {"valid/ndcg@10": 0.3}, {}, None, {"w": np.full(2, 3, np.float32)})
    assert resumed.finish(object(), {"w": np.full(2, 3, np.float32)})["best_round"] == 1
    np.testing.assert_array_equal(loaded[-1]["w"], [1, 1])


def test_a_crash_before_the_checkpoint_swap_keeps_the_previous_one(recorder, monkeypatch):
    first, second = {"w": np.full(2, 1.0, np.float32)}, {"w": np.full(2, 2.0, np.float32)}
    recorder.round_done(0, METRICS, {}, None, first)
    recorder.round_done(1, METRICS, {}, None, first)
    assert usable_checkpoint(recorder.out).name == "round-00001"

    def crash_on_pointer(path, text):
        if Path(path).name == central.POINTER:
            raise OSError("power cut")
        return atomic_write_text(path, text)

    monkeypatch.setattr(central, "atomic_write_text", crash_on_pointer)
    with pytest.raises(OSError, match="power cut"):
        recorder.round_done(2, METRICS, {}, None, second)
    monkeypatch.setattr(central, "atomic_write_text", atomic_write_text)  # power is back
    resumed = RunRecorder.open(recorder.out, recorder.settings)
    assert resumed.start_round == 1 and [h["round"] for h in resumed.history] == [0, 1]
    assert (recorder.out / "metrics.jsonl").read_text().count("\n") == 2  # round 2's line went with it
    np.testing.assert_array_equal(resumed.resume_state()["w"], first["w"])
    assert resumed.run_token == recorder.run_token  # the sites see the same run: kept updates apply

    resumed.round_done(2, METRICS, {}, None, second)
    assert usable_checkpoint(recorder.out).name == "round-00002"
    assert sorted(p.name for p in (recorder.out / "checkpoint").iterdir()) == ["LATEST", "round-00002"]
    assert (recorder.out / "checkpoint" / "round-00002").stat().st_mode & 0o777 == default_mode(folder=True)


def test_replaced_run_comes_back_unless_the_new_one_started(tmp_path):
    out = tmp_path / "run"
    (out / "ledgers").mkdir(parents=True)
    for name, text in (("metrics.jsonl", "old\n"), ("prior.npy", "old"), ("ledgers/site-0.json", "old")):
        (out / name).write_text(text)
    (out / "notes.txt").write_text("the user's")
    aside = Replaced.move_aside(out)
    assert not (out / "prior.npy").exists() and (out / "notes.txt").exists()
    (out / "metrics.jsonl").write_text("")  # the new run opened, then failed before its first line
    (out / "run.json").write_text("{}")
    aside.restore()
    assert (out / "prior.npy").read_text() == "old" and (out / "ledgers/site-0.json").read_text() == "old"
    assert (out / "metrics.jsonl").read_text() == "old\n" and not (out / "run.json").exists()

    Replaced.move_aside(out)  # killed mid-way: the next use settles it
    (out / "metrics.jsonl").write_text('{"round": 0}\n')  # this time the new run had started
    settle(out)
    assert not (out / "prior.npy").exists() and not list(out.glob(".replaced-*"))
    assert (out / "notes.txt").exists()


def fake_run(out: Path) -> dict[str, bytes]:
    """A finished run's files, with a usable checkpoint; returns their bytes."""
    (out / "checkpoint" / "round-00002").mkdir(parents=True)
    (out / "checkpoint" / "round-00002" / "state.json").write_text('{"round": 2, "sites": {}, "seconds": 1.0}')
    np.savez(out / "checkpoint" / "round-00002" / "arrays.npz", w=np.ones(2))
    (out / "checkpoint" / "LATEST").write_text("round-00002")
    (out / "ledgers").mkdir()
    (out / "ledgers" / "site-0.json").write_text('{"history": []}')
    (out / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')
    (out / "summary.json").write_text('{"final": {"round": 2}}')
    np.save(out / "prior.npy", np.arange(3.0))
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


BAD_DATA = {"dataset": "movielens", "data-path": "/does/not/exist"}


@pytest.mark.parametrize("mode", ["overwrite", "resume"])
def test_a_bad_input_leaves_a_finished_run_intact(tmp_path, mode):
    from simulations.simulate import simulate

    out = tmp_path / "run"
    out.mkdir()
    before = fake_run(out)
    with pytest.raises(ConfigError, match="/does/not/exist"):
        simulate(BAD_DATA, out, **{mode: True})
    assert files_of(out) == before


def test_a_data_error_leaves_no_output_folder(tmp_path):
    from simulations.simulate import simulate

    with pytest.raises(ConfigError, match="/does/not/exist"):
        simulate(BAD_DATA, tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


def test_unusable_out_and_resume_without_checkpoint_are_one_clear_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert_clean_error(fedenc("simulate", "--config", str(TINY), "--out", str(a_file), cache=tmp_path), "is a file")
    assert a_file.read_text() == "not a folder"
    assert_clean_error(fedenc("simulate", "--config", str(TINY), "--out", "/proc/fedenc-out", cache=tmp_path),
                       "cannot write in /proc")
    started = tmp_path / "started"  # a run that crashed before its first checkpoint
    started.mkdir()
    (started / "metrics.jsonl").write_text('{"round": 0}\n')
    proc = fedenc("simulate", "--config", str(TINY), "--resume", "--out", str(started), cache=tmp_path)
    assert_clean_error(proc, "--resume", "no usable checkpoint")
    assert (started / "metrics.jsonl").read_text() == '{"round": 0}\n'


@pytest.mark.parametrize(("config", "needle"), [({"fraction-train": 0.0}, "fraction-train"),
                                                ({"min-sites": 3, "num-sites": 2}, "min-sites")])
def test_settings_that_could_never_train(config, needle):
    with pytest.raises(ConfigError, match=needle):
        Settings.from_config(config)


# -- evaluation: a diverged model is a failure, never a hit -----------------------------------


class FixedScores(torch.nn.Module):
    """Scores every user row from a fixed table (row i of the batch = user i)."""

    def __init__(self, scores):
        super().__init__()
        self.table = torch.tensor(scores, dtype=torch.float32)

    def score_all(self, batch):
        return self.table[batch["text"][:, 0]].clone()


def test_nan_and_inf_scores_never_rank_as_hits():
    """A diverged user ranks last among the items not in their history (14 items, 2 seen)."""
    nan, inf = math.nan, math.inf
    finite = [0.0] * 14
    scores = [[nan] * 14, [0.0, inf] + finite[2:], [0.0, 1.0] + finite[2:], [0.0, 0.3, 0.2, 0.9] + finite[4:]]
    n = len(scores)
    rows = TensorDataset(torch.arange(n)[:, None], torch.ones(n, 1, dtype=torch.long),
                         torch.full((n, 2), -1), torch.tensor([[1], [1], [1], [1]]))
    exclude = [np.array([5, 6, 6, 1], dtype=np.int64)] * n  # the target itself stays rankable
    ranks, loss = rank_of_targets(FixedScores(scores), EvalRows(rows, exclude), "cpu")
    assert ranks.tolist() == [11, 11, 0, 1]
    metrics = ranking_metrics(ranks, ks=(10,), rankable=12)
    assert metrics["hr@10"] == 0.5 and metrics["auc"] == pytest.approx((0 + 0 + 1 + 10 / 11) / 4)
    assert math.isnan(loss)


# -- real logs ----------------------------------------------------------------------------------


def write_logs(folder: Path, rows: list[tuple]) -> Path:
    folder.mkdir(exist_ok=True)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(6)], "title": [f"T{i}" for i in range(6)]}).to_csv(
        folder / "items.csv", index=False)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "site"]).to_csv(folder / "interactions.csv", index=False)
    return folder / "interactions.csv"


def test_a_per_user_column_that_varies_is_resolved_per_user(tmp_path, caplog):
    rows = [("a", f"i{t}", t, s) for t, s in enumerate(["fr", "fr", "de", "fr"])]  # a: mostly fr
    rows += [("b", f"i{t}", t, s) for t, s in enumerate(["de", "fr", "de", "fr"])]  # b: a tie, fr the latest
    rows += [("c", f"i{t}", t, "de") for t in range(4)]
    rows += [("d", f"i{t}", t, "nl") for t in range(4)]
    path = write_logs(tmp_path, rows)
    with caplog.at_level("WARNING"):
        data = load(DataSpec(dataset="csv", data_path=str(path), k_core=3))
    assert dict(zip(data.user_ids, data.user_attributes["site"], strict=True)) == {"a": "fr", "b": "fr", "c": "de", "d": "nl"}
    lines = [r.getMessage() for r in caplog.records if "varies" in r.getMessage()]
    assert len(lines) == 1 and "2 user(s)" in lines[0]
    natural = partition_users(data, 3, "natural", column="site")
    assert sorted(sorted(data.user_ids[u] for u in s) for s in natural) == [["a", "b"], ["c"], ["d"]]
    assert sum(len(s) for s in partition_users(data, 2, "iid")) == 4


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_empty_ids_are_refused(tmp_path, column):
    rows = [("a", f"i{t}", t, "fr") for t in range(4)] + [("b", f"i{t}", t, "fr") for t in range(4)]
    rows[5] = ("" if column == "user_id" else "b", "" if column == "item_id" else "i1", 1, "fr")
    path = write_logs(tmp_path, rows)
    with pytest.raises(DataError, match=f"empty {column} \\(data row 6\\)"):
        load(DataSpec(dataset="csv", data_path=str(path), k_core=3))


def test_catalogue_fingerprint_sees_order_and_text():
    base = Catalogue(("a", "b"), ("A", "B"), ((), ()))
    assert base.fingerprint() == Catalogue(("a", "b"), ("A", "B"), (("x",), ())).fingerprint()  # categories aside
    assert base.fingerprint() != Catalogue(("b", "a"), ("B", "A"), ((), ())).fingerprint()
    assert base.fingerprint() != Catalogue(("a", "b"), ("A", "B!"), ((), ())).fingerprint()
    assert base.fingerprint() != Catalogue(("a", "b", "c"), ("A", "B", "C"), ((), (), ())).fingerprint()
    assert len(base.fingerprint()) == 64

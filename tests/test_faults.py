"""A federation that survives its partner sites.

Unit tests of the server's checks and records (server/checks.py, server/participation.py,
server/strategy.py) on hand-built Flower messages, and
one simulation through the real Flower path in which five of six sites misbehave
(tests/fault_app.py): the run completes with the honest ones, records each fault, and
its metrics are finite.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.transport import from_array_record, to_array_record
from server.checks import check_counts, derived_update_bound
from server.strategy import BudgetAwareFedAvg, RunFailed, ScreenedRounds, SiteRoster

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def flower_identity():
    """Messages can be built outside a Flower process once its task identity is set."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class Nodes:
    """Stands in for Flower's Grid where only the connected node ids matter."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


GLOBAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def reply(msg: Message, state: dict | None = None, site: int | None = None, **metrics) -> Message:
    """A site's train reply to ``msg``: ``state`` (as given, any shape or dtype) and metrics."""
    content = RecordDict({"metrics": MetricRecord({"site": site, "refused": 0, "unit-weight": 1} | metrics)})
    if state is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})
    return Message(content=content, reply_to=msg)


def rounds(nodes: int, min_sites: int = 1, bound: float = 10.0, max_failed: int = 2):
    roster = SiteRoster(nodes, min_sites, wait_seconds=0)
    sites = BudgetAwareFedAvg(fraction_train=1.0, fraction_evaluate=0.0, roster=roster)
    return ScreenedRounds(sites, roster, bound, max_failed), Nodes(range(1, nodes + 1))


def test_bad_updates_are_rejected_failures_recorded_and_weights_ignored(flower_identity):
    screened, grid = rounds(7)
    messages = {m.metadata.dst_node_id: m for m in screened.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid)}
    assert sorted(messages) == list(range(1, 8))
    for m in messages.values():  # what Flower does as it sends them
        m.metadata.__dict__["_message_id"] = m.object_id
    lost = Message(Error(code=5, reason="Node Unavailable"), reply_to=messages[6])
    lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node it lost
    honest = {"w": np.full((4, 3), 0.5, np.float32), "b": np.ones(3, np.float32)}
    replies = [
        reply(messages[1], honest, site=0),
        reply(messages[2], {"w": np.full((4, 3), np.nan, np.float32), "b": honest["b"]}, site=2),
        reply(messages[3], {"w": np.ones(1, np.float32), "b": honest["b"]}, site=3),  # would broadcast
        reply(messages[4], {k: 1e6 * v for k, v in honest.items()}, site=4),
        reply(messages[5], {"w": np.zeros((4, 3), np.float32), "b": -honest["b"]}, site=5, **{"num-examples": 10**9}),
        lost,
    ]  # node 7 never replies
    arrays, _ = screened.aggregate_train(1, replies)
    r = screened.last_round
    assert r.sampled == ["0", "2", "3", "4", "5", "node 6", "node 7"]
    assert r.trained == ["0", "5"] and not r.skipped
    assert set(r.rejected) == {"2", "3", "4"}
    assert "non-finite" in r.rejected["2"] and "shape (1,)" in r.rejected["3"] and "exceeds the bound" in r.rejected["4"]
    assert r.failed == {"node 6": "Node Unavailable", "node 7": "no reply within round-timeout"}
    line = r.line()
    assert (line["sites"], line["refused"], line["failed"], line["rejected"]) == (2, 0, 2, 3)
    assert line["bytes_up"] == 2 * ArrayRecord({k: Array(v) for k, v in honest.items()}).count_bytes()
    assert line["participation"]["rejected"] == r.rejected
    mean = from_array_record(arrays)
    # unweighted: the site claiming 1e9 examples counts as one site, like the other
    np.testing.assert_allclose(mean["w"], 0.25)
    np.testing.assert_allclose(mean["b"], 0.0)


def test_federated_evaluation_records_who_failed_or_refused_without_excluding_them_from_training(flower_identity):
    roster = SiteRoster(4, 1, wait_seconds=0)
    sites = BudgetAwareFedAvg(fraction_train=1.0, fraction_evaluate=1.0, roster=roster)
    screened, grid = ScreenedRounds(sites, roster, 10.0, 2), Nodes(range(1, 5))
    asked = {m.metadata.dst_node_id: m for m in screened.configure_evaluate(1, to_array_record(GLOBAL), ConfigRecord(), grid)}
    assert sorted(asked) == [1, 2, 3, 4]
    for m in asked.values():  # what Flower does as it sends them
        m.metadata.__dict__["_message_id"] = m.object_id
    lost = Message(Error(code=5, reason="Node Unavailable"), reply_to=asked[2])
    lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node it lost, from its own id
    refusal = Message(content=RecordDict({"metrics": MetricRecord({"site": 3, "refused": 1}),
                                          "report": ConfigRecord({"reason": "DP site: no evaluation"})}), reply_to=asked[3])
    evaluated = reply(asked[1], None, site=1, **{"hr@10": 0.5, "ndcg@10": 0.25})
    metrics = screened.aggregate_evaluate(1, [evaluated, lost, refusal])  # node 4 never replies
    record = screened.last_evaluation
    assert record.stage == "evaluate" and record.sampled == ["node 1", "node 2", "node 3", "node 4"]
    assert record.failed == {"node 2": "Node Unavailable", "node 4": "no reply within round-timeout"}
    assert record.refused == {"node 3": "DP site: no evaluation"}
    assert metrics["ndcg@10"] == 0.25  # only the site that evaluated counts
    # refusing (or failing) to evaluate is no reason to stop asking a site to train
    assert sorted(m.metadata.dst_node_id for m in screened.configure_train(2, to_array_record(GLOBAL), ConfigRecord(), grid)) \
        == [1, 2, 3, 4]


def test_wrong_keys_and_dtypes_are_rejected(flower_identity):
    screened, grid = rounds(3)
    messages = list(screened.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid))
    replies = [
        reply(messages[0], {"w": GLOBAL["w"]}, site=0),  # "b" missing
        reply(messages[1], {"w": GLOBAL["w"].astype(np.float64), "b": GLOBAL["b"]}, site=1),
        reply(messages[2], None, site=2),
    ]
    arrays, _ = screened.aggregate_train(1, replies)
    assert arrays is None
    rejected = screened.last_round.rejected
    assert "missing ['b']" in rejected["0"] and "dtype float64" in rejected["1"] and "no 'arrays'" in rejected["2"]


def test_too_few_valid_updates_skip_the_round_then_fail_the_run(flower_identity):
    screened, grid = rounds(2, min_sites=2, max_failed=2)
    for rnd in (1, 2):
        messages = list(screened.configure_train(rnd, to_array_record(GLOBAL), ConfigRecord(), grid))
        replies = [reply(messages[0], GLOBAL, site=0), Message(Error(code=0, reason="down"), reply_to=messages[1])]
        assert screened.aggregate_train(rnd, replies) == (None, None)  # the global model is kept
        assert "fewer than min-sites = 2" in screened.last_round.skipped
        if rnd == 1:
            screened.check_progress(rnd)  # one skipped round is not the end
    with pytest.raises(RunFailed, match=r"2 round\(s\) in a row .*down"):
        screened.check_progress(2)


def test_a_refusing_site_is_not_asked_again(flower_identity):
    screened, grid = rounds(2)
    messages = list(screened.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid))
    refusal = Message(content=RecordDict({"metrics": MetricRecord({"site": 1, "refused": 1}),
                                          "report": ConfigRecord({"reason": "budget spent", "accountant": "rdp"})}),
                      reply_to=messages[1])
    screened.aggregate_train(1, [reply(messages[0], GLOBAL, site=0), refusal])
    assert screened.last_round.refused == {"1": "budget spent"}
    assert [m.metadata.dst_node_id for m in screened.configure_train(2, to_array_record(GLOBAL), ConfigRecord(), grid)] == [1]


def test_messages_carry_the_run_identity(flower_identity):
    roster = SiteRoster(2, 1, 0)
    sites = BudgetAwareFedAvg(fraction_train=1.0, roster=roster, start_round=3)
    config = ConfigRecord({"run-token": "abc", "catalogue": "f00", "num-rounds": 5})
    (msg, _) = sites.configure_train(2, to_array_record(GLOBAL), config, Nodes([1, 2]))
    assert msg.content["config"]["run-round"] == 5 and msg.content["config"]["server-round"] == 2
    assert msg.content["config"]["run-token"] == "abc" and msg.content["config"]["catalogue"] == "f00"


def test_waiting_for_sites_ends_with_one_clear_error():
    roster = SiteRoster(3, 2, wait_seconds=1.5)
    roster.labels = {7: "2", 8: "1"}  # node 8 has been heard from, then went away
    start = time.monotonic()
    with pytest.raises(RunFailed, match=r"1 site\(s\) connected, 1 more needed for min-sites = 2 \(not connected: 1\)"):
        roster.connected(Nodes([7]))
    assert 1.4 < time.monotonic() - start < 10
    start = time.monotonic()
    assert roster.connected(Nodes([7, 9])) == [7, 9]  # later requests wait for min-sites only
    assert time.monotonic() - start < 1

    fresh = SiteRoster(3, 2, wait_seconds=1.5)
    start = time.monotonic()
    assert fresh.connected(Nodes([7, 9])) == [7, 9]  # the first waits for all 3, then goes on with 2
    assert time.monotonic() - start > 1.4


def test_counts_must_match_the_catalogue_and_be_finite(flower_identity):
    msg = Message(content=RecordDict(), message_type="query.counts", dst_node_id=1)

    def counts(values):
        return Message(content=RecordDict({"counts": ArrayRecord({"counts": Array(np.asarray(values, np.float32))})}),
                       reply_to=msg)

    assert check_counts(counts([1, 2, 3]), 3)[0].tolist() == [1, 2, 3]
    assert "expected (3,)" in check_counts(counts([1, 2]), 3)[1]
    assert "non-finite" in check_counts(counts([1, np.inf, 3]), 3)[1]


def test_derived_bound_holds_for_an_honest_dp_update(tiny_bert, movietweetings):
    """The default bound on an update (Adam's per-step bound × steps × √params) is never
    crossed by a real DP round, even with a large learning rate and heavy noise."""
    from common.adapter import trainable_state
    from common.examples import training_rows
    from common.model import ModelSettings, Recommender
    from common.privacy import PrivacySettings
    from common.training import TrainSettings, train_local, with_lower_states

    data, split = movietweetings
    model = Recommender.build(ModelSettings(model=tiny_bert, max_tokens=16, item_tokens=16, max_history=8),
                              list(data.catalogue.texts))
    rows = with_lower_states(model, training_rows(data.catalogue, split, range(64), model.tokenizer, 16, 8, 4))
    before = trainable_state(model)
    train = TrainSettings(local_steps=6, learning_rate=0.5)
    after, _ = train_local(model, before, rows, train, PrivacySettings(epsilon=0.5, delta=1e-3, expected_batch=16))
    norm = math.sqrt(sum(float(np.sum((after[k] - before[k]) ** 2)) for k in before))
    bound = derived_update_bound(0.5, 6, sum(v.size for v in before.values()))
    assert 0 < norm <= bound, (norm, bound)
    assert norm > 0.02 * bound, (norm, bound)  # a bound far above what honest sites reach would catch little


# -- through Flower: five of six sites misbehave ------------------------------------------------


def fault_app(folder: Path) -> Path:
    """A Flower app folder: fedenc's settings and ServerApp, tests/fault_app.py's ClientApp."""
    folder.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    assert 'clientapp = "client.app:app"' in text
    (folder / "pyproject.toml").write_text(text.replace('clientapp = "client.app:app"', 'clientapp = "fault_app:app"'))
    shutil.copy(Path(__file__).with_name("fault_app.py"), folder / "fault_app.py")
    return folder


@pytest.fixture(scope="module")
def faulty_run(tiny_bert, tmp_path_factory):
    """Six sites, two rounds; sites 1-5 misbehave as tests/fault_app.py says. The folder held
    an older run (with its prior and token) that --overwrite replaces."""
    from simulations.simulate import simulate

    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "run"
    (out / "ledgers").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"round": 0}\n')
    (out / "run.json").write_text('{"run-token": "old"}')
    np.save(out / "prior.npy", np.zeros(3))
    (out / "ledgers" / "site-9.json").write_text("{}")
    config = {
        "dataset": "movietweetings", "model": tiny_bert, "num-sites": 6, "num-server-rounds": 2,
        "local-steps": 2, "expected-batch": 16, "max-tokens": 16, "max-history": 8, "eval-users": 100,
        "fraction-evaluate": 0.0, "popularity-prior": 0.1,
    }
    summary = simulate(config, out, overwrite=True, app=fault_app(tmp / "app"), timeout=900)
    return out, summary


def test_the_run_completes_with_the_honest_sites(faulty_run):
    out, summary = faulty_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    first, second = rows[1]["participation"], rows[2]["participation"]
    assert sorted(first["trained"]) == ["0", "1", "5"] and sorted(second["trained"]) == ["0", "5"]
    for part in (first, second):
        assert sorted(part["rejected"]) == ["2", "3", "4"]
        assert "non-finite" in part["rejected"]["2"]
        assert "shape (1,)" in part["rejected"]["3"]
        assert "exceeds the bound" in part["rejected"]["4"]
    assert first["failed"] == {} and list(second["failed"]) == ["1"]
    assert "went down in round 2" in second["failed"]["1"]
    assert (rows[1]["sites"], rows[1]["failed"], rows[1]["rejected"]) == (3, 0, 3)
    assert (rows[2]["sites"], rows[2]["failed"], rows[2]["rejected"]) == (2, 1, 3)
    for row in rows:
        for key in ("ndcg@10", "hr@10", "valid/ndcg@10", "epsilon"):
            assert row[key] is not None and math.isfinite(row[key]), (row["round"], key)
        assert row["ndcg@10"] < 1.0  # a diverged model scores every user as a hit
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["rounds"][2]["failed"] == second["failed"]


def test_overwrite_removed_every_file_of_the_old_run(faulty_run):
    out, _ = faulty_run
    assert json.loads((out / "run.json").read_text())["run-token"] != "old"
    assert not (out / "ledgers" / "site-9.json").exists()
    assert np.load(out / "prior.npy").shape != (3,)  # the new run's own prior
    assert not list(out.glob(".replaced-*"))


def test_a_run_in_which_no_site_trained_fails_with_one_reason(tiny_bert, tmp_path, monkeypatch):
    """Every site's update is NaN: each round is skipped (the model kept), and at the end the
    run fails, saying why in one line, instead of reporting an untrained model as done."""
    from simulations.simulate import SimulationFailed, simulate

    monkeypatch.setenv("FEDENC_TEST_FAULT", "sends NaN")
    config = {
        "dataset": "movietweetings", "model": tiny_bert, "num-sites": 2, "num-server-rounds": 2,
        "local-steps": 1, "expected-batch": 16, "max-tokens": 16, "max-history": 8, "eval-users": 50,
        "fraction-evaluate": 0.0, "popularity-prior": 0.0,
    }
    out = tmp_path / "run"
    with pytest.raises(SimulationFailed) as failed:
        simulate(config, out, app=fault_app(tmp_path / "app"), timeout=900)
    message = str(failed.value)
    assert "no site trained in any round" in message and "non-finite" in message and "\n" not in message
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["sites"], r["rejected"]) for r in rows] == [(0, 0, 0), (1, 0, 2), (2, 0, 2)]
    assert not (out / "summary.json").exists()


def test_a_resumed_round_asks_the_same_sites(flower_identity):
    """Round 4 of a run samples the same sites whether the process started at round 0 or
    resumed at round 3: those are the sites that kept round 4's update."""
    def sampled(start_round: int, server_round: int) -> list[int]:
        sites = BudgetAwareFedAvg(fraction_train=0.4, roster=SiteRoster(10, 1, 0), seed=7, start_round=start_round)
        for rnd in range(1, server_round + 1):
            messages = sites.configure_train(rnd, to_array_record(GLOBAL), ConfigRecord(), Nodes(range(10)))
        return [m.metadata.dst_node_id for m in messages]

    assert sampled(0, 4) == sampled(3, 1)
    assert len({tuple(sampled(0, r)) for r in range(1, 6)}) > 1  # and rounds still differ


def test_a_refused_replacement_says_why_and_gives_the_old_run_back(tiny_bert, tmp_path):
    """`flwr run` refuses a run config its app does not declare: the new run never starts, so
    --overwrite puts the old run back, and the message carries Flower's reason (it was read
    from the new run's log after that log had been removed with the new run's files)."""
    from simulations.simulate import SimulationFailed, simulate

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 0}\n')
    app = tmp_path / "app"
    app.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    assert "\nseed = " in text
    (app / "pyproject.toml").write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("seed = ")))
    with pytest.raises(SimulationFailed, match="Invalid run configuration"):
        simulate({"model": tiny_bert, "num-sites": 2, "num-server-rounds": 1}, out, overwrite=True, app=app, timeout=300)
    assert (out / "metrics.jsonl").read_text() == '{"round": 0}\n'

"""Site-owned privacy, attacked from the server's side: whatever the run config and the
messages say, and however the site's data changes, the site grants no more than its own
policy, pays every release into one ledger, and lets no exact statistic leave under DP.

The ClientApp's handlers are called as Flower calls them (a Message and a Context), with
a deployment node config and a tiny random encoder.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from client.node import NodeConfig, NodeConfigError
from common.ledger import PrivacyLedger
from common.privacy import PolicyRefused, PrivacySettings, SitePolicy, epsilon_spent, site_delta

RUN = {"max-tokens": 16, "max-history": 8, "expected-batch": 16, "local-steps": 2, "num-server-rounds": 2,
       "popularity-prior": 0.5, "epsilon": 8.0}


@pytest.fixture
def flower_task(monkeypatch):
    """A Message needs a run, as inside Flower."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def site_files(synthetic_dir, tmp_path) -> dict:
    """One deployed site: its own copy of the data, its ledger and state folder."""
    data = tmp_path / "site" / "interactions.csv"
    data.parent.mkdir()
    shutil.copy(synthetic_dir / "interactions.csv", data)
    shutil.copy(synthetic_dir / "items.csv", data.parent / "items.csv")
    return {"data-path": str(data), "site-id": 3, "epsilon-budget": 8.0,
            "ledger-path": str(tmp_path / "ledger" / "site-3.json"), "state-dir": str(tmp_path / "state")}


def _call(handler, node: dict, run: dict, content: dict, kind: str):
    from flwr.app import Context, Message, RecordDict

    msg = Message(content=RecordDict(content), dst_node_id=1, message_type=kind)
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run)
    return handler(msg, context)


def _counts(node, run, **config):
    from flwr.app import ConfigRecord

    from client.app import counts

    return _call(counts, node, run, {"config": ConfigRecord({"task": "popularity-prior"} | config)}, "query.counts")


def _global_state(node, run):
    from client.app import _open
    from common.adapter import trainable_state

    class _Ctx:
        node_config, run_config = node, run

    site, _, _ = _open(_Ctx)
    return {k: v.copy() for k, v in trainable_state(site.model).items()}


def _train(node, run, state, **config):
    from flwr.app import ConfigRecord

    from client.app import train
    from common.transport import to_array_record

    content = {"arrays": to_array_record(state), "config": ConfigRecord({"num-rounds": 2, "server-round": 1} | config)}
    return _call(train, node, run, content, "train")


def _ledger(node) -> PrivacyLedger:
    return PrivacyLedger.open(node["ledger-path"], "site-3", 8.0, 1.0)


@pytest.fixture
def run(tiny_bert) -> dict:
    return RUN | {"model": tiny_bert}


# --- the site's policy comes from the site --------------------------------------------------


def test_a_run_asking_for_no_dp_gets_nothing_exact_from_a_dp_site(flower_task, site_files, run):
    reply = _counts(site_files, run | {"epsilon": math.inf})
    assert reply.content["metrics"]["refused"] == 1
    assert "allow-non-private" in reply.content["report"]["reason"]
    assert not reply.content["counts"]["counts"].numpy().any()  # zeros, not the exact counts
    state = _global_state(site_files, run | {"epsilon": math.inf})
    reply = _train(site_files, run | {"epsilon": math.inf}, state)
    assert reply.content["metrics"]["refused"] == 1
    assert "train_loss" not in reply.content["metrics"]
    assert not Path(site_files["ledger-path"]).exists()  # nothing released, nothing to record

    allowed = site_files | {"allow-non-private": True}  # the site's own word
    reply = _counts(allowed, run | {"epsilon": math.inf})
    assert reply.content["metrics"]["refused"] == 0 and reply.content["counts"]["counts"].numpy().sum() > 0


def test_the_run_cannot_loosen_the_sites_delta_or_budget(flower_task, site_files, run):
    reply = _counts(site_files, run | {"delta": 0.5, "epsilon": 100.0})
    metrics = reply.content["metrics"]
    assert metrics["delta"] == site_delta(300) == 1e-4  # not the run's 0.5
    assert metrics["budget"] == 8.0  # not the run's 100
    ledger = _ledger(site_files)
    assert ledger.delta == 1e-4 and ledger.budget == 8.0
    # Half of the site's budget on the counts, at the site's δ: ε = 4, not 50.
    assert ledger.epsilon() == pytest.approx(4.0, abs=0.02)
    assert metrics["epsilon"] == pytest.approx(ledger.epsilon())


def test_new_data_a_moved_file_or_other_filters_continue_the_same_budget(flower_task, site_files, run, tmp_path):
    first = _counts(site_files, run).content["metrics"]["epsilon"]
    moved = tmp_path / "moved" / "interactions.csv"  # the site's data, moved and one interaction newer
    moved.parent.mkdir()
    shutil.copy(Path(site_files["data-path"]).parent / "items.csv", moved.parent / "items.csv")
    moved.write_text(Path(site_files["data-path"]).read_text() + "user0,m059,999999,s0\n")
    node = site_files | {"data-path": str(moved)}
    second = _counts(node, run | {"k-core": 6}).content["metrics"]
    assert second["refused"] == 0
    assert second["epsilon"] > first > 0  # continued, never back to 0
    ledger = _ledger(site_files)
    assert [r["kind"] for r in ledger.releases] == ["counts", "counts"]
    assert ledger.epsilon() == pytest.approx(epsilon_spent(ledger.history, ledger.delta))


def test_a_deleted_ledger_fails_closed(flower_task, site_files, run):
    assert _counts(site_files, run).content["metrics"]["refused"] == 0
    Path(site_files["ledger-path"]).unlink()
    reply = _counts(site_files, run)
    assert reply.content["metrics"]["refused"] == 1
    assert "does not exist" in reply.content["report"]["reason"]
    assert not reply.content["counts"]["counts"].numpy().any()
    assert not Path(site_files["ledger-path"]).exists()  # not silently restarted


def test_two_processes_training_on_one_ledger_both_pay(site_files, run, tmp_path):
    """Each process opens the site, trains a round and records it; the lock makes the second
    wait for the first, so the ledger holds both rounds (without it, the last writer wins)."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from flwr.supercore.task_identity import TaskIdentity
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_site_privacy import _global_state, _train
        node, run = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        reply = _train(node, run, _global_state(node, run), **{{"run-token": sys.argv[3], "run-round": 1}})
        print(reply.content["metrics"]["refused"])
        """
    )
    args = [json.dumps(site_files), json.dumps(run | {"popularity-prior": 0.0})]
    procs = [subprocess.Popen([sys.executable, "-c", script, *args, f"run-{i}"], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1]) for i in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [o[-1] for o in outs] == ["0", "0"]
    ledger = _ledger(site_files)
    assert [r["kind"] for r in ledger.releases] == ["dp-sgd", "dp-sgd"] and ledger.rounds == 2
    assert {r["run"] for r in ledger.releases} == {"run-0", "run-1"}


# --- nothing exact leaves under DP ------------------------------------------------------------


def test_a_crafted_evaluation_request_gets_no_statistic(flower_task, site_files, run):
    from flwr.app import ArrayRecord, ConfigRecord

    from client.app import evaluate
    from common.transport import to_array_record

    state = _global_state(site_files, run)
    crafted = {k: v.copy() for k, v in state.items()}
    crafted["scorer.bias"] = np.where(np.arange(len(state["scorer.bias"])) == 7, 100.0, -100.0).astype(np.float32)
    content = {"arrays": to_array_record(crafted), "config": ConfigRecord({})}
    reply = _call(evaluate, site_files, run, content, "evaluate")
    metrics = dict(reply.content["metrics"])
    assert metrics["refused"] == 1
    assert not {"hr@10", "ndcg@10", "mrr@10", "loss", "num-examples"} & set(metrics)
    assert not reply.content.array_records or not isinstance(reply.content.array_records.get("arrays"), ArrayRecord)


def test_a_dp_train_reply_carries_no_exact_count_loss_or_ledger(flower_task, site_files, run):
    reply = _train(site_files, run, _global_state(site_files, run), **{"run-token": "t", "run-round": 1})
    metrics = dict(reply.content["metrics"])
    assert metrics["refused"] == 0 and metrics["steps"] == 2
    assert not {"train_loss", "num-examples", "seconds"} & set(metrics)
    assert set(reply.content.config_records) == {"report"}  # no ledger JSON
    assert 0 < metrics["epsilon"] <= 8.0 and metrics["delta"] == 1e-4


# --- a round is paid once; the catalogue must agree ---------------------------------------------


def test_a_round_asked_again_is_sent_again_not_paid_again(flower_task, site_files, run):
    from common.transport import from_array_record

    state = _global_state(site_files, run)
    first = _train(site_files, run, state, **{"run-token": "abc", "run-round": 1})
    spent = _ledger(site_files).epsilon()
    again = _train(site_files, run, state, **{"run-token": "abc", "run-round": 1})  # after a crash or --resume
    a, b = from_array_record(first.content["arrays"]), from_array_record(again.content["arrays"])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _ledger(site_files).epsilon() == spent and len(_ledger(site_files).releases) == 1
    _train(site_files, run, state, **{"run-token": "abc", "run-round": 2})  # the next round pays
    assert _ledger(site_files).epsilon() > spent


def test_a_site_with_another_catalogue_refuses_before_anything_is_spent(flower_task, site_files, run):
    reply = _counts(site_files, run, catalogue="0" * 64)
    assert reply.content["metrics"]["refused"] == 1
    assert "catalogue" in reply.content["report"]["reason"]
    assert not Path(site_files["ledger-path"]).exists()


# --- node config and policy -------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        ({"epsilon-budget": None}, "epsilon-budget is required"),
        ({"ledger-path": None}, "ledger-path is required"),
        ({"site-id": None}, "site-id is required"),
        ({"ledger_path": "x.json"}, "unknown key 'ledger_path'"),
        ({"epsilon-budget": "lots"}, "epsilon-budget: expected float"),
        ({"epsilon-budget": math.inf}, "a finite ε > 0"),
        ({"site-id": 1.5}, "site-id: expected int"),
        ({"allow-non-private": "maybe"}, "allow-non-private: expected bool"),
        ({"delta": 2.0}, "delta must be in"),
    ],
)
def test_node_config_is_validated_naming_the_key(change, message):
    node = {"data-path": "a.csv", "site-id": 1, "epsilon-budget": 8.0, "ledger-path": "l.json"} | change
    with pytest.raises(NodeConfigError, match=message):
        NodeConfig.parse({k: v for k, v in node.items() if v is not None})


@settings(max_examples=60, deadline=None)
@given(
    budget=st.floats(0.1, 50), cap=st.one_of(st.none(), st.floats(1e-9, 0.5)),
    asked_eps=st.one_of(st.just(math.inf), st.floats(0.1, 100)), asked_delta=st.one_of(st.none(), st.floats(1e-9, 0.99)),
    users=st.integers(1, 10**6), allow=st.booleans(),
)
def test_a_grant_is_never_looser_than_the_policy(budget, cap, asked_eps, asked_delta, users, allow):
    policy = SitePolicy(budget, cap, allow)
    request = PrivacySettings(epsilon=asked_eps, delta=asked_delta)
    try:
        granted = policy.grant(request, users)
    except PolicyRefused:
        assert not request.private and not allow
        return
    if not request.private:
        assert allow
        return
    assert granted.epsilon == min(asked_eps, budget)
    assert granted.delta <= site_delta(users) <= 1 / (10 * users)
    assert granted.delta <= (cap if cap is not None else 1) and granted.delta <= (asked_delta or 1)


# --- fedenc ledger --------------------------------------------------------------------------------


def _fedenc(*args):
    return subprocess.run([sys.executable, "-m", "cli", "ledger", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[1])


def test_ledger_show_and_raise_budget(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, "site-7", budget=8.0, delta=1e-5)
    ledger.record([(1.0, 0.1, 50)])
    ledger.charge("counts", [(3.0, 1.0, 1)])
    shown = json.loads(_fedenc("show", path, "--json").stdout)
    assert shown["epsilon"] == pytest.approx(ledger.epsilon()) and shown["delta"] == 1e-5 and shown["budget"] == 8.0
    assert set(shown["epsilon_by_kind"]) == {"dp-sgd", "counts"} and shown["releases"] == 2 and shown["rounds"] == 1
    assert "site-7" in _fedenc("show", path).stdout

    done = _fedenc("raise-budget", path, "--to", 12, "--reason", "ethics board 2026-12")
    assert done.returncode == 0 and "8 -> 12" in done.stdout
    assert PrivacyLedger.read(path).budget == 12.0
    assert PrivacyLedger.read(path).events[-1]["reason"] == "ethics board 2026-12"

    lower = _fedenc("raise-budget", path, "--to", 4, "--reason", "oops")
    assert lower.returncode == 2 and lower.stderr.startswith("error:") and "above the current one" in lower.stderr
    missing = _fedenc("show", tmp_path / "nowhere.json")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: privacy ledger {tmp_path / 'nowhere.json'} does not exist"


# --- the site's row cache (deployment: one process per message) -------------------------------------


def test_a_deployed_site_derives_its_rows_once_across_messages(flower_task, site_files, run, monkeypatch):
    import common.site

    computed = []
    real = common.site.with_lower_states
    monkeypatch.setattr(common.site, "with_lower_states", lambda model, rows: computed.append(len(rows)) or real(model, rows))

    def fresh_process():  # what Flower does for every message in deployment
        monkeypatch.setattr(common.site, "PROCESS_SITES", common.site.SiteHost())

    state = _global_state(site_files, run)
    first = _train(site_files, run, state, **{"run-token": "c", "run-round": 1})
    assert computed == [300]
    fresh_process()
    _train(site_files, run, state, **{"run-token": "c", "run-round": 2})
    assert computed == [300]  # read from state-dir/cache, not recomputed
    cached = list((Path(site_files["state-dir"]) / "cache").glob("*.pt"))
    assert len(cached) == 1
    fresh_process()
    _train(site_files, run | {"max-tokens": 12}, _global_state(site_files, run | {"max-tokens": 12}),
           **{"run-token": "d", "run-round": 1})
    assert computed == [300, 300]  # other settings, other rows
    fresh_process()
    _train(site_files | {"cache-mb": 0}, run, state, **{"run-token": "c", "run-round": 3})
    assert computed == [300, 300, 300]  # cache off
    assert first.content["metrics"]["refused"] == 0


def test_the_site_cache_stays_within_its_bound(tmp_path):
    import torch

    from common.site_cache import SiteCache

    cache = SiteCache(tmp_path, max_bytes=3 * 4_000)
    for i in range(5):
        cache.get_or_compute({"i": i}, lambda: {"x": torch.zeros(1_000)})  # ~4 kB each
    files = sorted(tmp_path.glob("*.pt"), key=lambda p: p.stat().st_mtime)
    assert sum(p.stat().st_size for p in files) <= 3 * 4_000 and len(files) >= 1
    assert cache.get_or_compute({"i": 4}, lambda: 1 / 0)["x"].shape == (1_000,)  # the newest is kept


def test_a_site_with_a_reordered_items_csv_refuses_the_servers_catalogue(flower_task, site_files, run):
    """The server sends the fingerprint of its catalogue; a site whose items.csv lists the same
    items in another order would put every item bias and count on the wrong item."""
    import pandas as pd

    from common.data import DataSpec, load

    items = Path(site_files["data-path"]).parent / "items.csv"
    server = load(DataSpec(dataset="csv", data_path=site_files["data-path"], items_path=str(items))).catalogue.fingerprint()
    reordered = items.with_name("items-reordered.csv")
    pd.read_csv(items).iloc[::-1].to_csv(reordered, index=False)
    node = site_files | {"items-path": str(reordered)}
    reply = _train(node, run, _global_state(node, run), **{"catalogue": server, "run-token": "r", "run-round": 1})
    reason = reply.content["report"]["reason"]
    assert reply.content["metrics"]["refused"] == 1 and "catalogue (60 items" in reason and "order" in reason
    assert not Path(site_files["ledger-path"]).exists()  # refused before any release
    same = _train(site_files, run, _global_state(site_files, run), **{"catalogue": server, "run-token": "r", "run-round": 1})
    assert same.content["metrics"]["refused"] == 0

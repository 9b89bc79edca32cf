"""The resident site worker (client/worker.py): the ClientApp is called as Flower calls it
(``app(message, context)``), forwards to a worker serving on a thread over the site's
state-dir, and must get what it would have got in-process, paid once, on a channel only
the site can open."""

from __future__ import annotations

import json
import math
import shutil
import socket
import stat
import threading
from multiprocessing.connection import AuthenticationError, Client
from pathlib import Path

import numpy as np
import pytest
from test_site_privacy import RUN, _global_state, flower_task, site_files  # noqa: F401  (fixtures here too)

from client.worker import Channel, Worker, WorkerDied


@pytest.fixture
def run(tiny_bert) -> dict:
    return RUN | {"model": tiny_bert}


@pytest.fixture
def worker(site_files):  # noqa: F811
    """A worker for ``site_files`` serving on a thread until the test ends."""
    serving = Worker(site_files).open()
    stop = threading.Event()
    thread = threading.Thread(target=serving.serve_forever, args=(stop,), daemon=True)
    thread.start()
    yield serving
    stop.set()
    thread.join(60)
    serving.close()


def _call(node: dict, run: dict, content: dict, kind: str):
    """As Flower's ``flwr-clientapp`` does: the whole app, mods included."""
    from flwr.app import Context, Message, RecordDict

    from client.app import app

    msg = Message(content=RecordDict(content), dst_node_id=1, message_type=kind)
    return app(msg, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run))


def _train(node, run, state, **config):
    from flwr.app import ConfigRecord

    from common.transport import to_array_record

    content = {"arrays": to_array_record(state), "config": ConfigRecord({"num-rounds": 2, "server-round": 1} | config)}
    return _call(node, run, content, "train")


def _counts(node, run):
    from flwr.app import ConfigRecord

    return _call(node, run, {"config": ConfigRecord({"task": "popularity-prior"})}, "query.counts")


def _dp_releases(node: dict) -> list[dict]:
    return [r for r in json.loads(Path(node["ledger-path"]).read_text())["releases"] if r["kind"] == "dp-sgd"]


def _twin(site_files: dict, tmp_path: Path) -> dict:  # noqa: F811
    """The same site's data with a ledger and state of its own: the in-process reference."""
    data = tmp_path / "twin" / "interactions.csv"
    data.parent.mkdir(parents=True)
    shutil.copy(site_files["data-path"], data)
    shutil.copy(Path(site_files["data-path"]).parent / "items.csv", data.parent / "items.csv")
    return site_files | {"data-path": str(data), "ledger-path": str(tmp_path / "twin" / "ledger.json"),
                         "state-dir": str(tmp_path / "twin" / "state")}


def test_the_worker_answers_what_the_site_answers_in_process(flower_task, site_files, run, worker, tmp_path):  # noqa: F811
    exact = run | {"epsilon": math.inf}
    allowed, twin = site_files | {"allow-non-private": True}, _twin(site_files, tmp_path) | {"allow-non-private": True}
    worker.node_config = allowed  # the site allows non-private runs: exact counts are comparable bit for bit
    forwarded, local = _counts(allowed, exact), _counts(twin, exact)
    assert worker.served == 1
    np.testing.assert_array_equal(forwarded.content["counts"]["counts"].numpy(), local.content["counts"]["counts"].numpy())
    assert forwarded.content["counts"]["counts"].numpy().sum() > 0

    worker.node_config = site_files  # a DP site: the same ε spent, the same facts released, the same keys
    state = _global_state(site_files, run)
    forwarded, local = _train(site_files, run, state, **{"run-token": "t"}), _train(_twin(site_files, tmp_path / "b"), run, state)
    assert worker.served == 2
    assert dict(forwarded.content["metrics"]) == pytest.approx(dict(local.content["metrics"]))
    assert forwarded.content["metrics"]["refused"] == 0 and "train_loss" not in forwarded.content["metrics"]
    mine, theirs = forwarded.content["arrays"], local.content["arrays"]
    assert list(mine) == list(theirs) and [a.shape for a in mine.values()] == [a.shape for a in theirs.values()]
    same = ("run_id", "src_node_id", "dst_node_id", "reply_to_message_id", "group_id", "message_type")
    assert [getattr(forwarded.metadata, f) for f in same] == [getattr(local.metadata, f) for f in same]


def test_a_refused_request_stays_refused_through_the_worker(flower_task, site_files, run, worker):  # noqa: F811
    state = _global_state(site_files, run)
    reply = _train(site_files, run | {"epsilon": math.inf}, state)  # no DP asked of a DP site
    assert worker.served == 1 and reply.content["metrics"]["refused"] == 1
    assert "allow-non-private" in reply.content["report"]["reason"] and "train_loss" not in reply.content["metrics"]
    reply = _train(site_files, run, state, catalogue="0" * 64)  # another catalogue
    assert worker.served == 2 and reply.content["metrics"]["refused"] == 1
    assert "catalogue" in reply.content["report"]["reason"]
    assert not Path(site_files["ledger-path"]).exists()  # nothing released, nothing recorded


def test_the_ledger_records_one_release_per_round_through_the_worker(flower_task, site_files, run, worker):  # noqa: F811
    state = _global_state(site_files, run)
    first = _train(site_files, run, state, **{"run-token": "r1", "run-round": 1})
    again = _train(site_files, run, state, **{"run-token": "r1", "run-round": 1})  # a retry: the kept update
    assert worker.served == 2 and len(_dp_releases(site_files)) == 1
    assert again.content["metrics"]["epsilon"] == first.content["metrics"]["epsilon"] > 0
    for key, array in first.content["arrays"].items():
        np.testing.assert_array_equal(array.numpy(), again.content["arrays"][key].numpy())


def test_only_the_site_can_open_the_channel(flower_task, site_files, run, worker):  # noqa: F811
    channel = worker.channel
    assert stat.S_IMODE(channel.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(channel.socket.stat().st_mode) == 0o600 and stat.S_ISSOCK(channel.socket.stat().st_mode)
    assert stat.S_IMODE(channel.authkey.stat().st_mode) == 0o600 and len(channel.authkey.read_bytes()) == 32
    with pytest.raises(AuthenticationError):
        Client(str(channel.socket), family="AF_UNIX", authkey=b"not the site's key")
    reply = _counts(site_files, run)  # the worker still serves the site after refusing the stranger
    assert worker.served == 1 and reply.content["metrics"]["refused"] == 0


def test_without_a_worker_the_clientapp_works_in_process(flower_task, site_files, run):  # noqa: F811
    channel = Channel.of(Path(site_files["state-dir"]))
    channel.folder.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as dead:  # what a worker killed by SIGKILL leaves: a socket nobody serves
        dead.bind(str(channel.socket))
    channel.authkey.write_bytes(b"k" * 32)
    reply = _counts(site_files, run)
    assert reply.content["metrics"]["refused"] == 0 and reply.content["metrics"]["epsilon"] > 0
    assert len(json.loads(Path(site_files["ledger-path"]).read_text())["releases"]) == 1
    restarted = Worker(site_files).open()  # a new start replaces what the dead one left
    assert channel.authkey.read_bytes() != b"k" * 32
    restarted.close()
    assert not channel.socket.exists() and not channel.authkey.exists()


def test_a_worker_that_dies_mid_message_fails_it_and_is_not_retried_in_process(flower_task, site_files, run):  # noqa: F811
    dying = Worker(site_files).open()
    received = []
    dying._answer = lambda conn: received.append([conn.recv_bytes() for _ in range(3)])  # and closes: no reply
    stop = threading.Event()
    thread = threading.Thread(target=dying.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        with pytest.raises(WorkerDied, match="not run again in-process"):
            _counts(site_files, run)
        assert len(received) == 1 and not Path(site_files["ledger-path"]).exists()  # the ClientApp did not pay itself
    finally:
        stop.set()
        thread.join(30)
        dying.close()


def test_a_worker_started_for_other_settings_refuses(flower_task, site_files, run, worker):  # noqa: F811
    worker.node_config = site_files | {"epsilon-budget": 100.0}
    with pytest.raises(RuntimeError, match="another node config"):
        _counts(site_files, run)
    assert worker.served == 0 and not Path(site_files["ledger-path"]).exists()


def test_the_channel_lives_in_the_state_dir():
    assert Channel.of(Path("/srv/s")).authkey == Path("/srv/s/worker/authkey")


def test_deploy_supernode_starts_the_worker_unless_told_not_to(tmp_path, synthetic_dir):
    import subprocess
    import sys

    import deploy.certs

    certs = deploy.certs.make_certs(tmp_path / "certs")
    private, _ = deploy.certs.make_site_keys("site-a", tmp_path)
    args = [sys.executable, "-m", "cli", "deploy", "supernode", "--superlink", "127.0.0.1:1", "--ca", str(certs["ca"]),
            "--key", str(private), "--data-path", str(synthetic_dir / "interactions.csv"), "--site-id", "0",
            "--ledger-path", str(tmp_path / "l.json"), "--epsilon-budget", "8", "--print"]
    shown = [subprocess.run(args + extra, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
             for extra in ([], ["--no-worker"])]
    assert all(done.returncode == 0 for done in shown), [done.stderr for done in shown]
    with_worker, without = (done.stdout.splitlines() for done in shown)
    assert len(with_worker) == 2 and "-m client.worker --node-config" in with_worker[0]
    assert with_worker[1].startswith("flower-supernode") and without == with_worker[1:]


def test_the_site_runs_its_worker_beside_the_supernode_and_stops_both(site_files):  # noqa: F811
    """A stand-in SuperNode waits for the worker's socket, then exits 3: the worker is stopped
    with it and leaves no socket and no key behind."""
    import sys

    from deploy.sites import node_config, run_site, worker_command

    config = node_config(site_files["data-path"], 3, site_files["ledger-path"], 8.0, state_dir=site_files["state-dir"])
    channel = Channel.of(Path(site_files["state-dir"]))
    stand_in = [sys.executable, "-c", "import pathlib, sys, time\n"
                f"for _ in range(600):\n    if pathlib.Path({str(channel.socket)!r}).exists(): sys.exit(3)\n"
                "    time.sleep(0.2)\nsys.exit(1)"]
    said = []
    assert run_site(stand_in, worker_command(config), None, said.append) == 3, said
    assert not channel.socket.exists() and not channel.authkey.exists()


def test_a_worker_process_serves_the_clientapp(flower_task, site_files, run):  # noqa: F811
    """``python -m client.worker`` as deployed: its handler must not forward to itself."""
    import subprocess
    import time

    from deploy.sites import node_config, worker_command

    config = node_config(site_files["data-path"], 3, site_files["ledger-path"], 8.0, state_dir=site_files["state-dir"])
    channel = Channel.of(Path(site_files["state-dir"]))
    proc = subprocess.Popen(worker_command(config), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not channel.socket.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        reply = _counts(site_files, run)  # the node config the SuperNode parses from the same string
        assert reply.content["metrics"]["refused"] == 0
        assert len(json.loads(Path(site_files["ledger-path"]).read_text())["releases"]) == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "query.counts answered" in err and proc.returncode == 143
    assert not channel.socket.exists() and not channel.authkey.exists()

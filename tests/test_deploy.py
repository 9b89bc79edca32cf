"""Deployment: certificates and keys, central DP, bad input, and (marked ``deploy``) a real
SuperLink with TLS and SuperNode authentication serving 3 SuperNodes on 127.0.0.1.

The fast tests run by default; the end-to-end ones start Flower processes and take
minutes: ``python -m pytest -m deploy tests/test_deploy.py -q``. Every process they start
is stopped by PID (its whole tree) in fixture finalizers, whatever happens.
"""

from __future__ import annotations

import json
import math
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tomli_w

import deploy.certs
import deploy.sites
import deploy.superlink
from deploy import DeployError
from deploy.processes import free_port, last_error, staged_app, stop_tree

FEDENC = [sys.executable, "-m", "cli"]


# ----------------------------------------------------------------------------- certs and keys


def test_last_error_names_what_flwr_run_refused(tmp_path):
    """`flwr run` prints its own refusals in a box (seen: an unknown run-config key); the failure
    message must carry that line, not "no error line found"."""
    log = tmp_path / "flower.log"
    log.write_text("Using SuperLink: fedenc (127.0.0.1:1)\n"
                   "╭─ Error ──────────────────╮\n│ [code: 15] Invalid run configuration.    │\n╰──────────────────────────╯\n")
    assert last_error(log) == "flwr run: [code: 15] Invalid run configuration."
    log.write_text("INFO: round 1\nERROR: RunFailed: no site trained\n")
    assert last_error(log) == "ERROR: RunFailed: no site trained"


def test_staged_app_holds_what_runs_and_nothing_flwr_would_walk(tmp_path):
    """`flwr run` walks every file under the app folder: the staged copy keeps the top-level
    files and the packages, and leaves out virtual environments, run folders, caches, links."""
    app = tmp_path / "project"
    for path, text in {"pyproject.toml": "[project]", "server/__init__.py": "", "server/app.py": "app = 1",
                       "common/datasets/items.csv": "id", "common/__init__.py": "", "common/__pycache__/x.pyc": "",
                       ".venv/lib/big.py": "", "runs/r1/metrics.jsonl": "{}", "tests/test_x.py": ""}.items():
        (app / path).parent.mkdir(parents=True, exist_ok=True)
        (app / path).write_text(text)
    (app / "linked").symlink_to(app / "server")
    staged = staged_app(app, tmp_path / "staged")
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert files == ["common/__init__.py", "common/datasets/items.csv", "pyproject.toml", "server/__init__.py", "server/app.py"]
    assert (staged / "server" / "app.py").read_text() == "app = 1"


def test_certs_verify_for_loopback(tmp_path):
    from cryptography import x509

    paths = deploy.certs.make_certs(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ssl.create_default_context(cafile=str(paths["ca"])).load_cert_chain(paths["cert"], paths["key"])
    assert oct(paths["key"].stat().st_mode & 0o777) == "0o600"
    assert deploy.certs.make_certs(tmp_path / "certs") == paths  # kept, not renewed


def test_site_keys_are_what_flower_reads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    private, public = deploy.certs.make_site_keys("site-a", tmp_path)
    assert try_load_public_key(public)  # what `flwr supernode register` does
    assert deploy.certs.check_private_key(private) == private.resolve()  # what flower-supernode loads
    with pytest.raises(DeployError, match="already exists"):
        deploy.certs.make_site_keys("site-a", tmp_path)


def test_node_config_is_parsed_by_flower():
    from flwr.common.config import parse_config_args

    config = deploy.sites.node_config("/data/site a.csv", 2, "/data/ledger.json", epsilon_budget=4, delta=1e-6)
    parsed = parse_config_args([config])
    assert parsed == {"data-path": "/data/site a.csv", "site-id": 2, "ledger-path": "/data/ledger.json", "epsilon-budget": 4.0,
                      "delta": 1e-6}
    from client.node import NodeConfig

    node = NodeConfig.parse(parsed)  # what the ClientApp reads back
    assert node.policy.budget == 4.0 and node.policy.delta == 1e-6 and not node.policy.allow_non_private


def test_a_supernode_without_its_own_budget_or_ledger_refuses_to_start(tmp_path, synthetic_dir):
    certs = deploy.certs.make_certs(tmp_path / "certs")
    private, _ = deploy.certs.make_site_keys("site-a", tmp_path)
    common = ("supernode", "--superlink", "127.0.0.1:1", "--ca", certs["ca"], "--key", private,
              "--data-path", synthetic_dir / "interactions.csv", "--site-id", 0, "--print")
    done = _fedenc(*common, "--ledger-path", tmp_path / "l.json")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --epsilon-budget is required: a site keeps its own privacy ledger and budget, whatever the server asks"]
    done = _fedenc(*common, "--epsilon-budget", 8)
    assert done.returncode == 2 and "--ledger-path is required" in done.stderr
    done = _fedenc(*common, "--epsilon-budget", -1, "--ledger-path", tmp_path / "l.json")
    assert done.returncode == 2 and "epsilon-budget" in done.stderr
    done = _fedenc(*common, "--epsilon-budget", 8, "--ledger-path", tmp_path / "l.json")
    assert done.returncode == 0 and 'epsilon-budget=8.0' in done.stdout


# ----------------------------------------------------------------------------- central DP


def _settings(**values):
    from common.config import Settings

    return Settings.from_config({"num-sites": 3} | values)


def test_central_epsilon_matches_rdp_and_composes():
    from opacus.accountants import RDPAccountant

    from server.central_dp import central_epsilon

    s = _settings(**{"central-dp": "server-fixed", "central-dp-noise": 1.0, "fraction-train": 2 / 3})
    acc = RDPAccountant()
    acc.history = [(1.0, 2 / 3, 5)]
    assert central_epsilon(s, [(1.0, 2 / 3)] * 5) == pytest.approx(acc.get_epsilon(1e-5))
    assert 0 < central_epsilon(s, [(1.0, 1.0)]) < central_epsilon(s, [(1.0, 1.0)] * 2)
    assert central_epsilon(s, [(0.0, 1.0)]) == math.inf  # no noise, no guarantee
    assert central_epsilon(_settings(), [(1.0, 1.0)]) == 0.0


def _gaussian_epsilon(z: float, delta: float) -> float:
    """ε of one Gaussian mechanism with noise multiplier z, from its RDP α/(2z²) (Mironov 2017)
    and the conversion of Balle et al. 2020 (Thm 21), over a fine grid of orders."""
    orders = [1 + x / 100 for x in range(1, 20_000)]
    return min(a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in orders)


def test_central_dp_noise_follows_the_updates_averaged_and_epsilon_the_noise_applied(monkeypatch):
    """One of 3 sampled sites refuses: 2 updates are averaged. The reported ε must be the ε of
    the noise actually added to that mean, recomputed here from the std Flower applied."""
    import flwr.serverapp.strategy.dp_fixed_clipping as flower_dp

    from common.transport import to_array_record
    from server import central_dp
    from server.strategy import BudgetAwareFedAvg, SiteRoster

    applied = []
    real = flower_dp.add_gaussian_noise_inplace
    monkeypatch.setattr(flower_dp, "add_gaussian_noise_inplace", lambda arrays, std: (applied.append(std), real(arrays, std)))
    s = _settings(**{"central-dp": "server-fixed", "central-dp-noise": 1.5, "central-dp-clip": 2.0})
    inner = BudgetAwareFedAvg(fraction_train=1.0, min_available_nodes=1, roster=SiteRoster(3, 1, 0.0))
    wrapped = central_dp.wrap(inner, s)
    wrapped.current_arrays = to_array_record({"w": np.zeros(4, np.float32)})
    averaged = [_reply(i, {"w": np.full(4, 0.1 * (i + 1), np.float32)}, users=10) for i in range(2)]  # the third refused
    arrays, _ = wrapped.aggregate_train(1, averaged)
    assert arrays is not None and len(applied) == 1
    z_applied = applied[0] * len(averaged) / 2.0  # std × m / clip: the multiplier of the mean's sensitivity
    assert z_applied == pytest.approx(1.5)  # not 1.5 × 2/3, as a std calibrated for 3 sites would be
    reported = central_dp.central_epsilon(s, wrapped.releases)
    assert reported == pytest.approx(_gaussian_epsilon(z_applied, 1e-5), rel=0.01)
    assert isinstance(inner._rng, __import__("random").SystemRandom)  # secret site sampling


class _Reply(SimpleNamespace):
    def has_error(self) -> bool:
        return False


def _reply(node: int, arrays: dict, users: int):
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from common.transport import to_array_record

    metrics = MetricRecord({"num-examples": users, "unit-weight": 1, "train_loss": 1.0, "site": node, "refused": 0,
                            "epsilon": 1.0, "budget": 8.0})
    content = RecordDict({"arrays": to_array_record(arrays), "metrics": metrics, "accountant": ConfigRecord({"json": "{}"})})
    return _Reply(content=content, metadata=SimpleNamespace(src_node_id=node))


def test_server_side_clipping_bounds_each_site_and_averages_unweighted():
    from common.transport import from_array_record, to_array_record
    from server import central_dp
    from server.strategy import BudgetAwareFedAvg, SiteRoster

    s = _settings(**{"central-dp": "server-fixed", "central-dp-noise": 0.0, "central-dp-clip": 1.0})
    wrapped = central_dp.wrap(BudgetAwareFedAvg(fraction_train=1.0, min_available_nodes=3, roster=SiteRoster(3, 1, 0.0)), s)
    glob = {"w": np.zeros(4, np.float32)}
    wrapped.current_arrays = to_array_record(glob)  # what configure_train records
    updates = [np.array([3.0, 4.0, 0, 0]), np.array([0, 0.5, 0, 0]), np.array([0, 0, 0, 10.0])]
    replies = [_reply(i, {"w": u.astype(np.float32)}, users=10 ** i) for i, u in enumerate(updates)]
    arrays, _ = wrapped.aggregate_train(1, replies)
    clipped = [u / max(1.0, np.linalg.norm(u)) for u in updates]
    np.testing.assert_allclose(from_array_record(arrays)["w"], np.mean(clipped, axis=0), atol=1e-6)
    assert wrapped.releases == [(0.0, 1.0)]  # one noised round, recorded with the noise it had


def test_client_side_clipping_mod_clips_before_the_update_leaves(monkeypatch):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # a Message needs a run, as inside Flower
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    from client.app import central_dp_clipping
    from common.transport import from_array_record, to_array_record

    incoming = Message(
        content=RecordDict({"arrays": to_array_record({"w": np.zeros(3, np.float32)}),
                            "config": ConfigRecord({"num-rounds": 1, "clipping_norm": 0.5})}),
        dst_node_id=1, message_type="train",
    )

    def train(msg, context):
        update = to_array_record({"w": np.array([3.0, 0, 4.0], np.float32)})
        return Message(content=RecordDict({"arrays": update}), dst_node_id=0, message_type="train")

    out = central_dp_clipping(incoming, None, train)
    assert np.linalg.norm(from_array_record(out.content["arrays"])["w"]) == pytest.approx(0.5, rel=1e-5)
    # without central DP the update passes untouched
    incoming.content["config"] = ConfigRecord({"num-rounds": 1})
    out = central_dp_clipping(incoming, None, train)
    assert np.linalg.norm(from_array_record(out.content["arrays"])["w"]) == pytest.approx(5.0)


# ----------------------------------------------------------------------------- bad input


def _fedenc(*args, timeout=120, env=None):
    return subprocess.run([*FEDENC, "deploy", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=Path(__file__).parents[1])


def test_missing_certificate_is_named(tmp_path):
    done = _fedenc("superlink", "--certs", tmp_path / "nocerts", "--state", tmp_path / "state", "--print")
    assert done.returncode == 2
    assert "CA certificate" in done.stderr and "does not exist" in done.stderr


def test_missing_site_data_is_named(tmp_path):
    certs = deploy.certs.make_certs(tmp_path / "certs")
    done = _fedenc("supernode", "--superlink", "127.0.0.1:1", "--ca", certs["ca"], "--key", tmp_path / "nokey",
                   "--data-path", tmp_path / "missing.csv", "--site-id", 0, "--ledger-path", tmp_path / "l.json",
                   "--epsilon-budget", 8, "--print")
    assert done.returncode == 2 and "site data" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "l.json").exists()


def test_missing_private_key_is_named(tmp_path, synthetic_dir):
    certs = deploy.certs.make_certs(tmp_path / "certs")
    done = _fedenc("supernode", "--superlink", "127.0.0.1:1", "--ca", certs["ca"], "--key", tmp_path / "nokey",
                   "--data-path", synthetic_dir / "interactions.csv", "--site-id", 0, "--ledger-path", tmp_path / "l.json",
                   "--epsilon-budget", 8, "--print")
    assert done.returncode == 2 and "SuperNode private key" in done.stderr and "does not exist" in done.stderr


def test_unreachable_superlink_times_out(tmp_path):
    certs = deploy.certs.make_certs(tmp_path / "certs")
    _, public = deploy.certs.make_site_keys("site-a", tmp_path)
    home = tmp_path / "home"
    deploy.superlink.write_connection(home, "fedenc", f"127.0.0.1:{free_port()}", certs["ca"])  # nothing listens there
    start = time.monotonic()
    done = _fedenc("register", public, "--home", home, "--timeout", 30, timeout=90)
    assert done.returncode == 1 and "registering" in done.stderr
    assert time.monotonic() - start < 90


# ----------------------------------------------------------------------------- a real federation


def _start(cmd, log: Path, env) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_bert):
    """Operator and 3 sites on one machine: TLS, node auth, each site its own port and files."""
    root = tmp_path_factory.mktemp("federation")
    certs = deploy.certs.make_certs(root / "certs")
    keys = {name: deploy.certs.make_site_keys(name, root / "keys") for name in ("site-0", "site-1", "site-2", "rogue")}
    files = deploy.sites.split_builtin(root / "data", sites=3, seed=0, users_per_site=200)
    home = root / "home"
    env = deploy.superlink.deploy_env(home)
    env["FEDENC_CACHE"] = str(root / "cache")
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        link = deploy.superlink.superlink_command(root / "certs", port, root / "state")
        procs.append(_start(link, root / "superlink.out", env))
        deploy.superlink.wait_superlink(address, certs["ca"], timeout=90, proc=procs[0])
        deploy.superlink.write_connection(home, "fedenc", address, certs["ca"])
        nodes = [deploy.superlink.register_key(keys[f"site-{i}"][1], "fedenc", env) for i in range(3)]
        ledgers = {i: root / f"site-{i}" / "ledger.json" for i in range(3)}
        for i in range(3):
            config = deploy.sites.node_config(str(files[i]), i, str(ledgers[i]), 8.0, state_dir=str(root / f"site-{i}" / "state"))
            cmd = deploy.sites.supernode_command(address, certs["ca"], keys[f"site-{i}"][0], free_port(), config, max_wait=120)
            procs.append(_start(cmd, root / f"supernode-{i}.out", env))
        run = {
            "dataset": "csv", "data-path": str(files["server"]), "items-path": str(root / "data" / "items.csv"),
            "model": tiny_bert, "num-sites": 3, "num-server-rounds": 2, "local-steps": 2, "expected-batch": 16,
            "max-tokens": 16, "max-history": 8, "eval-users": 200, "epsilon": 8.0,
        }  # fmt: skip
        yield SimpleNamespace(root=root, certs=certs, keys=keys, env=env, address=address, nodes=nodes,
                              ledgers=ledgers, run=run, procs=procs)
    finally:
        for proc in reversed(procs):
            stop_tree(proc)


def _run(fed, name: str, **changes) -> tuple[dict, float]:
    config = fed.run | {"out-dir": str(fed.root / name)} | changes
    path = fed.root / f"{name}.toml"
    path.write_text(tomli_w.dumps(config))
    start = time.monotonic()
    summary = deploy.superlink.run_federation("fedenc", path, fed.root / name, fed.env, timeout=1200)
    return summary, time.monotonic() - start


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ledger_epsilon(path: Path) -> tuple[float, int]:
    """(ε spent, DP-SGD steps), recomputed from the ledger file's accountant history."""
    from common.privacy import epsilon_spent

    ledger = json.loads(path.read_text())
    steps = sum(h[2] for r in ledger["releases"] if r["kind"] == "dp-sgd" for h in r["history"])
    return epsilon_spent(ledger["history"], ledger["delta"], ledger["accountant"]), steps


def _releases(path: Path) -> int:
    """The popularity prior's count releases."""
    return sum(1 for r in json.loads(path.read_text())["releases"] if r["kind"] == "counts")


@pytest.mark.deploy
def test_three_sites_over_tls_with_node_auth(federation):
    summary, wall = _run(federation, "run1")
    out = federation.root / "run1"
    lines = _lines(out / "metrics.jsonl")
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert all(line["sites"] == 3 and line["bytes_up"] > 0 for line in lines[1:])
    assert (out / "adapter" / "adapter_config.json").exists()
    assert set(summary["sites"]) == {"0", "1", "2"}
    for i, ledger in federation.ledgers.items():  # each site's ledger lives at the site
        eps, steps = _ledger_epsilon(ledger)
        assert steps == 4 and 0 < eps <= 8.0 and _releases(ledger) == 1  # the prior's counts, once
        assert summary["sites"][str(i)]["epsilon"] == pytest.approx(eps)
    timings = {"run1_wall_s": wall, "bytes_up": [line["bytes_up"] for line in lines]}
    (federation.root / "timings.json").write_text(json.dumps(timings))
    print(f"\n3-site TLS run, 2 rounds: {wall:.1f}s wall, {lines[-1]['bytes_up']} bytes up per round")


@pytest.mark.deploy
def test_second_run_continues_from_the_spent_budget_with_central_dp(federation):
    before = {i: _ledger_epsilon(p) for i, p in federation.ledgers.items()}
    assert all(steps == 4 for _, steps in before.values()), "needs the first run"
    # The sites keep their ledgers: a run asking for ε = 16 gets at most what is left of each
    # site's own budget of 8 (a sliver, spent with very large noise), never more.
    capped, _ = _run(federation, "run2-capped", epsilon=16.0, **{"num-server-rounds": 1})
    assert capped["epsilon"] <= 8.0 + 1e-9
    assert all(_ledger_epsilon(p)[0] <= 8.0 + 1e-9 for p in federation.ledgers.values())
    # Each site raises its own budget (logged in its ledger); ε then grows from what was spent, not from 0.
    for path in federation.ledgers.values():
        done = subprocess.run([*FEDENC, "ledger", "raise-budget", str(path), "--to", "16", "--reason", "second study"],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr
        shown = json.loads(subprocess.run([*FEDENC, "ledger", "show", str(path), "--json"], capture_output=True, text=True,
                                          timeout=120, cwd=Path(__file__).parents[1]).stdout)
        assert shown["budget"] == 16.0 and shown["events"][-1]["reason"] == "second study"
    before = {i: _ledger_epsilon(p) for i, p in federation.ledgers.items()}
    central = {"central-dp": "server-fixed", "central-dp-noise": 1.0, "central-dp-clip": 1.0}
    summary, wall = _run(federation, "run2", epsilon=16.0, **central)
    lines = _lines(federation.root / "run2" / "metrics.jsonl")
    first = lines[1]
    assert first["epsilon"] > max(eps for eps, _ in before.values())
    for i, path in federation.ledgers.items():
        eps, steps = _ledger_epsilon(path)
        assert steps == before[i][1] + 4 and eps > before[i][0] and _releases(path) == 3  # each run pays for its prior
    assert 0 < lines[1]["central_epsilon"] < lines[2]["central_epsilon"] == pytest.approx(summary["final"]["central_epsilon"])
    timings = json.loads((federation.root / "timings.json").read_text()) if (federation.root / "timings.json").exists() else {}
    timings |= {"run2_central_dp_wall_s": wall, "run2_bytes_up": [line["bytes_up"] for line in lines]}
    (federation.root / "timings.json").write_text(json.dumps(timings))
    print(f"\nsecond run (central DP server-fixed): {wall:.1f}s wall; central ε {lines[-1]['central_epsilon']:.3f}")


@pytest.mark.deploy
def test_unregistered_key_is_refused(federation):
    cmd = deploy.sites.supernode_command(federation.address, federation.certs["ca"], federation.keys["rogue"][0], free_port(),
                                   deploy.sites.node_config("/nowhere.csv", 9, "/nowhere.json", 8.0), max_wait=10)
    proc = _start(cmd + ["--max-retries", "2"], federation.root / "rogue.out", federation.env)
    try:
        assert proc.wait(timeout=90) != 0
    finally:
        stop_tree(proc)
    log = (federation.root / "rogue.out").read_text()
    assert "Failed to activate SuperNode" in log
    ls = subprocess.run(["flwr", "supernode", "ls", "fedenc", "--format", "json"], env=federation.env,
                        capture_output=True, text=True, timeout=60)
    listed = {int(n["node-id"]) for n in json.loads(ls.stdout[ls.stdout.index("{"):])["nodes"]}
    assert listed == set(federation.nodes)


@pytest.mark.deploy
def test_plain_http_is_refused(federation):
    with pytest.raises(OSError):  # the SuperLink speaks TLS only
        urllib.request.urlopen(f"http://{federation.address}/health", timeout=5)
    cmd = ["flower-supernode", "--superlink", federation.address, "--insecure", "--port", str(free_port()),
           "--max-wait-time", "10", "--max-retries", "2"]
    proc = _start(cmd, federation.root / "insecure.out", federation.env)
    try:
        assert proc.wait(timeout=90) != 0
    finally:
        stop_tree(proc)
    assert "could not establish a connection" in (federation.root / "insecure.out").read_text()
    home = federation.root / "insecure-home"
    home.mkdir(exist_ok=True)
    plain = {"superlink": {"default": "plain", "plain": {"address": federation.address, "insecure": True}}}
    (home / "config.toml").write_text(tomli_w.dumps(plain))
    env = deploy.superlink.deploy_env(home)
    ls = subprocess.run(["flwr", "supernode", "ls", "plain", "--format", "json"], env=env, capture_output=True, text=True,
                        timeout=60)
    assert '"success": true' not in ls.stdout


@pytest.mark.deploy
def test_unreachable_superlink_supernode_gives_up(tmp_path, tiny_bert):
    certs = deploy.certs.make_certs(tmp_path / "certs")
    private, _ = deploy.certs.make_site_keys("site-a", tmp_path)
    cmd = deploy.sites.supernode_command(f"127.0.0.1:{free_port()}", certs["ca"], private, free_port(),
                                   deploy.sites.node_config("/x.csv", 0, "/x.json", 8.0), max_wait=10)
    proc = _start(cmd + ["--max-retries", "2"], tmp_path / "sn.out", deploy.superlink.deploy_env(tmp_path / "home"))
    try:
        assert proc.wait(timeout=90) != 0
    finally:
        stop_tree(proc)

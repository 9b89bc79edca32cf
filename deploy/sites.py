"""What a partner site runs: its checked node config, its ``flower-supernode`` command and
the resident worker beside it (client/worker.py), and demo data (the built-in
MovieTweetings cut into per-site CSVs) to try a deployment."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deploy import DeployError
from deploy.certs import check_private_key, need_file


def split_builtin(out: str | Path, sites: int = 3, seed: int = 0, users_per_site: int = 0) -> dict:
    """Cut the built-in MovieTweetings into per-site interaction CSVs plus a server-side
    evaluation set, all over one shared catalogue ``items.csv`` (item_id,title,genres).

    Users are split iid into ``sites + 1`` groups (``common.partition``): ``site-K.csv``
    for each site and ``server.csv`` for the operator's central evaluation, so the server
    never scores a site's users. The catalogue is the whole public catalogue at every
    site and the server (it fixes the item-bias dimension); its rendered texts equal the
    built-in dataset's (checked here). ``users_per_site`` > 0 keeps only that many users
    per group (quick tests).
    """

    from common import sources
    from common.data import DataSpec, load
    from common.partition import partition_users

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = sources.read_movietweetings()
    builtin = load(DataSpec())
    groups = partition_users(builtin, sites + 1, "iid", seed=seed)
    raw.items[["item_id", "title", "genres"]].to_csv(out / "items.csv", index=False)
    rows = raw.interactions[["user_id", "item_id", "timestamp", "rating"]]
    files = {}
    for g, members in enumerate(groups):
        if users_per_site:
            members = members[:users_per_site]
        ids = {builtin.user_ids[u] for u in members}
        path = out / ("server.csv" if g == sites else f"site-{g}.csv")
        rows[rows["user_id"].astype(str).isin(ids)].to_csv(path, index=False)
        files["server" if g == sites else g] = path
    site0 = load(DataSpec(dataset="csv", data_path=str(files[0]), items_path=str(out / "items.csv")))
    if site0.catalogue.texts != builtin.catalogue.texts or site0.catalogue.item_ids != builtin.catalogue.item_ids:
        raise DeployError("the CSV catalogue does not render like the built-in one; item texts would differ")
    return files



def node_config(
    data_path: str, site_id: int, ledger_path: str, epsilon_budget: float, items_path: str | None = None,
    state_dir: str | None = None, delta: float | None = None, allow_non_private: bool = False,
) -> str:
    """The ``--node-config`` string of one site (values quoted as TOML strings); the keys
    are those :mod:`client.node` reads, and it is checked the way the ClientApp checks it.

    >>> node_config("/data/a.csv", 2, "/data/ledger.json", 8.0)
    'data-path="/data/a.csv" site-id=2 ledger-path="/data/ledger.json" epsilon-budget=8.0'
    """
    from client.node import NodeConfig, NodeConfigError

    pairs = {"data-path": data_path, "site-id": site_id, "ledger-path": ledger_path, "epsilon-budget": float(epsilon_budget)}
    optional = {"items-path": items_path, "state-dir": state_dir, "delta": delta}
    pairs |= {k: v for k, v in optional.items() if v is not None}
    if allow_non_private:
        pairs["allow-non-private"] = True
    try:
        NodeConfig.parse(pairs)
    except NodeConfigError as err:
        raise DeployError(str(err)) from None
    return " ".join(f"{k}={json.dumps(v)}" for k, v in pairs.items())


def check_site_data(data_path: str | Path, items_path: str | Path | None = None, k_core: int = 5) -> str:
    """Load the site's files once, before the SuperNode starts: a clear message now beats a
    failed round later. Returns a one-line description."""
    from common.data import DataError, DataSpec, load

    data_path = Path(data_path).expanduser()
    if not data_path.is_file():
        raise DeployError(f"site data {data_path} does not exist (node config data-path)")
    try:
        items = str(items_path) if items_path else None
        data = load(DataSpec(dataset="csv", data_path=str(data_path.resolve()), items_path=items, k_core=k_core))
    except DataError as err:
        raise DeployError(str(err)) from None
    return f"{len(data.user_ids)} users, {len(data.catalogue)} catalogue items"


def supernode_command(
    superlink: str,
    ca: str | Path,
    private_key: str | Path,
    port: int,
    config: str,
    max_wait: float | None = 60.0,
) -> list[str]:
    """``flower-supernode`` over TLS with node authentication; gives up after ``max_wait``
    seconds without a SuperLink (None: retry for ever, what a long-lived site wants)."""
    cmd = [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", str(need_file(ca, "CA certificate")),
        "--auth-supernode-private-key", str(check_private_key(private_key)),
        "--port", str(port),
        "--node-config", config,
    ]  # fmt: skip
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    return cmd



def worker_command(config: str) -> list[str]:
    """The site's resident worker, started with the SuperNode's node config.

    >>> worker_command('site-id=0')[1:]
    ['-m', 'client.worker', '--node-config', 'site-id=0']
    """
    return [sys.executable, "-m", "client.worker", "--node-config", config]


def run_site(supernode: list[str], worker: list[str] | None, env: dict | None, say: Callable[[str], None],
             restart_after: float = 60.0) -> int:
    """Run ``flower-supernode`` and, beside it, the site's worker until the SuperNode exits;
    returns its exit code. Both are stopped (their whole trees) on the way out, an
    :class:`~deploy.processes.Interrupted` included. A worker that exits is restarted when it
    had run ``restart_after`` seconds; one that fails sooner is left off (messages then run
    in-process, only slower) rather than restarted in a loop."""
    from deploy.processes import stop_tree, uninterrupted

    procs: list[subprocess.Popen] = []
    try:
        helper = subprocess.Popen(worker, env=env, start_new_session=True) if worker else None
        started = time.monotonic()
        procs = [p for p in (helper,) if p]
        node = subprocess.Popen(supernode, env=env, start_new_session=True)
        procs.append(node)
        while (code := node.poll()) is None:
            if helper is not None and helper.poll() is not None:
                ran = time.monotonic() - started
                if ran >= restart_after:
                    say(f"site worker exited with code {helper.returncode} after {ran:.0f}s; restarting it")
                    helper, started = subprocess.Popen(worker, env=env, start_new_session=True), time.monotonic()
                    procs.insert(0, helper)
                else:
                    say(f"site worker exited with code {helper.returncode} within {ran:.0f}s of its start; not restarted:"
                        " messages run in-process (slower, same privacy)")
                    helper = None
            time.sleep(0.5)
        return code
    finally:
        with uninterrupted():
            for proc in procs:
                if proc.poll() is None:
                    stop_tree(proc)

"""What the operator runs: ``flower-superlink`` with TLS and node authentication, the
``flwr`` connection, site registration, and a run in the foreground that fails loudly."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from deploy import DeployError
from deploy.certs import check_certs, need_file
from deploy.processes import flower_env, last_error, staged_app, stop_tree, wait_healthy

PROJECT = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml lives here


def superlink_command(certs: str | Path, port: int, state: str | Path, host: str = "127.0.0.1") -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and runtime installs off."""
    c = check_certs(certs)
    state = Path(state).resolve()
    state.mkdir(parents=True, exist_ok=True)  # the SuperLink does not create its log's folder
    return [
        "flower-superlink",
        "--ssl-ca-certfile", str(c["ca"]), "--ssl-certfile", str(c["cert"]), "--ssl-keyfile", str(c["key"]),
        "--enable-supernode-auth",
        "--host", host, "--port", str(port),
        "--database", str(state / "state.db"), "--log-file", str(state / "superlink.log"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip



def write_connection(home: str | Path, name: str, address: str, ca: str | Path) -> Path:
    """Add (or replace) a TLS SuperLink connection in ``FLWR_HOME/config.toml``."""
    import tomllib

    import tomli_w

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": str(need_file(ca, "CA certificate"))}
    links.setdefault("default", name)
    path.write_text(tomli_w.dumps(config))
    return path


def deploy_env(home: str | Path) -> dict:
    """Flower's home in ``home``, runtime dependency installs off (see :func:`deploy.processes.flower_env`)."""
    return flower_env(Path(home), tempfile.gettempdir())


def wait_superlink(address: str, ca: str | Path, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until the SuperLink answers ``/health`` over TLS (verified against ``ca``)."""
    try:
        wait_healthy(f"https://{address}/health", proc, timeout, ssl.create_default_context(cafile=str(ca)))
    except (TimeoutError, ChildProcessError) as err:
        raise DeployError(str(err)) from None


def register_key(public_key: str | Path, connection: str, env: dict, timeout: float = 60.0) -> int:
    """``flwr supernode register KEY.pub CONNECTION``; returns the node id."""
    public_key = need_file(public_key, "public key")
    cmd = ["flwr", "supernode", "register", str(public_key), connection, "--format", "json"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeployError(f"registering {public_key} took longer than {timeout:.0f}s (is the SuperLink reachable?)") from None
    out = done.stdout.strip()
    try:
        reply = json.loads(out[out.index("{") :])
    except ValueError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        raise DeployError(f"registering {public_key} failed: {(reply.get('error-message') or done.stderr or out).strip()[:400]}")
    return int(reply["node-id"])


def run_federation(
    connection: str,
    run_config: str | Path,
    out: str | Path,
    env: dict,
    timeout: float = 3600.0,
    log_path: str | Path | None = None,
) -> dict:
    """``flwr run <project> <connection> --run-config FILE --stream`` in the foreground;
    returns the summary the ServerApp wrote into ``out``, or raises ``DeployError``.

    ``out`` is the server-side ``out-dir`` of the run config (the ServerApp runs on the
    SuperLink's machine)."""
    out = Path(out)
    summary, failure = out / "summary.json", out / "failure.json"
    started = time.time_ns()  # a summary or failure written after this is *this* run's; an older one is left as it is
    log_path = Path(log_path or out / "flower.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    config_file = need_file(run_config, "run config")
    staged = Path(tempfile.mkdtemp(prefix="fedenc-app-"))
    deadline = time.monotonic() + timeout
    run = None
    try:
        cmd = ["flwr", "run", str(staged_app(PROJECT, staged)), connection, "--run-config", str(config_file), "--stream"]
        with open(log_path, "w") as log:
            run = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while run.poll() is None:
            if time.monotonic() > deadline:
                raise DeployError(f"the run took longer than {timeout:.0f}s; see {log_path}")
            time.sleep(0.5)
    finally:  # the staged copy goes whatever happened, a failed start included
        if run is not None and run.poll() is None:
            stop_tree(run)
        shutil.rmtree(staged, ignore_errors=True)

    def written(path: Path) -> bool:
        return path.exists() and path.stat().st_mtime_ns >= started

    if not written(summary):
        why = json.loads(failure.read_text()).get("reason") if written(failure) else last_error(log_path)
        raise DeployError(f"the run failed (flwr exit code {run.returncode}); see {log_path}: {why}")
    return json.loads(summary.read_text())


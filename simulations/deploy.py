"""``fedenc deploy``: run fedenc across partner sites on a real Flower SuperLink.

What each machine runs (the README's "Deploy across sites" has the exact commands):

- the operator (server machine): ``fedenc deploy certs`` (a CA and the SuperLink's TLS
  certificate), ``fedenc deploy superlink`` (``flower-superlink`` with TLS and
  ``--enable-supernode-auth``), ``fedenc deploy connection`` + ``fedenc deploy register``
  (each site's public key), then ``fedenc deploy run`` (``flwr run . <connection>``,
  in the foreground, non-zero exit unless the ServerApp wrote its summary);
- each site: ``fedenc deploy keys`` (its node-auth key pair; only the ``.pub`` file
  leaves the site), ``fedenc deploy supernode`` (``flower-supernode`` over TLS with the
  site's own ``data-path``/``site-id``/``ledger-path`` node config).

Nothing here transports or aggregates anything itself: these are Flower's own
processes, started with checked inputs, time-outs and runtime dependency installs off.
Every sub-command has ``--print`` to show the command instead of running it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shlex
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer

PROJECT = Path(__file__).resolve().parents[1]
CERT_FILES = ("ca.crt", "server.pem", "server.key")


class DeployError(RuntimeError):
    """A deployment input or step failed; the message names the file, address or step."""


# --------------------------------------------------------------------------- certificates


def make_certs(out: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 365) -> dict[str, Path]:
    """A CA (``ca.crt``/``ca.key``) and a SuperLink certificate for ``hosts``
    (``server.pem``/``server.key``), signed by the CA. Existing files are kept
    (a new CA would invalidate every site's copy): delete the folder to renew.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     sorted((k, p.name) for k, p in make_certs(tmp).items())
    [('ca', 'ca.crt'), ('ca_key', 'ca.key'), ('cert', 'server.pem'), ('key', 'server.key')]
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    paths = {"ca": out / "ca.crt", "ca_key": out / "ca.key", "cert": out / "server.pem", "key": out / "server.key"}
    if all(p.exists() for p in paths.values()):
        return paths
    if any(p.exists() for p in paths.values()):
        raise DeployError(f"{out} holds some certificate files but not all; remove the folder and run again")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedenc"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("fedenc CA"))
        .issuer_name(name("fedenc CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    private = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8, encryption_algorithm=serialization.NoEncryption())
    _write_private(paths["ca_key"], ca_key.private_bytes(**private))
    _write_private(paths["key"], key.private_bytes(**private))
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    return paths


def make_site_keys(site: str, out: str | Path) -> tuple[Path, Path]:
    """A NIST P-384 key pair for SuperNode authentication, in the OpenSSH formats that
    ``flower-supernode --auth-supernode-private-key`` (private) and ``flwr supernode
    register`` (``.pub``) read. Refuses to overwrite: a new key is a new node identity."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not site or "/" in site or site.startswith("."):
        raise DeployError(f"site name {site!r}: use a plain name such as site-a")
    out = Path(out)
    private, public = out / f"{site}.key", out / f"{site}.key.pub"
    if private.exists() or public.exists():
        raise DeployError(f"{private} already exists; keep it (it is the site's identity) or delete it first")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + f" fedenc-{site}\n".encode())
    return private, public


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(data)


def _need_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DeployError(f"{what} {path} does not exist")
    return path.resolve()


def check_certs(certs: str | Path) -> dict[str, Path]:
    certs = Path(certs)
    return {
        "ca": _need_file(certs / "ca.crt", "CA certificate"),
        "cert": _need_file(certs / "server.pem", "SuperLink certificate"),
        "key": _need_file(certs / "server.key", "SuperLink private key"),
    }


def check_private_key(path: str | Path) -> Path:
    """The key file exists and is an EC private key in OpenSSH format (what flower-supernode reads)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = _need_file(path, "SuperNode private key")
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        raise DeployError(f"{path} is not an OpenSSH private key ({err}); make one with `fedenc deploy keys`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{path} is not an EC (NIST curve) key; make one with `fedenc deploy keys`")
    return path


# --------------------------------------------------------------------------- demo data


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


# --------------------------------------------------------------------------- commands


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
        "--root-certificates", str(_need_file(ca, "CA certificate")),
        "--auth-supernode-private-key", str(check_private_key(private_key)),
        "--port", str(port),
        "--node-config", config,
    ]  # fmt: skip
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    return cmd


def write_connection(home: str | Path, name: str, address: str, ca: str | Path) -> Path:
    """Add (or replace) a TLS SuperLink connection in ``FLWR_HOME/config.toml``."""
    import tomllib

    import tomli_w

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": str(_need_file(ca, "CA certificate"))}
    links.setdefault("default", name)
    path.write_text(tomli_w.dumps(config))
    return path


def deploy_env(home: str | Path) -> dict:
    """Flower's home in ``home``, runtime dependency installs off (see simulate.flower_env)."""
    import tempfile

    from simulations.simulate import flower_env

    return flower_env(Path(home), tempfile.gettempdir())


def wait_superlink(address: str, ca: str | Path, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until the SuperLink answers ``/health`` over TLS (verified against ``ca``)."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"https://{address}/health", timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except OSError as err:
            last = err
            time.sleep(0.3)
    raise DeployError(f"no SuperLink answered at https://{address} within {timeout:.0f}s ({last})")


def register_key(public_key: str | Path, connection: str, env: dict, timeout: float = 60.0) -> int:
    """``flwr supernode register KEY.pub CONNECTION``; returns the node id."""
    public_key = _need_file(public_key, "public key")
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
    from simulations.simulate import _last_error, stop_tree

    out = Path(out)
    summary, failure = out / "summary.json", out / "failure.json"
    started = time.time_ns()  # a summary or failure written after this is *this* run's; an older one is left as it is
    log_path = Path(log_path or out / "flower.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["flwr", "run", str(PROJECT), connection, "--run-config", str(_need_file(run_config, "run config")), "--stream"]
    deadline = time.monotonic() + timeout
    with open(log_path, "w") as log:
        run = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while run.poll() is None:
                if time.monotonic() > deadline:
                    raise DeployError(f"the run took longer than {timeout:.0f}s; see {log_path}")
                time.sleep(0.5)
        finally:
            if run.poll() is None:
                stop_tree(run)
    def written(path: Path) -> bool:
        return path.exists() and path.stat().st_mtime_ns >= started

    if not written(summary):
        why = json.loads(failure.read_text()).get("reason") if written(failure) else _last_error(log_path)
        raise DeployError(f"the run failed (flwr exit code {run.returncode}); see {log_path}: {why}")
    return json.loads(summary.read_text())


# --------------------------------------------------------------------------- CLI

app = typer.Typer(help="Deploy across partner sites: certificates, keys, SuperLink, SuperNodes, runs.", no_args_is_help=True)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _exec(cmd: list[str], env: dict | None, show: bool) -> None:
    if show:
        typer.echo(shlex.join(cmd))
        return
    typer.echo(f"$ {shlex.join(cmd)}", err=True)
    try:
        code = subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


HomeOpt = Annotated[Path, typer.Option("--home", help="Flower's home folder (FLWR_HOME) for this federation.")]


@app.command("certs")
def certs_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Name or IP the sites use to reach the SuperLink (repeatable).")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 365,
) -> None:
    """Create a CA and a SuperLink TLS certificate. Give ca.crt (only) to every site."""
    try:
        paths = make_certs(out, tuple(host or ("127.0.0.1", "localhost")), days)
    except DeployError as err:
        _fail(str(err))
    typer.echo(f"CA certificate (give to sites): {paths['ca']}\nSuperLink certificate: {paths['cert']}\n"
               f"SuperLink key (keep private): {paths['key']}\nCA key (keep offline): {paths['ca_key']}")


@app.command("keys")
def keys_cmd(
    site: Annotated[str, typer.Option("--site", help="Site name, e.g. site-a.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for SITE.key and SITE.key.pub.")],
) -> None:
    """Create a site's SuperNode authentication key pair. Send only SITE.key.pub to the operator."""
    try:
        private, public = make_site_keys(site, out)
    except DeployError as err:
        _fail(str(err))
    typer.echo(f"private key (stays at the site): {private}\npublic key (send to the operator): {public}")


@app.command("demo-data")
def demo_data_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for site-K.csv, server.csv and items.csv.")],
    sites: Annotated[int, typer.Option(min=1, help="Number of sites.")] = 3,
    users: Annotated[int, typer.Option(min=0, help="Users per site (0: all).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the user split.")] = 0,
) -> None:
    """Split the built-in MovieTweetings into per-site CSVs and a server evaluation set (to try a deployment)."""
    try:
        files = split_builtin(out, sites, seed, users)
    except DeployError as err:
        _fail(str(err))
    typer.echo("\n".join(f"{k}: {v}" for k, v in files.items()) + f"\nitems: {out / 'items.csv'}")


@app.command("superlink")
def superlink_cmd(
    certs: Annotated[Path, typer.Option("--certs", help="Folder made by `fedenc deploy certs`.")],
    state: Annotated[Path, typer.Option("--state", help="Folder for the SuperLink's database and log.")],
    port: Annotated[int, typer.Option(help="The one port of the SuperLink (Fleet, Control, Runtime APIs).")] = 9093,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for remote sites).")] = "127.0.0.1",
    show: Annotated[bool, typer.Option("--print", help="Print the command instead of running it.")] = False,
) -> None:
    """Start flower-superlink with TLS and SuperNode authentication (foreground)."""
    try:
        cmd = superlink_command(certs, port, state, host)
    except DeployError as err:
        _fail(str(err))
    state.mkdir(parents=True, exist_ok=True)
    _exec(cmd, deploy_env(state / "flwr-home"), show)


@app.command("connection")
def connection_cmd(
    home: HomeOpt,
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port.")] = "127.0.0.1:9093",
    ca: Annotated[Path, typer.Option(help="CA certificate (ca.crt).")] = Path("certs/ca.crt"),
    name: Annotated[str, typer.Option(help="Connection name for `flwr run . NAME`.")] = "fedenc",
) -> None:
    """Write a TLS connection into FLWR_HOME/config.toml (for `flwr run` and `flwr supernode register`)."""
    try:
        path = write_connection(home, name, superlink, ca)
    except DeployError as err:
        _fail(str(err))
    typer.echo(f"connection {name!r} -> {superlink} written to {path}; use FLWR_HOME={home}")


@app.command("register")
def register_cmd(
    key: Annotated[Path, typer.Argument(help="A site's public key (SITE.key.pub).")],
    home: HomeOpt,
    name: Annotated[str, typer.Option(help="Connection name.")] = "fedenc",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the SuperLink.")] = 60.0,
) -> None:
    """Register a site's public key with the SuperLink (flwr supernode register)."""
    try:
        node = register_key(key, name, deploy_env(home), timeout)
    except DeployError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"registered {key} as node {node}")


@app.command("supernode")
def supernode_cmd(
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port.")],
    ca: Annotated[Path, typer.Option(help="The operator's CA certificate (ca.crt).")],
    key: Annotated[Path, typer.Option(help="This site's private key (SITE.key).")],
    data_path: Annotated[Path, typer.Option(help="This site's interactions CSV.")],
    site_id: Annotated[int, typer.Option(help="This site's number (as the server reports it).")],
    ledger_path: Annotated[
        Path | None, typer.Option(help="This site's privacy ledger (JSON; kept across runs). Required.")
    ] = None,
    epsilon_budget: Annotated[float | None, typer.Option(help="The most ε this site's ledger may ever hold. Required.")] = None,
    items_path: Annotated[Path | None, typer.Option(help="Items CSV (default: items.csv beside data-path).")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="The site's state beside its ledger: marker, kept replies, row cache (default ~/.local/state/fedenc)."),
    ] = None,
    delta: Annotated[float | None, typer.Option(help="A cap on δ (default 1/(10 n) rounded down to a power of ten).")] = None,
    allow_non_private: Annotated[bool, typer.Option(help="Serve runs that ask for no DP (exact releases).")] = False,
    port: Annotated[int, typer.Option(help="Local port of this SuperNode (one per SuperNode on a machine).")] = 9094,
    max_wait: Annotated[float, typer.Option(help="Give up after this many seconds without a SuperLink (0: never).")] = 60.0,
    show: Annotated[bool, typer.Option("--print", help="Print the command instead of running it.")] = False,
) -> None:
    """Start flower-supernode for this site over TLS with node authentication (foreground).

    The site's privacy policy (budget, δ, non-private runs) is set here, at the site; a run
    config can only ask for less.
    """
    for name, value in (("--ledger-path", ledger_path), ("--epsilon-budget", epsilon_budget)):
        if value is None:
            _fail(f"{name} is required: a site keeps its own privacy ledger and budget, whatever the server asks")
    try:
        about = check_site_data(data_path, items_path)
        config = node_config(str(data_path.resolve()), site_id, str(ledger_path.resolve()), epsilon_budget,
                             str(items_path.resolve()) if items_path else None,
                             str(state_dir.resolve()) if state_dir else None, delta, allow_non_private)
        cmd = supernode_command(superlink, ca, key, port, config, max_wait or None)
    except DeployError as err:
        _fail(str(err))
    if not show:
        typer.echo(f"site {site_id}: {about}", err=True)
    _exec(cmd, deploy_env(ledger_path.resolve().parent / ".flwr"), show)


@app.command("run")
def run_cmd(
    home: HomeOpt,
    config: Annotated[Path, typer.Option("--config", help="Run-config TOML; its out-dir is where results go (server side).")],
    name: Annotated[str, typer.Option(help="Connection name.")] = "fedenc",
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
) -> None:
    """Run fedenc on the federation in the foreground (flwr run . NAME); non-zero exit on failure."""
    from common.config import ConfigError, Settings, load_config_file

    try:
        settings = Settings.from_config(load_config_file(config))
    except ConfigError as err:
        _fail(str(err))
    if not settings["out-dir"]:
        _fail(f"{config}: set out-dir (a folder on the server machine) so the run's results can be found")
    try:
        summary = run_federation(name, config, settings["out-dir"], deploy_env(home), timeout)
    except DeployError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"done in {summary['wall_seconds']:.0f}s: NDCG@10 {summary['final']['ndcg@10']:.4f}, "
               f"ε {summary['epsilon']:.3f}; results in {settings['out-dir']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

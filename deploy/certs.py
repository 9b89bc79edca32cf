"""TLS certificates for the SuperLink and the sites' node-authentication keys, made and checked."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from deploy import DeployError


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


def need_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DeployError(f"{what} {path} does not exist")
    return path.resolve()


def check_certs(certs: str | Path) -> dict[str, Path]:
    certs = Path(certs)
    return {
        "ca": need_file(certs / "ca.crt", "CA certificate"),
        "cert": need_file(certs / "server.pem", "SuperLink certificate"),
        "key": need_file(certs / "server.key", "SuperLink private key"),
    }


def check_private_key(path: str | Path) -> Path:
    """The key file exists and is an EC private key in OpenSSH format (what flower-supernode reads)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = need_file(path, "SuperNode private key")
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        raise DeployError(f"{path} is not an OpenSSH private key ({err}); make one with `fedenc deploy keys`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{path} is not an EC (NIST curve) key; make one with `fedenc deploy keys`")
    return path


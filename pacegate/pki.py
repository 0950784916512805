"""pacegate's PKI: a device CA, service identities, device enrolment and revocation.

Everything is written under one PKI directory whose file names are fixed by
:class:`pacegate.layout.PkiLayout`. The recipes:

- CA: ECDSA P-256 (what ESP32-class TLS stacks and Mosquitto both accept), ten years,
  ``basicConstraints CA:TRUE pathlen:0`` and ``keyCertSign, cRLSign`` (both critical).
- Broker: ``serverAuth``; SANs cover the broker's host names and addresses.
- Gateway: ``clientAuth``, CN ``gateway`` (the only identity allowed on ``pacemakers/#``).
- Device: ``clientAuth``, CN = device id and SAN URI ``urn:pacegate:device:<id>``, short
  validity (90 days by default); a fresh 32-byte PSK from the OS CSPRNG, in the device's
  bundle and in the gateway's encrypted PSK store; the device's counter file
  (``counter.state``), which the device never creates itself.
- Re-key (``pki rekey-device``): the only recovery from a lost or damaged counter file: a new
  PSK in the store and the bundle (the old one gone from both) and a counter file starting
  above every counter an earlier PSK can have used.
- CRL: regenerated on every revocation (``crl.pem``); brokers watch it.
- ML-DSA-65 identities for the post-quantum channel (``channel/<name>.mldsa.{key,pub}``).
- Mosquitto: ``mosquitto/acl`` and ``mosquitto/pacegate.conf`` for Debian's mosquitto, the
  dynamic-security plugin's file, and ``mosquitto-admin`` (``clientAuth``), the identity
  ``pki revoke`` uses to close a revoked device's live session (:mod:`pacegate.mosquitto_admin`).

Private keys and PSKs are written 0600 and never printed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import grp
import json
import os
import pwd
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pacegate import counterfile
from pacegate.errors import PacegateError
from pacegate.identity import MOSQUITTO_ADMIN_ID, device_san_uri, validate_device_id
from pacegate.keystore import PskStore
from pacegate.layout import (
    DEFAULT_HOST,
    DEFAULT_MQTTS_PORT,
    SECRET_DIR_MODE,
    SECRET_FILE_MODE,
    PkiLayout,
    write_public,
    write_secret,
)
from pacegate.mosquitto_admin import (
    find_plugin,
    initial_dynsec_config,
)
from pacegate.sealed import PSK_SIZE
from pacegate.tlsconf import TLS12_CIPHERS

P = ParamSpec("P")
R = TypeVar("R")

CA_VALIDITY = timedelta(days=3650)
SERVICE_VALIDITY = timedelta(days=825)  # the CA/B forum's old ceiling for server certificates
DEFAULT_DEVICE_DAYS = 90  # short: a stolen device certificate ages out on its own
CLOCK_SKEW = timedelta(minutes=5)  # device clocks drift; back-date notBefore a little
# A CRL past its nextUpdate makes OpenSSL refuse *every* client: keep it long, and it is
# re-signed on every revocation anyway.
CRL_VALIDITY = timedelta(days=365)
DEFAULT_BROKER_HOSTS = ("localhost", "127.0.0.1", "::1")
CHANNEL_IDENTITIES = ("hospital", "gateway", "cloud")
GATEWAY_ID = "gateway"
SERVICE_SAN_PREFIX = "urn:pacegate:service:"
REGISTRY_VERSION = 1


class PkiError(PacegateError, ValueError):
    """A PKI operation cannot be done as asked (unknown or duplicate id, missing CA...)."""


# ---------------------------------------------------------------------------------------
# certificate recipes
# ---------------------------------------------------------------------------------------
def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacegate"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass(frozen=True)
class _Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _make_ca(cn: str = "pacegate device CA") -> _Ca:
    key = _new_key()
    now = _now()
    name = _name(cn)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _Ca(key, cert)


def _load_ca(layout: PkiLayout) -> _Ca:
    if not layout.ca_cert.exists() or not layout.ca_key.exists():
        raise PkiError(
            f"{layout.root}: no CA here (missing {layout.ca_cert.name} or {layout.ca_key.name}); "
            f"run 'pacegate pki init --dir {layout.root}' first"
        )
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{layout.ca_key}: not an ECDSA private key")
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    return _Ca(key, cert)


def _issue(
    ca: _Ca,
    key: ec.EllipticCurvePrivateKey,
    cn: str,
    *,
    eku: x509.ObjectIdentifier | Sequence[x509.ObjectIdentifier],
    sans: Sequence[x509.GeneralName],
    not_before: datetime,
    not_after: datetime,
    serial: int | None = None,
) -> x509.Certificate:
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([eku] if isinstance(eku, x509.ObjectIdentifier) else list(eku)),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def _host_sans(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


# ---------------------------------------------------------------------------------------
# registry (enrolled devices, serials, status) and CRL
# ---------------------------------------------------------------------------------------
def _load_registry(layout: PkiLayout) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(layout.registry.read_text())
    except FileNotFoundError:
        raise PkiError(
            f"{layout.registry}: registry not found; run 'pacegate pki init --dir {layout.root}'"
        ) from None
    except json.JSONDecodeError as exc:
        raise PkiError(
            f"{layout.registry}: not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    data.setdefault("devices", {})
    return data


def _save_registry(layout: PkiLayout, data: dict[str, Any]) -> None:
    write_public(layout.registry, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _write_crl(layout: PkiLayout, ca: _Ca, registry: dict[str, Any]) -> None:
    """Re-sign the CRL from the registry. ``thisUpdate`` strictly increases, so a verifier
    holding an older CRL of the same issuer always prefers this one."""
    now = _now()
    last = registry.get("crl_last_update")
    if last is not None:
        prev = datetime.fromisoformat(last)
        if now <= prev:
            now = prev + timedelta(seconds=1)
    number = int(registry.get("crl_number", 0)) + 1
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    for entry in registry["devices"].values():
        if entry["status"] == "revoked":
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"], 16))
                .revocation_date(datetime.fromisoformat(entry["revoked_at"]))
                .build()
            )
    crl = builder.sign(ca.key, hashes.SHA256())
    registry["crl_number"] = number
    registry["crl_last_update"] = now.isoformat()
    write_public(layout.crl, crl.public_bytes(serialization.Encoding.PEM))


def revoked_serials(crl_path: Path) -> frozenset[int]:
    """The serial numbers a PEM CRL revokes (used by the broker's live revocation)."""
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    return frozenset(r.serial_number for r in crl)


# ---------------------------------------------------------------------------------------
# Mosquitto
# ---------------------------------------------------------------------------------------
def mosquitto_acl(registry: dict[str, Any]) -> str:
    """The ACL for Debian's mosquitto, with ``use_identity_as_username`` (username = CN)."""
    lines = [
        "# pacegate ACL for mosquitto (written by 'pacegate pki'; do not edit by hand).",
        "# The username is the client certificate's CN (use_identity_as_username true).",
        "",
        "# Only the gateway identity may subscribe to the telemetry tree.",
        f"user {GATEWAY_ID}",
        "topic read pacemakers/#",
        "",
        "# Only 'pacegate pki revoke' (its mosquitto-admin certificate) commands the",
        "# dynamic-security plugin, which closes a revoked device's live session.",
        f"user {MOSQUITTO_ADMIN_ID}",
        "topic readwrite $CONTROL/dynamic-security/#",
        "",
    ]
    revoked = sorted(d for d, e in registry["devices"].items() if e["status"] == "revoked")
    for did in revoked:
        # Belt and braces: the CRL stops new handshakes and 'pki revoke' closes the live
        # session; this denies a session still open everything once mosquitto reloads.
        lines += [
            f"# revoked {registry['devices'][did]['revoked_at']}",
            f"user {did}",
            "topic deny #",
            "",
        ]
    lines += [
        "# Every device publishes on its own topic only and subscribes to nothing.",
        "pattern write pacemakers/%u/telemetry",
        "",
    ]
    return "\n".join(lines)


# The account Debian's mosquitto drops to when started as root (its package creates it).
MOSQUITTO_ACCOUNT = "mosquitto"
# A root-owned PKI run by that account: its group may pass through (no read: no listing),
# others nothing.
PKI_DIR_MODE_FOR_MOSQUITTO = 0o710


def mosquitto_run_user(layout: PkiLayout) -> str | None:
    """The account mosquitto runs as once it drops root (its ``user`` line).

    Mosquitto started as root switches to ``user`` right after reading its configuration
    (src/mosquitto.c, ``drop_privileges``), before it opens the key, CRL, ACL, pid file or
    persistence directory; started as anyone else it ignores the line. So: the owner of the
    PKI directory, who can read all of them; for a PKI owned by root, the unprivileged
    ``mosquitto`` account, to which :func:`_grant_mosquitto_access` gives exactly what it
    needs (never ``user root``: a network daemon holding root). None: no such account, and
    mosquitto would fall back to ``nobody``, which can read nothing of a root-owned PKI.
    """
    try:
        owner = pwd.getpwuid(layout.root.stat().st_uid).pw_name
    except (KeyError, FileNotFoundError):
        return None
    if owner != "root":
        return owner
    try:
        pwd.getpwnam(MOSQUITTO_ACCOUNT)
    except KeyError:
        return None
    return MOSQUITTO_ACCOUNT


def mosquitto_cannot_reach(layout: PkiLayout) -> Path | None:
    """The first directory above the PKI that the account of :func:`mosquitto_run_user`
    may not search, when mosquitto is started as root (so drops to it); else None.

    Mosquitto drops root before it opens a single certificate, so such a directory (a 0700
    home, pytest's base temporary directory) makes it fail with "Unable to load CA
    certificates", naming neither the account nor the directory."""
    if os.geteuid() != 0:
        return None
    user = mosquitto_run_user(layout)
    if user is None or user == "root":
        return None
    account = pwd.getpwnam(user)
    groups = {account.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    for directory in (layout.root.resolve(), *layout.root.resolve().parents):
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return directory
    return None


def _grant_mosquitto_access(layout: PkiLayout) -> None:
    """A root-owned PKI, run by the ``mosquitto`` account: it owns its own directory (pid
    file, persistence, the plugin's file) and the broker key (still 0600); the PKI
    directory lets its group through (0710, no listing), so it reaches the public CA, CRL and
    broker certificate. Every other key and PSK stays root's, unreadable to it."""
    if os.geteuid() != 0 or layout.root.stat().st_uid != 0:
        return
    try:
        account = pwd.getpwnam(MOSQUITTO_ACCOUNT)
    except KeyError:
        return
    uid, gid = account.pw_uid, account.pw_gid
    os.chown(layout.root, 0, gid)
    os.chmod(layout.root, PKI_DIR_MODE_FOR_MOSQUITTO)
    for path in (layout.mosquitto_dir, layout.mosquitto_dir / "data", layout.mosquitto_dynsec):
        if path.exists():
            os.chown(path, uid, gid)
    for item in (layout.mosquitto_dir / "data").iterdir():
        os.chown(item, uid, gid)
    if layout.broker_key.exists():
        os.chown(layout.broker_key, uid, gid)


def mosquitto_conf(
    layout: PkiLayout,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_MQTTS_PORT,
    acl_file: Path | None = None,
    extra: Sequence[str] = (),
) -> str:
    """A Mosquitto 2 configuration giving pacegate's guarantees (absolute paths)."""
    root = layout.root.resolve()
    lay = PkiLayout(root)
    acl = (acl_file or lay.mosquitto_dir / "acl").resolve()
    user = mosquitto_run_user(lay)
    plugin = find_plugin()
    lines = [
        "# pacegate: Mosquitto 2 configuration (written by 'pacegate pki'). Reload: SIGHUP;",
        "# 'pacegate pki revoke' reloads it and closes the revoked device's live session.",
        (
            f"user {user}"
            if user
            else f"# no 'user' line: no account to drop root to (create '{MOSQUITTO_ACCOUNT}')"
        ),
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {acl}",
        # how 'pacegate pki revoke' finds the running broker (and the process to SIGHUP)
        f"pid_file {lay.mosquitto_pid}",
        "max_packet_size 4096",
        # No retained messages: a device's retained PUBLISH closes its connection (MQTT
        # 5: DISCONNECT 0x9A; src/handle_publish.c), so nothing a device (or a revoked
        # one) leaves behind is pushed to the next subscriber. No pacegate client retains.
        "retain_available false",
        # Sessions and queued QoS 1 messages survive a broker restart (the payloads are
        # sealed readings: nothing rests on disk in clear), and a gateway away for a while
        # finds its backlog: mosquitto's default queue of 1,000 is minutes of a ward.
        "persistence true",
        f"persistence_location {lay.mosquitto_dir / 'data'}/",
        # Mosquitto PUBACKs at once and snapshots its memory every N s (fsynced); a kill -9
        # loses what the gateway had not acknowledged since. 1 s: ~1 s of readings at no
        # measured cost; autosave_on_changes loses none but caps at ~500 msg/s
        # (docs/pki-and-broker.md, "Mosquitto under kill -9").
        "autosave_interval 1",
        "max_queued_messages 100000",
        # The dynamic-security plugin only so that 'pki revoke' can kick a live session
        # (disableClient); it defers every ACL decision to acl_file (pacegate.mosquitto_admin).
        *(
            [f"plugin {plugin}", f"plugin_opt_config_file {lay.mosquitto_dynsec}"]
            if plugin
            else ["# dynamic-security plugin not found: a revoked live session stays open"]
        ),
        "",
        f"listener {port} {host}",
        "protocol mqtt",
        "max_connections 10000",
        f"cafile {lay.ca_cert}",
        f"certfile {lay.broker_cert}",
        f"keyfile {lay.broker_key}",
        f"crlfile {lay.crl}",
        # TLS 1.2 at least (1.3 still negotiated); 1.2 suites: ECDHE + AEAD only, the same
        # list as the embedded broker's (mosquitto's default list has CBC and SHA-1 suites)
        "tls_version tlsv1.2",
        f"ciphers {TLS12_CIPHERS}",
        "require_certificate true",
        # The username is the certificate's CN, and the client id is then overwritten with
        # the username (mosquitto 2.0.11 src/handle_connect.c, handle__connect): whatever id
        # a device claims, its session is its own CN's, so it can take over no one else's.
        "use_identity_as_username true",
        "use_username_as_clientid true",
        *extra,
        "",
    ]
    return "\n".join(lines)


def _ensure_mosquitto_admin(layout: PkiLayout, ca: _Ca) -> None:
    """Issue the ``mosquitto-admin`` identity if it is missing (a PKI made before
    'pki revoke' closed live mosquitto sessions has none; revoking issues it then)."""
    if layout.mosquitto_admin_cert.exists() and layout.mosquitto_admin_key.exists():
        return
    now = _now()
    key = _new_key()
    cert = _issue(
        ca,
        key,
        MOSQUITTO_ADMIN_ID,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[x509.UniformResourceIdentifier(SERVICE_SAN_PREFIX + MOSQUITTO_ADMIN_ID)],
        not_before=now - CLOCK_SKEW,
        not_after=now + SERVICE_VALIDITY,
    )
    write_secret(layout.mosquitto_admin_key, _key_pem(key))
    write_public(layout.mosquitto_admin_cert, _cert_pem(cert))


def _write_mosquitto_files(layout: PkiLayout, registry: dict[str, Any]) -> None:
    (layout.mosquitto_dir / "data").mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
    write_public(layout.mosquitto_dir / "acl", mosquitto_acl(registry).encode())
    write_public(layout.mosquitto_dir / "pacegate.conf", mosquitto_conf(layout).encode())
    if not layout.mosquitto_dynsec.exists():  # mosquitto owns it from then on
        write_public(layout.mosquitto_dynsec, initial_dynsec_config().encode())
    _grant_mosquitto_access(layout)


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------
def add_channel_identity(root: Path, name: str) -> tuple[Path, Path]:
    """Create an ML-DSA-65 identity ``channel/<name>.mldsa.{key,pub}`` (key 0600)."""
    layout = PkiLayout(Path(root))
    if not name or not name.replace("-", "").replace("_", "").isalnum() or name != name.lower():
        raise PkiError(f"channel identity name {name!r}: use lower-case letters, digits, - and _")
    key = mldsa.MLDSA65PrivateKey.generate()
    write_secret(
        layout.channel_key(name),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_public(
        layout.channel_pub(name),
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return layout.channel_key(name), layout.channel_pub(name)


def issue_cluster_identities(
    directory: Path, names: Sequence[str], *, hosts: Sequence[str] = DEFAULT_BROKER_HOSTS
) -> dict[str, tuple[Path, Path]]:
    """A compute cluster's own CA (``directory/ca.{crt,key}``, made if missing) and one
    identity per name (``directory/<name>.{crt,key}``, keys 0600), each ``serverAuth`` and
    ``clientAuth``: a Dask scheduler and its workers both listen and connect.

    Not the device CA: Dask admits any certificate its CA signed and checks no name
    (distributed/security.py, ``check_hostname = False``: "We expect a dedicated CA for
    the cluster"), and a cluster member can run code on the others, so a device
    certificate must not be one. Returns ``{name: (cert, key)}``."""
    directory = Path(directory)
    directory.mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
    ca_cert, ca_key = directory / "ca.crt", directory / "ca.key"
    if ca_cert.exists() and ca_key.exists():
        ca = _load_ca(PkiLayout(directory))
    else:
        ca = _make_ca("pacegate cluster CA")
        write_secret(ca_key, _key_pem(ca.key))
        write_public(ca_cert, _cert_pem(ca.cert))
    now = _now()
    out: dict[str, tuple[Path, Path]] = {}
    for name in names:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise PkiError(f"cluster identity name {name!r}: use letters, digits, - and _")
        key = _new_key()
        cert = _issue(
            ca,
            key,
            name,
            eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
            sans=[*_host_sans(hosts), x509.UniformResourceIdentifier(SERVICE_SAN_PREFIX + name)],
            not_before=now - CLOCK_SKEW,
            not_after=now + SERVICE_VALIDITY,
        )
        out[name] = (directory / f"{name}.crt", directory / f"{name}.key")
        write_secret(out[name][1], _key_pem(key))
        write_public(out[name][0], _cert_pem(cert))
    return out


def init_pki(
    root: Path, *, force: bool = False, broker_hosts: Sequence[str] | None = None
) -> PkiLayout:
    """Create the CA, broker and gateway identities, empty CRL, registry, PSK store,
    PQ-channel identities and Mosquitto files. Refuses to replace a CA unless ``force``."""
    layout = PkiLayout(Path(root))
    if layout.ca_key.exists() or layout.ca_cert.exists():
        if not force:
            raise PkiError(
                f"{layout.ca_cert}: a CA already exists; refusing to overwrite it "
                "(use --force to destroy it and every identity it issued)"
            )
        for sub in (
            layout.devices_dir,
            layout.keystore_dir,
            layout.channel_dir,
            layout.mosquitto_dir,
        ):
            shutil.rmtree(sub, ignore_errors=True)
        for f in (layout.registry, layout.crl, layout.mosquitto_admin_cert):
            f.unlink(missing_ok=True)
    layout.root.mkdir(parents=True, exist_ok=True)
    os.chmod(layout.root, SECRET_DIR_MODE)
    hosts = list(broker_hosts) if broker_hosts else list(DEFAULT_BROKER_HOSTS)

    ca = _make_ca()
    write_secret(layout.ca_key, _key_pem(ca.key))
    write_public(layout.ca_cert, _cert_pem(ca.cert))
    now = _now()
    for cn, cert_path, key_path, eku, sans in (
        (
            "broker",
            layout.broker_cert,
            layout.broker_key,
            ExtendedKeyUsageOID.SERVER_AUTH,
            _host_sans(hosts),
        ),
        (
            GATEWAY_ID,
            layout.gateway_cert,
            layout.gateway_key,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            [x509.UniformResourceIdentifier(SERVICE_SAN_PREFIX + GATEWAY_ID)],
        ),
    ):
        key = _new_key()
        cert = _issue(
            ca,
            key,
            cn,
            eku=eku,
            sans=sans,
            not_before=now - CLOCK_SKEW,
            not_after=now + SERVICE_VALIDITY,
        )
        write_secret(key_path, _key_pem(key))
        write_public(cert_path, _cert_pem(cert))

    _ensure_mosquitto_admin(layout, ca)
    layout.devices_dir.mkdir(exist_ok=True)
    layout.keystore_dir.mkdir(mode=SECRET_DIR_MODE, exist_ok=True)
    PskStore.create(layout.psk_store, layout.psk_store_key)
    registry: dict[str, Any] = {"version": REGISTRY_VERSION, "broker_hosts": hosts, "devices": {}}
    _write_crl(layout, ca, registry)
    _save_registry(layout, registry)
    layout.channel_dir.mkdir(mode=SECRET_DIR_MODE, exist_ok=True)
    for name in CHANNEL_IDENTITIES:
        add_channel_identity(layout.root, name)
    _write_mosquitto_files(layout, registry)
    return layout


@contextlib.contextmanager
def _pki_lock(layout: PkiLayout) -> Iterator[None]:
    """Serialise changes to one PKI directory: enrol and revoke read, modify and write the
    registry, the PSK store and the CRL, and two at once would lose one's changes."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.root / ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _locked(func: Callable[Concatenate[Path, P], R]) -> Callable[Concatenate[Path, P], R]:
    """Run a PKI change under the lock of the directory given as its first argument."""

    @functools.wraps(func)
    def under_lock(root: Path, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with _pki_lock(PkiLayout(Path(root))):
            return func(root, *args, **kwargs)

    return under_lock


def _write_new_secret(path: Path, data: bytes) -> None:
    """Create a new 0600 file (bulk enrolment: no fsync per file, the store is fsynced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@_locked
def enroll_devices(
    root: Path,
    ids: Iterable[str],
    *,
    days: int = DEFAULT_DEVICE_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> list[Path]:
    """Enroll many devices with one registry write and one PSK-store write.
    Returns each device's bundle directory, in order."""
    layout = PkiLayout(Path(root))
    wanted = list(ids)
    for did in wanted:
        try:
            validate_device_id(did)
        except ValueError as exc:
            raise PkiError(str(exc)) from None
    if len(set(wanted)) != len(wanted):
        dupes = sorted({d for d in wanted if wanted.count(d) > 1})
        raise PkiError(f"device id(s) given twice: {', '.join(dupes)}")
    if days < 1:
        raise PkiError(f"--days must be at least 1, got {days}")
    ca = _load_ca(layout)
    registry = _load_registry(layout)
    store = PskStore.load(layout.psk_store, layout.psk_store_key)
    for did in wanted:
        known = did in registry["devices"] or did in store
        if not known and layout.device_dir(did).exists():
            raise PkiError(
                f"{layout.device_dir(did)} exists but {did!r} is not in {layout.registry}: "
                "an enrolment was interrupted; remove that directory and enroll again"
            )
        if known:
            raise PkiError(
                f"device {did!r} is already enrolled in {layout.root} "
                "(revoke it and enroll under a new id)"
            )
    now = _now()
    nb = not_before if not_before is not None else now - CLOCK_SKEW
    na = not_after if not_after is not None else now + timedelta(days=days)
    if na <= nb:
        raise PkiError("certificate notAfter must be later than notBefore")
    out = []
    for did in wanted:
        key = _new_key()
        cert = _issue(
            ca,
            key,
            did,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            sans=[x509.UniformResourceIdentifier(device_san_uri(did))],
            not_before=nb,
            not_after=na,
        )
        psk = os.urandom(PSK_SIZE)
        ddir = layout.device_dir(did)
        ddir.mkdir(mode=SECRET_DIR_MODE, parents=True)
        _write_new_secret(ddir / "device.key", _key_pem(key))
        _write_new_secret(ddir / "device.psk", psk)
        (ddir / "device.crt").write_bytes(_cert_pem(cert))
        # The counter file exists from the start: a device that finds none has lost it, and
        # must never guess "start again at 1" under its PSK.
        _write_new_secret(
            layout.device_counter(did), counterfile.render(did, counterfile.first_ceiling(0))
        )
        store.add(did, psk)
        registry["devices"][did] = {
            "serial": format(cert.serial_number, "x"),
            "status": "active",
            "not_before": nb.isoformat(),
            "not_after": na.isoformat(),
            "enrolled_at": now.isoformat(),
            "revoked_at": None,
            "psk_generation": 0,
        }
        out.append(ddir)
    store.save()
    _save_registry(layout, registry)
    return out


def enroll_device(
    root: Path,
    device_id: str,
    *,
    days: int = DEFAULT_DEVICE_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Path:
    """Issue one device's certificate, key and fresh PSK; returns its bundle directory."""
    return enroll_devices(root, [device_id], days=days, not_before=not_before, not_after=not_after)[
        0
    ]


@_locked
def revoke_device(root: Path, device_id: str) -> None:
    """Revoke a device: CRL re-signed, PSK-store entry marked revoked, Mosquitto ACL updated."""
    layout = PkiLayout(Path(root))
    try:
        validate_device_id(device_id)
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    ca = _load_ca(layout)
    registry = _load_registry(layout)
    entry = registry["devices"].get(device_id)
    if entry is None:
        raise PkiError(f"device {device_id!r} is not enrolled in {layout.root}")
    if entry["status"] == "revoked":
        raise PkiError(f"device {device_id!r} was already revoked at {entry['revoked_at']}")
    entry["status"] = "revoked"
    entry["revoked_at"] = _now().isoformat()
    store = PskStore.load(layout.psk_store, layout.psk_store_key)
    if device_id in store:
        store.revoke(device_id)
        store.save()
    _write_crl(layout, ca, registry)
    _save_registry(layout, registry)
    _ensure_mosquitto_admin(layout, ca)
    _write_mosquitto_files(layout, registry)


@_locked
def rekey_device(root: Path, device_id: str) -> Path:
    """Give an active device a new PSK and a fresh counter file; returns its bundle directory.

    The recovery for a missing, damaged or rolled-back ``counter.state``: the counters start
    again, but under a key no counter was ever used with. Order matters for a crash: the
    registry's generation, the gateway's store, the bundle's PSK, and the counter file last,
    so that a counter file is never reset while the device could still seal under the old PSK
    (a crash part-way leaves a device the gateway refuses, fixed by running the command
    again, which moves on to the next generation).
    """
    layout = PkiLayout(Path(root))
    try:
        validate_device_id(device_id)
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    registry = _load_registry(layout)
    entry = registry["devices"].get(device_id)
    if entry is None:
        raise PkiError(f"device {device_id!r} is not enrolled in {layout.root}")
    if entry["status"] == "revoked":
        raise PkiError(
            f"device {device_id!r} was revoked at {entry['revoked_at']}; a revoked device "
            "is never re-keyed (enroll it under a new id)"
        )
    generation = int(entry.get("psk_generation", 0)) + 1
    try:
        ceiling = counterfile.first_ceiling(generation)
    except ValueError as exc:
        raise PkiError(f"device {device_id!r}: {exc}") from None
    store = PskStore.load(layout.psk_store, layout.psk_store_key)
    if device_id not in store:
        raise PkiError(
            f"device {device_id!r} is in {layout.registry} but not in {layout.psk_store}: "
            "revoke it and enroll a new id"
        )
    # The generation is recorded first: after a crash anywhere below, the next re-key moves
    # on to a higher counter range, never back to one a device may already have used.
    entry["psk_generation"] = generation
    entry["rekeyed_at"] = _now().isoformat()
    _save_registry(layout, registry)
    psk = os.urandom(PSK_SIZE)
    store.rekey(device_id, psk)
    store.save()
    write_secret(layout.device_psk(device_id), psk)
    counterfile.write(layout.device_counter(device_id), device_id, ceiling)
    return layout.device_dir(device_id)


def device_ids(root: Path, *, status: str | None = None) -> list[str]:
    """Enrolled device ids (optionally only ``active`` or ``revoked`` ones)."""
    registry = _load_registry(PkiLayout(Path(root)))
    return sorted(d for d, e in registry["devices"].items() if status in (None, e["status"]))


def next_device_ids(root: Path, count: int, prefix: str) -> list[str]:
    """``count`` ids ``PREFIX0001``, ... after the highest number already enrolled under
    ``prefix`` (revoked ids stay taken: a certificate's CN is never reissued)."""
    taken = 0
    for did in _load_registry(PkiLayout(Path(root)))["devices"]:
        tail = did[len(prefix) :] if did.startswith(prefix) else ""
        if tail.isdigit():
            taken = max(taken, int(tail))
    return [f"{prefix}{n:04d}" for n in range(taken + 1, taken + count + 1)]

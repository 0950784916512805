"""The PKI's operations: create it, enrol, revoke and re-key devices, add channel identities.

- Broker: ``serverAuth``; SANs cover the broker's host names and addresses.
- Gateway: ``clientAuth``, CN ``gateway`` (the only identity allowed on ``pacemakers/#``).
- Device: ``clientAuth``, CN = device id and SAN URI ``urn:pacegate:device:<id>``, short
  validity (90 days by default); a fresh 32-byte PSK from the OS CSPRNG, in the device's
  bundle and in the gateway's encrypted PSK store; the device's counter file
  (``counter.state``), which the device never creates itself.
- Re-key (``pki rekey-device``): the only recovery from a lost or damaged counter file: a new
  PSK in the store and the bundle (the old one gone from both) and a counter file starting
  above every counter an earlier PSK can have used.
- ``mosquitto-admin`` (``clientAuth``): the identity ``pki revoke`` uses to close a revoked
  device's live session on mosquitto.
- ML-DSA-65 identities for the post-quantum channel (``channel/<name>.mldsa.{key,pub}``).

Every change runs under the PKI directory's lock (:func:`pacegate.pki.registry.locked`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from pacegate import counterfile
from pacegate.identity import (
    GATEWAY_ID,
    MOSQUITTO_ADMIN_ID,
    device_san_uri,
    validate_device_id,
    validate_identity_name,
)
from pacegate.keystore import PskStore
from pacegate.layout import (
    SECRET_DIR_MODE,
    SECRET_FILE_MODE,
    PkiLayout,
    write_public,
    write_secret,
)
from pacegate.pki.crl import write_crl
from pacegate.pki.errors import PkiError
from pacegate.pki.issue import (
    CLOCK_SKEW,
    DEFAULT_DEVICE_DAYS,
    SERVICE_VALIDITY,
    Ca,
    cert_pem,
    host_sans,
    issue_certificate,
    key_pem,
    load_ca,
    make_ca,
    new_key,
    utc_now,
)
from pacegate.pki.mosquitto import write_mosquitto_files
from pacegate.pki.registry import REGISTRY_VERSION, load_registry, locked, save_registry
from pacegate.sealed import PSK_SIZE

DEFAULT_BROKER_HOSTS = ("localhost", "127.0.0.1", "::1")

CHANNEL_IDENTITIES = ("hospital", "gateway", "cloud")

SERVICE_SAN_PREFIX = "urn:pacegate:service:"


def ensure_mosquitto_admin(layout: PkiLayout, ca: Ca) -> None:
    """Issue the ``mosquitto-admin`` identity if it is missing (a PKI made before
    'pki revoke' closed live mosquitto sessions has none; revoking issues it then)."""
    if layout.mosquitto_admin_cert.exists() and layout.mosquitto_admin_key.exists():
        return
    now = utc_now()
    key = new_key()
    cert = issue_certificate(
        ca,
        key,
        MOSQUITTO_ADMIN_ID,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[x509.UniformResourceIdentifier(SERVICE_SAN_PREFIX + MOSQUITTO_ADMIN_ID)],
        not_before=now - CLOCK_SKEW,
        not_after=now + SERVICE_VALIDITY,
    )
    write_secret(layout.mosquitto_admin_key, key_pem(key))
    write_public(layout.mosquitto_admin_cert, cert_pem(cert))


def add_channel_identity(root: Path, name: str) -> tuple[Path, Path]:
    """Create an ML-DSA-65 identity ``channel/<name>.mldsa.{key,pub}`` (key 0600)."""
    layout = PkiLayout(Path(root))
    try:
        validate_identity_name(name, "channel identity name")
    except ValueError as exc:
        raise PkiError(str(exc)) from None
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
        ca = load_ca(PkiLayout(directory))
    else:
        ca = make_ca("pacegate cluster CA")
        write_secret(ca_key, key_pem(ca.key))
        write_public(ca_cert, cert_pem(ca.cert))
    now = utc_now()
    out: dict[str, tuple[Path, Path]] = {}
    for name in names:
        try:
            validate_identity_name(name, "cluster identity name")
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        key = new_key()
        cert = issue_certificate(
            ca,
            key,
            name,
            eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
            sans=[*host_sans(hosts), x509.UniformResourceIdentifier(SERVICE_SAN_PREFIX + name)],
            not_before=now - CLOCK_SKEW,
            not_after=now + SERVICE_VALIDITY,
        )
        out[name] = (directory / f"{name}.crt", directory / f"{name}.key")
        write_secret(out[name][1], key_pem(key))
        write_public(out[name][0], cert_pem(cert))
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

    ca = make_ca()
    write_secret(layout.ca_key, key_pem(ca.key))
    write_public(layout.ca_cert, cert_pem(ca.cert))
    now = utc_now()
    for cn, cert_path, key_path, eku, sans in (
        (
            "broker",
            layout.broker_cert,
            layout.broker_key,
            ExtendedKeyUsageOID.SERVER_AUTH,
            host_sans(hosts),
        ),
        (
            GATEWAY_ID,
            layout.gateway_cert,
            layout.gateway_key,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            [x509.UniformResourceIdentifier(SERVICE_SAN_PREFIX + GATEWAY_ID)],
        ),
    ):
        key = new_key()
        cert = issue_certificate(
            ca,
            key,
            cn,
            eku=eku,
            sans=sans,
            not_before=now - CLOCK_SKEW,
            not_after=now + SERVICE_VALIDITY,
        )
        write_secret(key_path, key_pem(key))
        write_public(cert_path, cert_pem(cert))

    ensure_mosquitto_admin(layout, ca)
    layout.devices_dir.mkdir(exist_ok=True)
    layout.keystore_dir.mkdir(mode=SECRET_DIR_MODE, exist_ok=True)
    PskStore.create(layout.psk_store, layout.psk_store_key)
    registry: dict[str, Any] = {"version": REGISTRY_VERSION, "broker_hosts": hosts, "devices": {}}
    write_crl(layout, ca, registry)
    save_registry(layout, registry)
    layout.channel_dir.mkdir(mode=SECRET_DIR_MODE, exist_ok=True)
    for name in CHANNEL_IDENTITIES:
        add_channel_identity(layout.root, name)
    write_mosquitto_files(layout, registry)
    return layout


def _write_new_secret(path: Path, data: bytes) -> None:
    """Create a new 0600 file (bulk enrolment: no fsync per file, the store is fsynced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@locked
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
    ca = load_ca(layout)
    registry = load_registry(layout)
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
    now = utc_now()
    nb = not_before if not_before is not None else now - CLOCK_SKEW
    na = not_after if not_after is not None else now + timedelta(days=days)
    if na <= nb:
        raise PkiError("certificate notAfter must be later than notBefore")
    out = []
    for did in wanted:
        key = new_key()
        cert = issue_certificate(
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
        _write_new_secret(ddir / "device.key", key_pem(key))
        _write_new_secret(ddir / "device.psk", psk)
        (ddir / "device.crt").write_bytes(cert_pem(cert))
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
    save_registry(layout, registry)
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


@locked
def revoke_device(root: Path, device_id: str) -> None:
    """Revoke a device: CRL re-signed, PSK-store entry marked revoked, Mosquitto ACL updated."""
    layout = PkiLayout(Path(root))
    try:
        validate_device_id(device_id)
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    ca = load_ca(layout)
    registry = load_registry(layout)
    entry = registry["devices"].get(device_id)
    if entry is None:
        raise PkiError(f"device {device_id!r} is not enrolled in {layout.root}")
    if entry["status"] == "revoked":
        raise PkiError(f"device {device_id!r} was already revoked at {entry['revoked_at']}")
    entry["status"] = "revoked"
    entry["revoked_at"] = utc_now().isoformat()
    store = PskStore.load(layout.psk_store, layout.psk_store_key)
    if device_id in store:
        store.revoke(device_id)
        store.save()
    write_crl(layout, ca, registry)
    save_registry(layout, registry)
    ensure_mosquitto_admin(layout, ca)
    write_mosquitto_files(layout, registry)


@locked
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
    registry = load_registry(layout)
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
    entry["rekeyed_at"] = utc_now().isoformat()
    save_registry(layout, registry)
    psk = os.urandom(PSK_SIZE)
    store.rekey(device_id, psk)
    store.save()
    write_secret(layout.device_psk(device_id), psk)
    counterfile.write(layout.device_counter(device_id), device_id, ceiling)
    return layout.device_dir(device_id)

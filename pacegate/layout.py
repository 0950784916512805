"""Where files live: the PKI directory and a work directory. One module, so every
component agrees on names (the contract of ARCHITECTURE.md).

PKI directory (``pacegate pki init --dir DIR``)::

    ca.crt  ca.key  crl.pem  registry.json          the device CA, its CRL, enrolment registry
    broker.crt  broker.key                          the broker's TLS identity
    gateway.crt gateway.key                         the gateway's MQTT (TLS client) identity
    devices/<id>/device.crt device.key device.psk   a device's bundle (what is flashed on it)
    devices/<id>/counter.state                      the device's persisted nonce counter ("NVS")
    keystore/psk.store  keystore/psk.key            the gateway's PSK store, encrypted at rest
    keystore/psk.generation                         the store's newest generation (anti-rollback)
    channel/<name>.mldsa.key  channel/<name>.mldsa.pub   ML-DSA-65 identities for the PQ channel
                                                    (<name>: hospital, gateway, cloud)
    mosquitto/acl  mosquitto/pacegate.conf          what Debian's mosquitto needs
    mosquitto/dynamic-security.json  mosquitto/mosquitto.pid  (mosquitto writes both)
    mosquitto-admin.crt mosquitto-admin.key         'pki revoke' kicks a session with it

Work directory (``pacegate up|devices|analyze|demo --workdir DIR``)::

    pki/                         the PKI directory above
    broker.yaml gateway.yaml hospital.yaml cloud.yaml   service configs (written if missing)
    endpoints.json               where the running services listen (written by ``up``)
    gateway/                     replay state, spool
    hospital/                    readings.db, keyring.json
    logs/                        one log file per service started by ``up``/``demo``
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pacegate.identity import validate_device_id

# The default endpoints live in pacegate.ports (the one endpoint table); these names stay
# importable from here, as explicit re-exports, for the modules that take them from the layout.
from pacegate.ports import DEFAULT_CLOUD_PORT as DEFAULT_CLOUD_PORT
from pacegate.ports import DEFAULT_GATEWAY_METRICS_PORT as DEFAULT_GATEWAY_METRICS_PORT
from pacegate.ports import DEFAULT_HOSPITAL_PORT as DEFAULT_HOSPITAL_PORT
from pacegate.ports import DEFAULT_HOST as DEFAULT_HOST
from pacegate.ports import DEFAULT_MQTTS_PORT as DEFAULT_MQTTS_PORT

# Private keys, PSKs, keyrings: owner read/write only.
SECRET_FILE_MODE = 0o600
SECRET_DIR_MODE = 0o700
PUBLIC_FILE_MODE = 0o644  # certificates, CRL, public keys: meant to be read


@dataclass(frozen=True)
class PkiLayout:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def broker_cert(self) -> Path:
        return self.root / "broker.crt"

    @property
    def broker_key(self) -> Path:
        return self.root / "broker.key"

    @property
    def gateway_cert(self) -> Path:
        return self.root / "gateway.crt"

    @property
    def gateway_key(self) -> Path:
        return self.root / "gateway.key"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    @property
    def keystore_dir(self) -> Path:
        return self.root / "keystore"

    @property
    def psk_store(self) -> Path:
        return self.keystore_dir / "psk.store"

    @property
    def psk_store_key(self) -> Path:
        return self.keystore_dir / "psk.key"

    @property
    def channel_dir(self) -> Path:
        return self.root / "channel"

    @property
    def mosquitto_dir(self) -> Path:
        return self.root / "mosquitto"

    @property
    def mosquitto_admin_cert(self) -> Path:
        return self.root / "mosquitto-admin.crt"

    @property
    def mosquitto_admin_key(self) -> Path:
        return self.root / "mosquitto-admin.key"

    @property
    def mosquitto_pid(self) -> Path:
        return self.mosquitto_dir / "mosquitto.pid"

    @property
    def mosquitto_dynsec(self) -> Path:
        return self.mosquitto_dir / "dynamic-security.json"

    def device_dir(self, device_id: str) -> Path:
        return self.devices_dir / validate_device_id(device_id)

    def device_cert(self, device_id: str) -> Path:
        return self.device_dir(device_id) / "device.crt"

    def device_key(self, device_id: str) -> Path:
        return self.device_dir(device_id) / "device.key"

    def device_psk(self, device_id: str) -> Path:
        return self.device_dir(device_id) / "device.psk"

    def device_counter(self, device_id: str) -> Path:
        return self.device_dir(device_id) / "counter.state"

    def channel_key(self, name: str) -> Path:
        return self.channel_dir / f"{name}.mldsa.key"

    def channel_pub(self, name: str) -> Path:
        return self.channel_dir / f"{name}.mldsa.pub"


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a fresh temp file beside ``path`` (mkstemp: unique name, mode 0600
    from creation), fsync it, then rename it over ``path`` and fsync the directory. A crash
    leaves the old file or the new one, never a mix; two writers never share a temp file."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_secret(path: Path, data: bytes) -> None:
    """Atomically write a secret (key, PSK, keyring): mode 0600 from the first byte."""
    _atomic_write(path, data, SECRET_FILE_MODE)


def write_public(path: Path, data: bytes) -> None:
    """Atomically write a non-secret file (certificates, CRL, public keys)."""
    _atomic_write(path, data, PUBLIC_FILE_MODE)


def create_private(path: Path) -> None:
    """Create ``path`` (if missing) as an empty owner-only file, and make an existing one
    owner-only. SQLite gives its -wal and -shm files the database file's mode, and a log
    can hold device ids and peer addresses: neither is for other local users."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, SECRET_FILE_MODE))
    os.chmod(path, SECRET_FILE_MODE)


def open_private_log(path: Path) -> TextIO:
    """Open a service log for appending, owner-only (see :func:`create_private`)."""
    create_private(path)
    return open(path, "a")  # the caller closes it

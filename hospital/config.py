"""The schema of ``hospital.yaml`` (this module owns it; nothing else parses the file).

::

    listen:   {host: 127.0.0.1, port: 8884}           # PQ channel from the gateways
    identity: {name: hospital, key: pki/channel/hospital.mldsa.key}
    allowed_gateways:                                 # name -> pinned ML-DSA-65 public key
      gateway: pki/channel/gateway.mldsa.pub
    store:    {database: hospital/readings.db, keyring: hospital/keyring.json}
              # or, several ingest nodes on one PostgreSQL database (docs/scaling.md):
              # {backend: postgresql, dsn_file: hospital/pg.dsn, writer: hospital-1,
              #  keyring: hospital/keyring.json}
    metrics:  {host: 127.0.0.1, port: 9109}           # Prometheus text; port 0 picks one
    cloud:    {host: 127.0.0.1, port: 8885, server_name: cloud,
               server_key: pki/channel/cloud.mldsa.pub}
    analysis: {}                                      # owned by the analysis job

Relative paths resolve against the directory of ``hospital.yaml``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pacegate.configfile import ConfigSection, load_config
from pacegate.errors import ConfigError
from pacegate.identity import IDENTITY_NAME_RULE, is_identity_name
from pacegate.layout import PkiLayout
from pacegate.ports import (
    DEFAULT_CLOUD_PORT,
    DEFAULT_HOSPITAL_METRICS_PORT,
    DEFAULT_HOSPITAL_PORT,
    DEFAULT_HOST,
)
from pacegate.secretfile import read_secret

_TOP_KEYS = {"listen", "identity", "allowed_gateways", "store", "metrics", "cloud", "analysis"}
STORE_BACKENDS = ("sqlite", "postgresql")
# A writer id names an ingest node in every PostgreSQL row: short, and printable in reports.
WRITER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A DSN is one line; anything longer is not the file that was meant.
MAX_DSN_BYTES = 4096


@dataclass(frozen=True)
class PostgresStoreConfig:
    """``store:`` with ``backend: postgresql``: where the DSN is, and this node's writer."""

    config: Path  # hospital.yaml, for messages
    dsn_file: Path  # owner-only (0600): a libpq DSN, password included; never logged
    writer: str

    def read_dsn(self) -> str:
        """The DSN in :attr:`dsn_file`, refused unless the file is owner-only. Errors name
        the file and the fix, never the file's content."""
        path = self.dsn_file
        key = "store.dsn_file"
        raw = read_secret(
            path,
            "DSN file",
            key=key,
            missing_fix=f"write the libpq DSN (host=... dbname=... user=... password=...) into "
            f"the file {self.config} names, mode 0600: install -m 600 /dev/null {path}",
            max_bytes=MAX_DSN_BYTES,
        )
        try:
            dsn = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(path, key, "not UTF-8 text", fix="one line: the DSN") from None
        if not dsn or "\n" in dsn:
            raise ConfigError(path, key, "must hold exactly one line, the DSN", fix="one line")
        return dsn


@dataclass(frozen=True)
class CloudEndpoint:
    host: str
    port: int
    server_name: str
    server_key: Path


@dataclass(frozen=True)
class HospitalConfig:
    path: Path
    listen_host: str
    listen_port: int
    identity_name: str
    identity_key: Path
    allowed_gateways: dict[str, Path]
    database: Path | None  # the SQLite file; None with backend: postgresql
    keyring: Path
    # the chain head's anchor; with PostgreSQL, this node's writer's
    anchor: Path
    metrics_host: str
    metrics_port: int
    cloud: CloudEndpoint
    # the analysis job's own section, parsed by hospital.analysis.settings (not validated here)
    analysis: ConfigSection = field(repr=False, compare=False)
    # set with backend: postgresql (then the readings are not in ``database``)
    postgres: PostgresStoreConfig | None = None

    @property
    def sqlite_database(self) -> Path:
        """The SQLite file, for code that works on that backend only."""
        if self.database is None:
            raise ConfigError(
                self.path,
                "store.backend",
                "this hospital keeps its readings in PostgreSQL, not in an SQLite file",
                fix="use a hospital.yaml whose store is 'backend: sqlite'",
            )
        return self.database


def _port(section: ConfigSection, key: str, default: int, *, lo: int = 1) -> int:
    return int(section.get_int(key, default, lo=lo, hi=65535))  # plain int, not ruamel's


def _peer_name(section: ConfigSection, key: str, value: str) -> str:
    if not is_identity_name(value):
        raise section.error(
            key, f"{value!r} is not a valid identity name", fix=f"use {IDENTITY_NAME_RULE}"
        )
    return value


def _store(store: ConfigSection) -> tuple[Path | None, Path, Path, PostgresStoreConfig | None]:
    """``store:``: the backend, its location, the keyring and the anchor."""
    store.check_keys({"backend", "database", "keyring", "anchor", "dsn_file", "writer"})
    backend = str(store.get("backend", str, "sqlite"))
    if backend not in STORE_BACKENDS:
        raise store.error(
            "backend",
            f"{backend!r} is not a store backend",
            fix="'sqlite' (the default: one node, one file) or 'postgresql' (several nodes)",
        )
    keyring = store.get_path("keyring", required=True)
    # the chain head's anchor (hospital/anchor.py): unless placed elsewhere, beside the
    # database (SQLite) or the keyring (PostgreSQL: a node's own file), ideally on a volume
    # that a restore of the database does not touch
    anchor = store.get_path("anchor") if "anchor" in store.data else None
    if backend == "postgresql":
        if "database" in store.data:
            raise store.error(
                "database",
                "names an SQLite file, but backend is postgresql: the readings are in the "
                "server that dsn_file names",
                fix="remove 'database', or set 'backend: sqlite'",
            )
        dsn_file = store.get_path("dsn_file", required=True)
        writer = str(store.get("writer", str, required=True))
        if not WRITER_ID.fullmatch(writer):
            raise store.error(
                "writer",
                f"{writer!r} is not a writer id",
                fix="1-64 characters of letters, digits, '.', '_' or '-', one per ingest node",
            )
        if anchor is None:
            anchor = keyring.with_name(f"{writer}-anchor")
        if anchor.resolve() in (dsn_file.resolve(), keyring.resolve()):
            raise store.error("anchor", "is the DSN or keyring file", fix="use its own file")
        if dsn_file.resolve() == keyring.resolve():
            raise store.error("dsn_file", "is the keyring file", fix="use a file of its own")
        return None, keyring, anchor, PostgresStoreConfig(store.path, dsn_file, writer)
    for key in ("dsn_file", "writer"):
        if key in store.data:
            raise store.error(
                key, "is for 'backend: postgresql' only", fix=f"remove '{key}' (SQLite store)"
            )
    database = store.get_path("database", required=True)
    if keyring.resolve() == database.resolve():
        raise store.error("keyring", "is the database file", fix="use a separate keyring.json")
    if anchor is None:
        anchor = database.with_name(database.name + "-anchor")
    if anchor.resolve() in (database.resolve(), keyring.resolve()):
        raise store.error("anchor", "is the database or keyring file", fix="use its own file")
    return database, keyring, anchor, None


def load_hospital_config(
    path: str | Path, *, require_channel_files: bool = False
) -> HospitalConfig:
    """Parse ``hospital.yaml``. ``require_channel_files``: the identity key and every pinned
    gateway key must exist (the service needs them; rotate-key and verify do not)."""
    root = load_config(path)
    root.check_keys(_TOP_KEYS)

    listen = root.section("listen")
    listen.check_keys({"host", "port"})

    identity = root.section("identity", required=True)
    identity.check_keys({"name", "key"})
    name = _peer_name(identity, "name", str(identity.get("name", str, "hospital")))
    key = identity.get_path("key", required=True, must_exist=require_channel_files)

    gateways: dict[str, Path] = {}
    pins = root.section("allowed_gateways", required=True)
    for gw in pins.data:
        gw_name = _peer_name(pins, str(gw), str(gw))
        gateways[gw_name] = pins.get_path(str(gw), required=True, must_exist=require_channel_files)
    if not gateways:
        raise root.error(
            "allowed_gateways",
            "no gateway is enrolled: the hospital would refuse everyone",
            fix="add 'gateway: pki/channel/gateway.mldsa.pub'",
        )

    store = root.section("store", required=True)
    database, keyring, anchor, postgres = _store(store)

    metrics = root.section("metrics")
    metrics.check_keys({"host", "port"})

    cloud = root.section("cloud", required=True)
    cloud.check_keys({"host", "port", "server_name", "server_key"})
    cloud_ep = CloudEndpoint(
        host=str(cloud.get("host", str, DEFAULT_HOST)),
        port=_port(cloud, "port", DEFAULT_CLOUD_PORT),
        server_name=_peer_name(cloud, "server_name", str(cloud.get("server_name", str, "cloud"))),
        server_key=cloud.get_path("server_key", required=True),
    )

    return HospitalConfig(
        path=root.path,
        listen_host=str(listen.get("host", str, DEFAULT_HOST)),
        listen_port=_port(listen, "port", DEFAULT_HOSPITAL_PORT, lo=0),
        identity_name=name,
        identity_key=key,
        allowed_gateways=gateways,
        database=database,
        keyring=keyring,
        anchor=anchor,
        metrics_host=str(metrics.get("host", str, DEFAULT_HOST)),
        metrics_port=_port(metrics, "port", DEFAULT_HOSPITAL_METRICS_PORT, lo=0),
        cloud=cloud_ep,
        analysis=root.section("analysis"),
        postgres=postgres,
    )


def render_default_config(
    path: Path,
    *,
    pki: PkiLayout,
    data_dir: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_HOSPITAL_PORT,
    metrics_port: int = DEFAULT_HOSPITAL_METRICS_PORT,
    cloud_host: str = DEFAULT_HOST,
    cloud_port: int = DEFAULT_CLOUD_PORT,
) -> str:
    """The ``hospital.yaml`` to write at ``path``, as ``pacegate up``/``demo`` write it into a
    work directory: the store in ``data_dir``, paths relative to ``path``'s directory."""
    base = path.parent

    def rel(p: Path) -> str:
        return os.path.relpath(p, base)

    return f"""\
# pacegate hospital: PQ-channel ingest and the encrypted reading store.
# Relative paths resolve against this file's directory.
listen:
  host: {host}
  port: {port}
identity:
  name: hospital
  key: {rel(pki.channel_key("hospital"))}
allowed_gateways:          # only these ML-DSA-65 identities may open a session
  gateway: {rel(pki.channel_pub("gateway"))}
store:
  database: {rel(data_dir / "readings.db")}
  keyring: {rel(data_dir / "keyring.json")}   # mode 0600; back it up apart from the db
metrics:                   # Prometheus text, loopback only
  host: 127.0.0.1
  port: {metrics_port}
cloud:                     # where the analysis job sends CKKS batches
  host: {cloud_host}
  port: {cloud_port}
  server_name: cloud
  server_key: {rel(pki.channel_pub("cloud"))}
analysis: {{}}
"""

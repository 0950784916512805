"""The schema of ``hospital.yaml`` (this module owns it; nothing else parses the file).

::

    listen:   {host: 127.0.0.1, port: 8884}           # PQ channel from the gateways
    identity: {name: hospital, key: pki/channel/hospital.mldsa.key}
    allowed_gateways:                                 # name -> pinned ML-DSA-65 public key
      gateway: pki/channel/gateway.mldsa.pub
    store:    {database: hospital/readings.db, keyring: hospital/keyring.json}
    metrics:  {host: 127.0.0.1, port: 9109}           # Prometheus text; port 0 picks one
    cloud:    {host: 127.0.0.1, port: 8885, server_name: cloud,
               server_key: pki/channel/cloud.mldsa.pub}
    analysis: {}                                      # owned by the analysis job

Relative paths resolve against the directory of ``hospital.yaml``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pacegate.configfile import ConfigSection, load_config
from pacegate.identity import IDENTITY_NAME_RULE, is_identity_name
from pacegate.layout import (
    DEFAULT_CLOUD_PORT,
    DEFAULT_HOSPITAL_PORT,
    DEFAULT_HOST,
    PkiLayout,
)

DEFAULT_HOSPITAL_METRICS_PORT = 9109  # beside the gateway's 9108
_TOP_KEYS = {"listen", "identity", "allowed_gateways", "store", "metrics", "cloud", "analysis"}


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
    database: Path
    keyring: Path
    anchor: Path
    metrics_host: str
    metrics_port: int
    cloud: CloudEndpoint
    # the analysis job's own section, parsed by hospital.analysis (not validated here)
    analysis: ConfigSection = field(repr=False, compare=False)


def _port(section: ConfigSection, key: str, default: int, *, lo: int = 1) -> int:
    return int(section.get_int(key, default, lo=lo, hi=65535))  # plain int, not ruamel's


def _peer_name(section: ConfigSection, key: str, value: str) -> str:
    if not is_identity_name(value):
        raise section.error(
            key, f"{value!r} is not a valid identity name", fix=f"use {IDENTITY_NAME_RULE}"
        )
    return value


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
    store.check_keys({"database", "keyring", "anchor"})
    database = store.get_path("database", required=True)
    keyring = store.get_path("keyring", required=True)
    if keyring.resolve() == database.resolve():
        raise store.error("keyring", "is the database file", fix="use a separate keyring.json")
    # the chain head's anchor (hospital/anchor.py): beside the database unless placed
    # elsewhere, ideally on a volume that a restore of the database does not touch
    anchor = store.get_path("anchor") if "anchor" in store.data else None
    if anchor is None:
        anchor = database.with_name(database.name + "-anchor")
    if anchor.resolve() in (database.resolve(), keyring.resolve()):
        raise store.error("anchor", "is the database or keyring file", fix="use its own file")

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

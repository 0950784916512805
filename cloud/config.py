"""cloud.yaml: the CKKS worker's configuration. This module owns the schema::

    listen:
      host: 127.0.0.1
      port: 8885
    identity:                      # the worker's ML-DSA-65 channel identity
      name: cloud
      key: pki/channel/cloud.mldsa.key
    allowed_clients:               # pinned client identities: name -> ML-DSA public key
      hospital: pki/channel/hospital.mldsa.pub
    limits:
      max_batches: 1048576         # per session (bounds every slot under the CKKS modulus)

Relative paths resolve against the file's directory. The worker holds no CKKS key at all:
the public context arrives with each session and is dropped when the session ends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cloud.worker import DEFAULT_MAX_BATCHES
from pacegate.configfile import load_config
from pacegate.identity import IDENTITY_NAME_RULE, is_identity_name
from pacegate.layout import PkiLayout
from pacegate.ports import DEFAULT_CLOUD_PORT, DEFAULT_HOST


@dataclass(frozen=True)
class CloudConfig:
    path: Path
    host: str
    port: int
    identity_name: str
    identity_key: Path
    allowed_clients: dict[str, Path]
    max_batches: int = DEFAULT_MAX_BATCHES


def load_cloud_config(path: str | Path) -> CloudConfig:
    cfg = load_config(path)
    cfg.check_keys({"listen", "identity", "allowed_clients", "limits"})
    listen = cfg.section("listen")
    listen.check_keys({"host", "port"})
    identity = cfg.section("identity", required=True)
    identity.check_keys({"name", "key"})
    clients = cfg.section("allowed_clients", required=True)
    if not clients.data:
        raise cfg.error(
            "allowed_clients",
            "no client may connect",
            fix="pin the hospital: 'hospital: pki/channel/hospital.mldsa.pub'",
        )
    allowed: dict[str, Path] = {}
    for name in clients.data:
        if not is_identity_name(name):
            raise clients.error(
                str(name), "is not a valid identity name", fix=f"use {IDENTITY_NAME_RULE}"
            )
        allowed[name] = clients.get_path(name, must_exist=True)
    identity_name = identity.get("name", str, "cloud")
    if not is_identity_name(identity_name):
        raise identity.error(
            "name",
            f"{identity_name!r} is not a valid identity name",
            fix=f"use {IDENTITY_NAME_RULE}",
        )
    limits = cfg.section("limits")
    limits.check_keys({"max_batches"})
    return CloudConfig(
        path=cfg.path,
        host=listen.get("host", str, DEFAULT_HOST),
        port=listen.get_int("port", DEFAULT_CLOUD_PORT, lo=0, hi=65535),
        identity_name=identity_name,
        identity_key=identity.get_path("key", required=True, must_exist=True),
        allowed_clients=allowed,
        max_batches=limits.get_int(
            "max_batches", DEFAULT_MAX_BATCHES, lo=1, hi=DEFAULT_MAX_BATCHES
        ),
    )


def render_default_config(
    path: Path, *, pki: PkiLayout, host: str = DEFAULT_HOST, port: int = DEFAULT_CLOUD_PORT
) -> str:
    """The cloud.yaml to write at ``path``, as ``pacegate up``/``demo`` write it into a work
    directory: the identity files relative to ``path``'s directory."""
    key = os.path.relpath(pki.channel_key("cloud"), path.parent)
    hospital = os.path.relpath(pki.channel_pub("hospital"), path.parent)
    return (
        "# pacegate CKKS cloud worker (holds the public CKKS context only)\n"
        "listen:\n"
        f"  host: {host}\n"
        f"  port: {port}\n"
        "identity:\n"
        "  name: cloud\n"
        f"  key: {key}\n"
        "allowed_clients:\n"
        f"  hospital: {hospital}\n"
        "limits:\n"
        f"  max_batches: {DEFAULT_MAX_BATCHES}\n"
    )

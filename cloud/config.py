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
    aggregator:                    # optional; default backend: in_process
      backend: dask                # spread each session's batches over a Dask cluster
      scheduler: tls://127.0.0.1:8786
      ca_file: dask/pki/ca.crt     # the cluster's own CA, never the device CA
      cert: dask/pki/cloud-front.crt
      key: dask/pki/cloud-front.key
      batches_per_task: 8
      max_tasks_in_flight: 16
      task_timeout_s: 300

Relative paths resolve against the file's directory. The worker holds no CKKS key at all:
the public context arrives with each session and is dropped when the session ends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cloud.worker import DEFAULT_MAX_BATCHES
from pacegate.configfile import ConfigSection, load_config
from pacegate.identity import IDENTITY_NAME_RULE, is_identity_name
from pacegate.layout import PkiLayout
from pacegate.ports import DEFAULT_CLOUD_PORT, DEFAULT_HOST

AGGREGATOR_BACKENDS = ("in_process", "dask")
# The Dask aggregator's defaults live here, with the schema, so that reading cloud.yaml
# imports neither Dask nor TenSEAL.
# A task of 8 batches of 4 lanes carries ~8.4 MB of ciphertexts (0.26 MB each) plus the
# 0.4 MB context: enough to spread a task's fixed round trip (~25 ms measured on the
# 2-core VM, docs/scaling.md) over 32,768 readings, and under Dask's 10 MB warning.
DEFAULT_BATCHES_PER_TASK = 8
# Tasks submitted but not yet folded: each holds its inputs on the scheduler and a worker,
# so this bounds the cluster's memory per session (16 x ~9 MB), not the session's length.
DEFAULT_MAX_TASKS_IN_FLIGHT = 16
# How long the front worker waits for one task, retries on other workers included.
DEFAULT_TASK_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DaskAggregatorConfig:
    """``aggregator:`` with ``backend: dask``: the cluster, and who the front worker is on
    it (the fields of :class:`cloud.dask_aggregator.DaskSettings`)."""

    scheduler: str
    ca_file: Path
    cert: Path
    key: Path
    batches_per_task: int = DEFAULT_BATCHES_PER_TASK
    max_tasks_in_flight: int = DEFAULT_MAX_TASKS_IN_FLIGHT
    task_timeout_s: float = DEFAULT_TASK_TIMEOUT_S


@dataclass(frozen=True)
class CloudConfig:
    path: Path
    host: str
    port: int
    identity_name: str
    identity_key: Path
    allowed_clients: dict[str, Path]
    max_batches: int = DEFAULT_MAX_BATCHES
    dask: DaskAggregatorConfig | None = None  # None: aggregate in this process


def load_cloud_config(path: str | Path) -> CloudConfig:
    cfg = load_config(path)
    cfg.check_keys({"listen", "identity", "allowed_clients", "limits", "aggregator"})
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
        dask=_aggregator(cfg),
    )


def _aggregator(cfg: ConfigSection) -> DaskAggregatorConfig | None:
    agg = cfg.section("aggregator")
    backend = agg.get("backend", str, "in_process")
    if backend not in AGGREGATOR_BACKENDS:
        raise agg.error(
            "backend", f"unknown backend {backend!r}", fix=" or ".join(AGGREGATOR_BACKENDS)
        )
    if backend == "in_process":
        agg.check_keys({"backend"})
        return None
    agg.check_keys(
        {"backend", "scheduler", "ca_file", "cert", "key"}
        | {"batches_per_task", "max_tasks_in_flight", "task_timeout_s"}
    )
    scheduler = agg.get("scheduler", str, required=True)
    if not scheduler.startswith("tls://"):
        raise agg.error(
            "scheduler",
            f"{scheduler!r} is not a tls:// address (the cluster speaks TLS only)",
            fix="tls://HOST:PORT, as 'python -m console.dask_cluster' prints it",
        )
    return DaskAggregatorConfig(
        scheduler=scheduler,
        ca_file=agg.get_path("ca_file", required=True, must_exist=True),
        cert=agg.get_path("cert", required=True, must_exist=True),
        key=agg.get_path("key", required=True, must_exist=True),
        batches_per_task=agg.get_int("batches_per_task", DEFAULT_BATCHES_PER_TASK, lo=1, hi=4096),
        max_tasks_in_flight=agg.get_int(
            "max_tasks_in_flight", DEFAULT_MAX_TASKS_IN_FLIGHT, lo=1, hi=4096
        ),
        task_timeout_s=agg.get_float("task_timeout_s", DEFAULT_TASK_TIMEOUT_S, lo=1.0, hi=86400.0),
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

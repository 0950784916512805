"""``pacegate cluster up``: the multi-node topology on one machine (docs/scaling.md).

Each node is its own process group with its own directory and its own copy of what it needs,
as it would be on its own machine; nothing is shared through the filesystem but what a real
deployment would also hand over (the provisioning below):

- ``W/pki``: the CA's node: the device CA, enrolment, revocation, and ``pacegate trust serve``
  (the CRL and the PSK store, offered to every edge node);
- ``W/edge-N``: an edge node: its own broker and gateway on its own PKI copy
  (``pacegate trust provision``: never the CA key), kept current by ``pacegate trust follow``;
  its gateway names every hospital node, starting from a different one on each edge;
- ``W/hospital-N``: a hospital ingest node: ``pacegate hospital`` on the one PostgreSQL
  database, writer ``hospital-N``, a copy of the one keyring;
- ``W/cloud``: the CKKS front worker; with ``--workers K`` it sums on a Dask cluster of K
  workers (``W/dask``, its own CA);
- ``W/postgres``: a throwaway PostgreSQL on loopback (a managed or Patroni cluster in
  production).

Every pacegate service is supervised as under ``pacegate up`` (:class:`console.stack.Stack`:
restarted with backoff, crash loops reported, stopped by pid in order); the PostgreSQL server
and the Dask processes are started and stopped by their own launchers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from console.endpoints import Endpoints
from console.stack import (
    SUPERVISE_INTERVAL_S,
    Stack,
    StackError,
    pacegate_argv,
    supervise_until_signalled,
)
from console.trust import provision_edge_node
from console.workdir import WorkLayout, cloud_config_text, gateway_config_text
from pacegate.errors import ConfigError
from pacegate.layout import PkiLayout, write_public, write_secret
from pacegate.ports import DEFAULT_HOST

log = logging.getLogger("pacegate.cluster")

# One machine is the point of this topology, not its capacity: a handful of nodes per tier
# shows failover and concurrent writers; more only shares the same 2 cores thinner.
MAX_EDGES = 8
MAX_HOSPITALS = 8
MAX_WORKERS = 8
CLUSTER_FILE = "cluster.json"
# The edge followers poll the trust server this often: a revocation reaches every edge node
# within about this plus the broker's 1 s CRL reload.
FOLLOW_INTERVAL_S = 1.0
PG_DATABASE = "pacegate"


@dataclass(frozen=True)
class ClusterService:
    """One supervised process of the cluster: its command line, the port that says it is up
    (0: none, a follower), and where it comes in the stop order."""

    argv: list[str]
    listen: tuple[str, int]
    stop_rank: int


# Stop order: the device side first, as under 'pacegate up' (brokers stop taking publishes,
# gateways hand on what they hold, hospitals commit it), then what serves the others.
_RANK = {"broker": 0, "gateway": 1, "follow": 2, "hospital": 3, "trust": 4, "cloud": 5}


@dataclass
class Cluster(Stack):
    """The cluster's pacegate services under one supervisor (a :class:`Stack` whose service
    list is the plan)."""

    plan: dict[str, ClusterService] = field(default_factory=dict)

    def service_names(self) -> tuple[str, ...]:
        return tuple(self.plan)

    def service_argv(self, name: str) -> list[str]:
        return self.plan[name].argv

    def stop_rank(self, name: str) -> int:
        return self.plan[name].stop_rank

    def _port_of(self, name: str) -> tuple[str, int]:
        return self.plan[name].listen

    def _config_of(self, name: str) -> Path:  # the plan's argv names each config
        raise StackError(f"{name}: a cluster service's config is in its command line")


@dataclass
class Topology:
    """What ``cluster up`` started: the edge nodes' MQTT endpoints, the hospital nodes'
    configs, the cloud's, and the sizes (``W/cluster.json``)."""

    root: Path
    edges: list[tuple[str, int]]
    hospital_configs: list[Path]
    cloud_config: Path
    workers: int
    trust_url: str
    dask: Any = None  # console.dask_cluster.DaskCluster when workers > 0

    def to_json(self) -> dict[str, object]:
        return {
            "edges": [f"{h}:{p}" for h, p in self.edges],
            "hospitals": [str(p) for p in self.hospital_configs],
            "cloud": str(self.cloud_config),
            "workers": self.workers,
            "trust": self.trust_url,
            "store": "postgresql",
            "analytics": "dask" if self.workers else "in_process",
        }


def _free_port() -> int:
    from console.postgres import free_port

    return free_port()


def _copy(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    (write_secret if src.suffix == ".key" or "keyring" in src.name else write_public)(dst, data)


def _hospital_node(
    root: Path, index: int, pki: PkiLayout, dsn: str, keyring: Path, cloud_port: int
) -> tuple[Path, int, int]:
    """``W/hospital-N``: its identity and pins, the DSN file, the keyring copy, hospital.yaml
    on PostgreSQL as writer ``hospital-N``. Returns (config, port, metrics port)."""
    from console.workdir import hospital_config_text

    work = WorkLayout(root / f"hospital-{index}")
    node = work.pki
    for name in ("hospital.mldsa.key", "gateway.mldsa.pub", "cloud.mldsa.pub"):
        _copy(pki.channel_dir / name, node.channel_dir / name)
    work.hospital_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret(work.hospital_dir / "pg.dsn", dsn.encode() + b"\n")
    _copy(keyring, work.hospital_dir / "keyring.json")
    port, metrics = _free_port(), _free_port()
    text = hospital_config_text(work, port=port, metrics_port=metrics, cloud_port=cloud_port)
    section = (
        "store:\n"
        "  backend: postgresql\n"
        "  dsn_file: hospital/pg.dsn\n"
        f"  writer: hospital-{index}\n"
        "  keyring: hospital/keyring.json\n"
    )
    text = re.sub(r"^store:\n(?:[ #].*\n)*", section, text, count=1, flags=re.M)
    work.hospital_config.write_text(text)
    return work.hospital_config, port, metrics


def _edge_node(
    root: Path, index: int, pki: PkiLayout, hospitals: list[int]
) -> tuple[WorkLayout, int, int]:
    """``W/edge-N``: its PKI copy, broker.yaml and gateway.yaml (every hospital node, from
    the N-th on). Returns (layout, MQTT port, gateway metrics port)."""
    from broker.config import render_default_config as broker_config

    work = WorkLayout(root / f"edge-{index}")
    provision_edge_node(pki, work.pki)
    mqtt, metrics = _free_port(), _free_port()
    work.broker_config.write_text(
        broker_config(work.pki.root, host=DEFAULT_HOST, port=mqtt, config_dir=work.root)
    )
    order = hospitals[(index - 1) % len(hospitals) :] + hospitals[: (index - 1) % len(hospitals)]
    text = gateway_config_text(
        work,
        mqtt_host=DEFAULT_HOST,
        mqtt_port=mqtt,
        hospital_host=DEFAULT_HOST,
        hospital_port=order[0],
        metrics_port=metrics,
    )
    if len(order) > 1:
        anchor = f"  port: {order[0]}\n"
        failover = "".join(f"    - host: {DEFAULT_HOST}\n      port: {p}\n" for p in order[1:])
        text = text.replace(anchor, f"{anchor}  failover:\n{failover}", 1)
    work.gateway_config.write_text(text)
    return work, mqtt, metrics


@contextlib.contextmanager
def running_cluster(
    root: Path, *, edges: int, hospitals: int, workers: int, log_level: str = "INFO"
) -> Iterator[tuple[Cluster, Topology]]:
    """Start the whole topology in ``root`` (a PKI is made if missing), yield it, stop it."""
    import psycopg

    from console import postgres
    from hospital.keyring import Keyring
    from pacegate.pki import init_pki

    for flag, value, hi in (
        ("--edges", edges, MAX_EDGES),
        ("--hospitals", hospitals, MAX_HOSPITALS),
        ("--workers", workers, MAX_WORKERS),
    ):
        lo = 0 if flag == "--workers" else 1
        if not lo <= value <= hi:
            raise ConfigError(None, flag, f"must be {lo}..{hi} on one machine, got {value}")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    pg_dir = root / "postgres"
    if (pg_dir / "data").exists():
        raise ConfigError(
            pg_dir,
            "",
            "holds the database of an earlier 'cluster up' (its throwaway PostgreSQL is "
            "started fresh each time)",
            fix=f"use a new --workdir, or delete {pg_dir} to discard its readings",
        )
    work = WorkLayout(root)
    if not work.pki.ca_cert.exists():
        init_pki(work.pki.root)
    # the server runs as the 'postgres' user, which must enter the work directory
    root.chmod(root.stat().st_mode | 0o011)
    server = postgres.start(pg_dir)
    dask = None
    cluster: Cluster | None = None
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {PG_DATABASE}")
        keyring = root / "hospital-keyring.json"
        if not keyring.exists():
            Keyring.create(keyring)
        cloud_port = _free_port()
        cloud = WorkLayout(root / "cloud")
        for name in ("cloud.mldsa.key", "hospital.mldsa.pub"):
            _copy(work.pki.channel_dir / name, cloud.pki.channel_dir / name)
        cloud_text = cloud_config_text(cloud, host=DEFAULT_HOST, port=cloud_port)
        if workers:
            from console.dask_cluster import start_cluster

            dask = start_cluster(root / "dask", workers=workers)
            cloud_text += (
                "aggregator:\n  backend: dask\n"
                f"  scheduler: {dask.address}\n  ca_file: {dask.ca_file}\n"
                f"  cert: {dask.client_cert}\n  key: {dask.client_key}\n"
            )
        cloud.root.mkdir(parents=True, exist_ok=True)
        cloud.cloud_config.write_text(cloud_text)
        plan: dict[str, ClusterService] = {}
        trust_port = _free_port()
        trust_url = f"http://{DEFAULT_HOST}:{trust_port}"

        def add(name: str, kind: str, argv: list[str], port: int) -> None:
            plan[name] = ClusterService(argv, (DEFAULT_HOST, port), _RANK[kind])

        def cmd(*args: str) -> list[str]:
            return pacegate_argv(*args, log_level=log_level)

        add(
            "trust",
            "trust",
            cmd(
                "trust", "serve", "--dir", str(work.pki.root), "--listen", f"127.0.0.1:{trust_port}"
            ),
            trust_port,
        )
        add("cloud", "cloud", cmd("cloud", "-c", str(cloud.cloud_config)), cloud_port)
        hospital_configs, hospital_ports = [], []
        for i in range(1, hospitals + 1):
            config, port, _metrics = _hospital_node(
                root, i, work.pki, server.dsn(PG_DATABASE), keyring, cloud_port
            )
            hospital_configs.append(config)
            hospital_ports.append(port)
            add(f"hospital-{i}", "hospital", cmd("hospital", "-c", str(config)), port)
        edge_endpoints = []
        for i in range(1, edges + 1):
            edge, mqtt, metrics = _edge_node(root, i, work.pki, hospital_ports)
            edge_endpoints.append((DEFAULT_HOST, mqtt))
            add(f"edge-{i}-broker", "broker", cmd("broker", "-c", str(edge.broker_config)), mqtt)
            add(
                f"edge-{i}-gateway",
                "gateway",
                cmd("gateway", "-c", str(edge.gateway_config)),
                metrics,
            )
            add(
                f"edge-{i}-follow",
                "follow",
                cmd(
                    "trust",
                    "follow",
                    *("--from", trust_url, "--dir", str(edge.pki.root)),
                    *("--interval", str(FOLLOW_INTERVAL_S)),
                ),
                0,
            )
        topology = Topology(
            root, edge_endpoints, hospital_configs, cloud.cloud_config, workers, trust_url, dask
        )
        (root / CLUSTER_FILE).write_text(json.dumps(topology.to_json(), indent=2) + "\n")
        cluster = Cluster(work, Endpoints(), log_level=log_level, plan=plan)
        cluster.start()
        yield cluster, topology
    finally:
        if cluster is not None:
            cluster.stop()
        if dask is not None:
            dask.stop()
        postgres.stop(server)


def cli_up(args: argparse.Namespace) -> int:
    """``pacegate cluster up --workdir W [--edges N] [--hospitals M] [--workers K]``."""
    from console.runstate import hold_workdir

    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    hold_workdir(WorkLayout(root))

    def banner(running: tuple[Cluster, Topology]) -> str:
        _, topology = running
        return (
            f"pacegate cluster is up in {root}: edges "
            + ", ".join(f"{h}:{p}" for h, p in topology.edges)
            + f"; {len(topology.hospital_configs)} hospital nodes on PostgreSQL; cloud "
            + ("on Dask" if topology.workers else "in process")
            + f"; {root / CLUSTER_FILE}. Ctrl-C stops."
        )

    return supervise_until_signalled(
        running_cluster(
            root,
            edges=args.edges,
            hospitals=args.hospitals,
            workers=args.workers,
            log_level=args.log_level,
        ),
        lambda running: running[0],
        banner,
        stopping="stopping the cluster",
    )


# -- the demo on the cluster ----------------------------------------------------------------
# How long the demo waits for what a node holds to reach the store after the devices stop:
# a killed hospital's gateways resend to the other node, a killed edge's devices resend.
CLUSTER_DRAIN_S = 120.0


# How long the demo waits for every edge to know the devices it just enrolled.
PSK_PROPAGATION_S = 30.0


def edge_knows(root: Path, index: int, ids: list[str]) -> bool:
    """Whether edge ``index`` of the cluster in ``root`` has installed a PSK store with
    every device of ``ids``."""
    from pacegate.errors import ConfigError as _ConfigError
    from pacegate.keystore import PskStore

    node = WorkLayout(root / f"edge-{index}").pki
    try:
        store = PskStore.load(node.psk_store, node.psk_store_key)
    except _ConfigError:
        return False  # mid-install: the next look sees it whole
    return all(store.get(i) is not None for i in ids)


def _pid_of(cluster: Cluster, name: str) -> int | None:
    return next(
        (s.proc.pid for s in cluster.services if s.name == name and s.proc.poll() is None), None
    )


def _kill(cluster: Cluster, name: str, killed: list[str]) -> None:
    import os

    pid = _pid_of(cluster, name)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)  # ours: started by this cluster, by its pid
        killed.append(name)
        log.warning("chaos: SIGKILLed %s (pid %d)", name, pid)


def _stored_pairs(config: Path) -> list[tuple[str, int]]:
    from hospital.config import load_hospital_config
    from hospital.store import open_store

    with open_store(load_hospital_config(config)) as store:
        return [(r.device_id, r.counter) for b in store.iter_records() for r in b]


def _supervise_until(cluster: Cluster, done: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.supervise()
        if done():
            return True
        time.sleep(SUPERVISE_INTERVAL_S)
    return bool(done())


def run_cluster_demo(args: argparse.Namespace) -> int:
    """``pacegate demo --cluster [--chaos] [--json]``: devices on every edge node, a node of
    every tier SIGKILLed mid-run with ``--chaos`` (the supervisor restarts it), then every
    acknowledged reading looked up in the PostgreSQL store, and the CKKS analysis."""
    import subprocess
    import threading

    from console.postgres import PostgresError
    from device_sim.fleet import read_acked_log
    from hospital.analysis.job import run_analysis
    from pacegate.pki import enroll_devices

    root = Path(args.workdir).resolve()
    if root.exists() and any(root.iterdir()):
        raise ConfigError(
            root, "", "is not empty", fix="give 'demo --cluster' a new --workdir (it starts fresh)"
        )
    from console.runstate import hold_workdir

    root.mkdir(parents=True, exist_ok=True)
    hold_workdir(WorkLayout(root))  # a second demo or 'cluster up' here is refused
    chaos = bool(getattr(args, "chaos", False))
    workers = 2 if chaos else int(getattr(args, "workers", 0) or 0)
    edges, hospitals = 2, 2
    killed: list[str] = []
    try:
        cm = running_cluster(
            root, edges=edges, hospitals=hospitals, workers=workers, log_level="WARNING"
        )
        cluster, topology = cm.__enter__()
    except PostgresError as exc:
        raise StackError(str(exc)) from None
    try:
        ids = [f"pm-{i:04d}" for i in range(1, args.devices + 1)]
        enroll_devices(root / "pki", ids)
        # A device is known at an edge once that edge's follower has installed the new PSK
        # store (about a second). A reading sent before would be refused there as
        # unknown_device, and refused readings are PUBACKed (MQTT 3.1.1 has no negative
        # acknowledgement): the device would count it as delivered. So the fleet starts
        # only once every edge knows every device.
        if not _supervise_until(
            cluster,
            lambda: all(edge_knows(root, i, ids) for i in range(1, edges + 1)),
            PSK_PROPAGATION_S,
        ):
            raise StackError(
                f"the edges did not install the new PSK store within {PSK_PROPAGATION_S:.0f} s "
                f"(see {root / 'logs'}/edge-*-follow.log)"
            )
        acked_log = root / "acked.jsonl"
        argv = pacegate_argv(
            "devices",
            *("--workdir", str(root)),
            *(a for h, p in topology.edges for a in ("--broker", f"{h}:{p}")),
            *("--count", str(args.devices), "--rate", str(args.rate)),
            *("--duration", str(args.duration), "--drain", "60"),
            *("--acked-log", str(acked_log), "--json"),
            log_level="WARNING",
        )
        with open(root / "logs" / "devices.log", "w") as err:
            fleet = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=root)
        started = time.monotonic()
        plan = (
            [
                (args.duration / 3, ("edge-2-broker", "edge-2-gateway")),
                (2 * args.duration / 3, ("hospital-1",)),
            ]
            if chaos
            else []
        )
        for at, names in plan:
            _supervise_until(cluster, lambda at=at: time.monotonic() - started >= at, at + 5)
            for name in names:
                _kill(cluster, name, killed)
        _supervise_until(cluster, lambda: fleet.poll() is not None, args.duration + 180)
        out = fleet.communicate(timeout=30)[0] if fleet.poll() is not None else b""
        if fleet.poll() is None:
            fleet.kill()
        summary = json.loads(out.decode() or "{}")
        acked = set(read_acked_log(acked_log)) if acked_log.exists() else set()
        config = topology.hospital_configs[-1]
        stored_list: list[tuple[str, int]] = []

        def all_stored() -> bool:
            nonlocal stored_list
            stored_list = _stored_pairs(config)
            return acked <= set(stored_list)

        _supervise_until(cluster, all_stored, CLUSTER_DRAIN_S)
        stored = set(stored_list)
        worker_killer = None
        if chaos and topology.dask is not None:
            dask = topology.dask

            def kill_a_worker() -> None:
                time.sleep(0.3)  # the analysis has opened its session and is sending batches
                name = sorted(dask.workers)[0]
                dask.kill_worker(name)
                killed.append(name)

            worker_killer = threading.Thread(target=kill_a_worker, daemon=True)
            worker_killer.start()
        analysis = run_analysis(config)
        if worker_killer is not None:
            worker_killer.join(10)
            for name, proc in topology.dask.workers.items():
                if proc.poll() is not None:
                    topology.dask.add_worker(name)  # the supervisor's part for Dask workers
        status = {n: cluster.restarts.get(n, 0) for n in killed if n in cluster.plan}
    finally:
        cm.__exit__(None, None, None)
    report = {
        "topology": {
            "edges": edges,
            "hospitals": hospitals,
            "workers": workers,
            "store": "postgresql",
            "analytics": "dask" if workers else "in_process",
        },
        "killed": killed,
        "restarted": status,
        "devices": summary.get("devices", 0),
        "acknowledged": len(acked),
        "stored": len(stored),
        "lost": len(acked - stored),
        "duplicates_stored": len(stored_list) - len(stored),
        "analysis": analysis,
    }
    ok = (
        report["lost"] == 0
        and report["duplicates_stored"] == 0
        and bool(analysis.get("ok"))
        and len(acked) > 0
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"pacegate demo --cluster: {len(acked)} acknowledged, {len(stored)} stored, "
            f"{report['lost']} lost, {report['duplicates_stored']} stored twice; killed "
            f"{', '.join(killed) or 'nothing'}; "
            f"analysis {'ok' if analysis.get('ok') else 'FAILED'}",
            file=sys.stderr,
        )
    return 0 if ok else 1

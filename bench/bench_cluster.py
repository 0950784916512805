"""The cluster topology on this machine: readings/s with 1, 2 and 3 edge nodes, and a connect
storm of many mutual-TLS devices spread over the edges (time until all are connected, memory
per connection in the brokers).

    .venv/bin/python bench/bench_cluster.py [--edges 1 2 3] [--devices 60] [--rate 5]
        [--duration 20] [--storm 2000] [--storm-processes 4] [--json]

Each run is ``console.cluster.running_cluster`` in a fresh directory (2 hospital nodes on the
throwaway PostgreSQL, the cloud in process), the devices as ``pacegate devices`` processes
(``--skip`` gives each its own slice of the enrolled fleet; one process holds at most 20,000
open files here). Throughput: acknowledged readings / duration at a fixed offered load
(``devices x rate``), and whether every acknowledged reading was stored. Storm: ``--storm``
devices, each sending one reading per minute, against every edge at once; the figure is the
time from the first process start until every device is connected, and the edges' broker RSS
over the idle RSS before the storm, per connection. PostgreSQL against SQLite is
``bench/bench_pgstore.py``; CKKS on 1 and 2 Dask workers is ``bench/bench_dask.py``.

Single runs on a shared 2-core machine: use them for design, not as promises.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from console.cluster import Cluster, Topology, edge_knows, running_cluster  # noqa: E402
from console.stack import pacegate_argv  # noqa: E402
from device_sim.fleet import read_acked_log  # noqa: E402
from pacegate.pki import enroll_devices  # noqa: E402

# One simulator process holds at most this many devices (the open-file limit is 20,000 per
# process here, and each device is a socket plus its counter file while it reserves).
DEVICES_PER_PROCESS = 5000


def _fresh_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="pacegate-bench-cluster-"))
    root.chmod(0o711)
    return root


def _fleet(
    root: Path,
    topology: Topology,
    *,
    count: int,
    skip: int,
    rate: float,
    duration: float,
    acked: Path | None,
) -> subprocess.Popen[bytes]:
    argv = pacegate_argv(
        "devices",
        *("--workdir", str(root)),
        *(a for h, p in topology.edges for a in ("--broker", f"{h}:{p}")),
        *("--count", str(count), "--skip", str(skip), "--rate", str(rate)),
        *("--duration", str(duration), "--drain", "30", "--json"),
        *(("--acked-log", str(acked)) if acked is not None else ()),
        log_level="WARNING",
    )
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=root)


def _until_edges_know(cluster: Cluster, work: Path, edges: int, ids: list[str]) -> None:
    """Until every edge has installed the PSK store with ``ids`` (a reading sent before is
    refused there as unknown_device, and PUBACKed all the same)."""
    deadline = time.monotonic() + 60
    while not all(edge_knows(work, i, ids) for i in range(1, edges + 1)):
        if time.monotonic() > deadline:
            raise SystemExit("the edges did not install the new PSK store within 60 s")
        cluster.supervise()
        time.sleep(0.5)


def _broker_rss(cluster: Cluster) -> int:
    total = 0
    for s in cluster.services:
        if s.name.endswith("-broker") and s.proc.poll() is None:
            total += psutil.Process(s.proc.pid).memory_info().rss
    return total


def _stored(topology: Topology) -> set[tuple[str, int]]:
    from hospital.config import load_hospital_config
    from hospital.store import open_store

    with open_store(load_hospital_config(topology.hospital_configs[0])) as store:
        return {(r.device_id, r.counter) for b in store.iter_records() for r in b}


def throughput(edges: int, devices: int, rate: float, duration: float) -> dict[str, Any]:
    root = _fresh_root()
    try:
        work = root / "W"
        with running_cluster(work, edges=edges, hospitals=2, workers=0, log_level="WARNING") as (
            cluster,
            topology,
        ):
            ids = [f"pm-{i:05d}" for i in range(1, devices + 1)]
            enroll_devices(work / "pki", ids)
            _until_edges_know(cluster, work, edges, ids)
            acked_log = work / "acked.jsonl"
            t0 = time.perf_counter()
            fleet = _fleet(
                work, topology, count=devices, skip=0, rate=rate, duration=duration, acked=acked_log
            )
            while fleet.poll() is None:
                cluster.supervise()
                time.sleep(0.2)
            elapsed = time.perf_counter() - t0
            summary = json.loads(fleet.communicate()[0] or b"{}")
            acked = set(read_acked_log(acked_log))
            deadline = time.monotonic() + 60
            stored = _stored(topology)
            while not acked <= stored and time.monotonic() < deadline:
                cluster.supervise()
                time.sleep(1)
                stored = _stored(topology)
        return {
            "edges": edges,
            "offered_per_s": devices * rate,
            "acknowledged": len(acked),
            "acknowledged_per_s": round(len(acked) / duration, 1),
            "fleet_elapsed_s": round(elapsed, 1),
            "all_acknowledged_stored": acked <= stored,
            "connect_failures": summary.get("connect_failures"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def storm(edges: int, devices: int, processes: int) -> dict[str, Any]:
    root = _fresh_root()
    try:
        work = root / "W"
        with running_cluster(work, edges=edges, hospitals=1, workers=0, log_level="WARNING") as (
            cluster,
            topology,
        ):
            t_enrol = time.perf_counter()
            ids = [f"pm-{i:05d}" for i in range(1, devices + 1)]
            enroll_devices(work / "pki", ids)
            enrol_s = time.perf_counter() - t_enrol
            _until_edges_know(cluster, work, edges, ids)
            idle = _broker_rss(cluster)
            per = -(-devices // processes)
            duration = 600.0  # the fleets are stopped once all are connected
            t0 = time.perf_counter()
            fleets = [
                _fleet(
                    work,
                    topology,
                    count=min(per, devices - i * per),
                    skip=i * per,
                    rate=1 / 60,
                    duration=duration,
                    acked=None,
                )
                for i in range(processes)
                if i * per < devices
            ]
            connected_s = None
            peak = idle
            while time.perf_counter() - t0 < duration:
                cluster.supervise()
                peak = max(peak, _broker_rss(cluster))
                conns = sum(
                    len(psutil.Process(s.proc.pid).net_connections(kind="tcp"))
                    for s in cluster.services
                    if s.name.endswith("-broker") and s.proc.poll() is None
                )
                if conns >= devices + edges:  # every device, and each edge's gateway
                    connected_s = time.perf_counter() - t0
                    break
                time.sleep(1)
            for f in fleets:
                f.terminate()
            for f in fleets:
                f.wait(60)
        return {
            "edges": edges,
            "devices": devices,
            "simulator_processes": len(fleets),
            "enrol_s": round(enrol_s, 1),
            "all_connected_s": round(connected_s, 1) if connected_s is not None else None,
            "broker_rss_idle_mb": round(idle / 2**20, 1),
            "broker_rss_peak_mb": round(peak / 2**20, 1),
            "broker_kb_per_connection": round((peak - idle) / devices / 1024, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--edges", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--devices", type=int, default=60)
    ap.add_argument("--rate", type=float, default=5.0, help="readings/s per device")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--storm", type=int, default=0, help="devices in the connect storm (0: none)")
    ap.add_argument("--storm-edges", type=int, default=2)
    ap.add_argument("--storm-processes", type=int, default=0, help="default: 1 per 5,000")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {"throughput": [], "storm": None}
    for n in args.edges:
        out["throughput"].append(throughput(n, args.devices, args.rate, args.duration))
    if args.storm:
        procs = args.storm_processes or -(-args.storm // DEVICES_PER_PROCESS)
        out["storm"] = storm(args.storm_edges, args.storm, procs)
    out["load_average"] = [round(x, 2) for x in psutil.getloadavg()]
    if args.json:
        print(json.dumps(out))
    else:
        for row in out["throughput"]:
            print(
                f"{row['edges']} edge(s): {row['acknowledged_per_s']} acknowledged/s of "
                f"{row['offered_per_s']:g} offered; all stored: {row['all_acknowledged_stored']}"
            )
        if out["storm"]:
            s = out["storm"]
            print(
                f"storm: {s['devices']} devices on {s['edges']} edges connected in "
                f"{s['all_connected_s']} s; {s['broker_kb_per_connection']} KB per connection"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

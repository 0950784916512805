"""Benchmark of the confidential analytics, end to end, real parts only.

    .venv/bin/python bench/bench_analytics.py [--readings 1000000] [--workdir DIR]
                                              [--workers 2] [--baseline] [--json]

1. Set-up (not timed as analysis): channel identities, hospital.yaml/cloud.yaml, a real
   SQLite store with N readings as Fernet tokens (kept in --workdir for re-runs).
2. Start ``pacegate cloud`` as a separate process, over the real post-quantum channel.
3. Run the analysis: rows read and Fernet-decrypted by ``--workers`` spawned processes
   (0: in this process), CKKS-encrypt, ship, compute blind, fetch, decrypt, check against
   plaintext. ``--baseline`` also runs the sequential analysis (workers 0) in the same run
   and prints the speed-up.

Prints total time, time per phase (they overlap when rows are decrypted in other
processes), CPU seconds per process and how many cores were busy, bytes shipped, peak
memory (VmHWM / max RSS) of every process and their sum, and whether the targets are met
(< 30 s, < 1 GB on a 2-core machine), computed in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from console.workdir import WorkLayout, cloud_config_text, hospital_config_text
from hospital.analysis.job import run_analysis_async
from hospital.analysis.settings import AnalysisSettings
from hospital.config import load_hospital_config
from hospital.store import SqliteReadingStore
from pacegate.channel import ChannelIdentity, write_identity
from pacegate.ingest import IngestItem
from pacegate.reading import Reading

T0 = datetime(2025, 1, 1, tzinfo=UTC)
TARGET_SECONDS = 30.0
TARGET_BYTES = 10**9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(work: WorkLayout, n: int, port: int) -> float:
    for name in ("hospital", "cloud"):
        if not work.pki.channel_key(name).exists():
            write_identity(
                ChannelIdentity.generate(name),
                work.pki.channel_key(name),
                work.pki.channel_pub(name),
            )
    work.cloud_config.write_text(cloud_config_text(work, host="127.0.0.1", port=port))
    work.hospital_config.write_text(
        hospital_config_text(work, port=0, metrics_port=0, cloud_port=port)
    )
    cfg = load_hospital_config(work.hospital_config)
    store = SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring)
    started = time.perf_counter()
    try:
        have = store.count()
        rng = random.Random(2025)
        batch: list[IngestItem] = []
        for i in range(have, n):
            age = rng.randint(18, 95)
            hr = max(30, min(200, round(55 + 0.25 * age + rng.gauss(0, 14))))
            reading = Reading(age, hr, i % 1000, T0 + timedelta(seconds=i))
            batch.append(IngestItem(f"pm-{i % 1000:04d}", i, reading))
            if len(batch) == 500:
                store.store_batch(batch)
                batch = []
        if batch:
            store.store_batch(batch)
        return time.perf_counter() - started
    finally:
        store.close()


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cloud worker exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("cloud worker did not start listening")


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (``VmHWM``: peak resident memory)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def run_once(work: WorkLayout, port: int, settings: AnalysisSettings) -> dict[str, Any]:
    """One analysis against a freshly started ``pacegate cloud`` process; its figures."""
    cloud_log = open(work.root / "cloud.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "console",
            "--log-level",
            "WARNING",
            "cloud",
            "-c",
            str(work.cloud_config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=cloud_log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_listening(port, proc)
        cloud_cpu0 = proc_cpu_seconds(proc.pid)
        self_cpu0 = cpu_seconds(resource.RUSAGE_SELF)
        children_cpu0 = cpu_seconds(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        report = asyncio.run(run_analysis_async(work.hospital_config, settings=settings))
        wall = time.perf_counter() - started
        # the decrypting processes have been joined: RUSAGE_CHILDREN holds them (the
        # cloud worker is still running, so it is not in it yet)
        workers_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - children_cpu0
        self_cpu = cpu_seconds(resource.RUSAGE_SELF) - self_cpu0
        cloud_cpu = proc_cpu_seconds(proc.pid) - cloud_cpu0
        cloud_rss = proc_status_kib(proc.pid, "VmHWM") * 1024
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        cloud_log.close()
    t = report.timings
    hospital_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "readings": report.plain.n,
        "batches": report.batches,
        "ok": report.ok,
        "row_workers": t.row_workers,
        "total_s": wall,
        "phases_s": {
            "decrypt_rows": t.decrypt_rows,
            "rows_wait": t.rows_wait,
            "ckks_encrypt": t.ckks_encrypt,
            "transfer": t.transfer,
            "compute_cloud": t.compute,
            "decrypt": t.decrypt,
        },
        "cpu_s": {"hospital": self_cpu, "row_workers": workers_cpu, "cloud": cloud_cpu},
        "bytes_sent": report.bytes_sent,
        "bytes_received": report.bytes_received,
        "peak_rss_bytes": {
            "hospital": hospital_rss,
            "row_worker": t.row_workers_peak_rss,
            "cloud": cloud_rss,
        },
        "max_rel_error": max(
            abs(report.encrypted[k] - v) / max(abs(v), 1e-12) for k, v in report.plaintext.items()
        ),
    }


def print_figures(f: dict[str, Any], label: str) -> None:
    rss = f["peak_rss_bytes"]
    peak_total = rss["hospital"] + f["row_workers"] * rss["row_worker"] + rss["cloud"]
    verdict_t = "met" if f["total_s"] < TARGET_SECONDS else "MISSED"
    verdict_m = "met" if peak_total < TARGET_BYTES else "MISSED"
    workers = f"{f['row_workers']} decrypting processes" if f["row_workers"] else "sequential"
    print(f"== {label}: {f['readings']:,} readings in {f['batches']} CKKS batches ({workers})")
    print(
        f"total analysis     {f['total_s']:.2f} s   (target < {TARGET_SECONDS:.0f} s: {verdict_t})"
    )
    notes = {
        "decrypt_rows": "store: SQLite + Fernet + JSON; summed over processes",
        "rows_wait": "CKKS side idle, waiting for decrypted rows",
        "ckks_encrypt": "public-key CKKS encryption + serialization",
        "transfer": "PQ channel send + waiting for the worker's ACKs",
        "compute_cloud": "reported by the worker (other process)",
        "decrypt": "results, secret key",
    }
    for name, value in f["phases_s"].items():
        print(f"  {name:<16} {value:6.2f} s   {notes[name]}")
    cpu = f["cpu_s"]
    busy = sum(cpu.values())
    print(
        "cpu                "
        + ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items())
        + f"; {busy:.1f} s on {os.cpu_count()} cores = {busy / f['total_s']:.2f} cores busy"
    )
    print(
        f"bytes shipped      {f['bytes_sent'] / 1e6:.1f} MB to the cloud, "
        f"{f['bytes_received'] / 1e6:.1f} MB back"
    )
    print(
        f"peak memory        hospital {rss['hospital'] / 2**20:.0f} MiB"
        + (
            f" + {f['row_workers']} x {rss['row_worker'] / 2**20:.0f} MiB decrypting"
            if f["row_workers"]
            else ""
        )
        + f", cloud {rss['cloud'] / 2**20:.0f} MiB; sum {peak_total / 2**20:.0f} MiB"
        f"   (target < 1 GB: {verdict_m})"
    )
    print(f"max relative error {f['max_rel_error']:.2e}  ok={f['ok']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pacegate-bench-analytics"
    )
    parser.add_argument(
        "--workers", type=int, default=AnalysisSettings().workers, help="decrypting processes"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also run the sequential analysis (workers 0) in the same run and compare",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = WorkLayout(args.workdir.resolve())
    port = free_port()
    fill_s = setup(work, args.readings, port)
    runs = {"analysis": run_once(work, port, AnalysisSettings(workers=args.workers))}
    if args.baseline:
        runs["sequential"] = run_once(work, port, AnalysisSettings(workers=0))
    ok = all(f["ok"] for f in runs.values())
    if args.json:
        print(json.dumps({**runs, "store_fill_s": fill_s}))
        return 0 if ok else 3
    for label, figures in runs.items():
        print_figures(figures, label)
    if args.baseline:
        a, b = runs["analysis"]["total_s"], runs["sequential"]["total_s"]
        print(
            f"== {a:.2f} s with {args.workers} decrypting processes vs {b:.2f} s sequential: "
            f"{b / a:.2f}x"
        )
    if fill_s > 1:
        print(f"(set-up: filled the store in {fill_s:.1f} s, not counted)")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the confidential analytics, end to end, real parts only.

    .venv/bin/python bench/bench_analytics.py [--readings 1000000] [--workdir DIR]

1. Set-up (not timed as analysis): channel identities, hospital.yaml/cloud.yaml, a real
   SQLite store with N readings as Fernet tokens (kept in --workdir for re-runs).
2. Start ``pacegate cloud`` as a separate process (its own core), over the real
   post-quantum channel.
3. Run the analysis: stream and Fernet-decrypt rows, CKKS-encrypt, ship, compute blind,
   fetch, decrypt, check against plaintext.

Prints total time, time per phase, bytes shipped, peak memory of the hospital process and
of the cloud worker (max RSS), and the target (< 30 s, < 1 GB on a 2-core machine).
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

from cloud.config import render_default_config
from hospital.analysis import AnalysisSettings, run_analysis_async
from hospital.config import load_hospital_config
from hospital.config import render_default_config as render_hospital_config
from hospital.store import SqliteReadingStore
from pacegate.channel import ChannelIdentity, write_identity
from pacegate.ingest import IngestItem
from pacegate.layout import WorkLayout
from pacegate.reading import Reading

T0 = datetime(2025, 1, 1, tzinfo=UTC)


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
    work.cloud_config.write_text(render_default_config(work, host="127.0.0.1", port=port))
    work.hospital_config.write_text(
        render_hospital_config(work, port=0, metrics_port=0, cloud_port=port)
    )
    cfg = load_hospital_config(work.hospital_config)
    store = SqliteReadingStore.open(cfg.database, cfg.keyring)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pacegate-bench-analytics"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = WorkLayout(args.workdir.resolve())
    port = free_port()
    fill_s = setup(work, args.readings, port)
    cloud_log = open(work.root / "cloud.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pacegate",
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
        started = time.perf_counter()
        report = asyncio.run(run_analysis_async(work, settings=AnalysisSettings()))
        wall = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        cloud_log.close()
    hospital_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cloud_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    t = report.timings
    figures = {
        "readings": report.plain.n,
        "batches": report.batches,
        "ok": report.ok,
        "total_s": wall,
        "phases_s": {
            "decrypt_rows": t.decrypt_rows,
            "ckks_encrypt": t.ckks_encrypt,
            "transfer": t.transfer,
            "compute_cloud": t.compute,
            "decrypt": t.decrypt,
        },
        "bytes_sent": report.bytes_sent,
        "bytes_received": report.bytes_received,
        "peak_rss_hospital_bytes": hospital_rss,
        "peak_rss_cloud_bytes": cloud_rss,
        "store_fill_s": fill_s,
        "max_rel_error": max(
            abs(report.encrypted[k] - v) / max(abs(v), 1e-12) for k, v in report.plaintext.items()
        ),
    }
    if args.json:
        print(json.dumps(figures))
        return 0 if report.ok else 3
    print(f"readings           {figures['readings']:,} in {report.batches} CKKS batches")
    print(f"total analysis     {wall:.2f} s   (target < 30 s)")
    for name, value in figures["phases_s"].items():  # type: ignore[union-attr]
        print(f"  {name:<16} {value:.2f} s")
    print("  (transfer includes waiting for the worker's ACKs; compute runs on the other core)")
    print(
        f"bytes shipped      {report.bytes_sent / 1e6:.1f} MB to the cloud, "
        f"{report.bytes_received / 1e6:.1f} MB back"
    )
    print(
        f"peak memory        hospital {hospital_rss / 2**20:.0f} MiB, "
        f"cloud {cloud_rss / 2**20:.0f} MiB   (target < 1 GB)"
    )
    print(f"max relative error {figures['max_rel_error']:.2e}  ok={report.ok}")
    if fill_s > 1:
        print(f"(set-up: filled the store in {fill_s:.1f} s, not counted)")
    return 0 if report.ok else 3


if __name__ == "__main__":
    sys.exit(main())

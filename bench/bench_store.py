"""Benchmark of the hospital store: ingest, streaming, rotation and verification rates.

    .venv/bin/python bench/bench_store.py [--readings N] [--dir DIR] [--json]

One run, on a fresh database in a temporary directory (or DIR), with the service's settings
(WAL, synchronous=FULL, secure_delete). Reports readings/s for ``store_batch`` at several
batch sizes (each batch is one fsynced transaction, as the service commits before the
ACK, and the head is anchored, fsynced, outside the database), for a duplicate re-send, for
``iter_readings`` (decrypt + parse), for the analytics' value scan with and without the
chain check, for ``verify``, ``rotate-key`` and ``rotate-key --integrity``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hospital.store import SqliteReadingStore
from pacegate.ingest import IngestItem
from pacegate.reading import Reading

T0 = datetime(2025, 3, 1, tzinfo=UTC)


def items(n: int, start: int = 0, devices: int = 50) -> list[IngestItem]:
    return [
        IngestItem(
            f"pm-{i % devices:04d}",
            i // devices + 1,
            Reading(40 + i % 50, 55 + i % 60, 9000 + i % devices, T0 + timedelta(seconds=i)),
        )
        for i in range(start, start + n)
    ]


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def run(root: Path, total: int) -> dict[str, object]:
    out: dict[str, object] = {"readings": total}
    ingest: dict[str, float] = {}
    with SqliteReadingStore.open(root / "readings.db", root / "keyring.json") as store:
        start = 0
        for batch_size, share in ((1, 0.02), (100, 0.49), (500, 0.49)):
            n = max(batch_size, int(total * share) // batch_size * batch_size)
            data = items(n, start)
            t = time.perf_counter()
            for i in range(0, n, batch_size):
                store.store_batch(data[i : i + batch_size])
            ingest[f"batch_{batch_size}"] = rate(n, time.perf_counter() - t)
            start += n
        stored = store.count()
        out["stored"] = stored
        out["store_batch_readings_per_s"] = ingest

        data = items(500, 0)
        t = time.perf_counter()
        store.store_batch(data)
        out["duplicate_batch_500_readings_per_s"] = rate(500, time.perf_counter() - t)

        t = time.perf_counter()
        streamed = sum(len(b) for b in store.iter_readings(batch_size=1000))
        out["iter_readings_per_s"] = rate(streamed, time.perf_counter() - t)

        for checked in (False, True):
            t = time.perf_counter()
            n = sum(len(a) for a, _ in store.iter_reading_values(check_chain=checked))
            name = "values_scan_chain_checked" if checked else "values_scan"
            out[f"{name}_rows_per_s"] = rate(n, time.perf_counter() - t)

        t = time.perf_counter()
        report = store.verify()
        out["verify_rows_per_s"] = rate(report.rows, time.perf_counter() - t)
        out["verify_ok"] = report.ok

        t = time.perf_counter()
        rot = store.rotate_key()
        out["rotate_rows_per_s"] = rate(rot.reencrypted, time.perf_counter() - t)

        t = time.perf_counter()
        store.rotate_key(integrity=True)
        out["rotate_integrity_rows_per_s"] = rate(stored, time.perf_counter() - t)
    db = root / "readings.db"
    out["db_bytes_per_reading"] = round(db.stat().st_size / max(stored, 1), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--dir", type=Path, help="where to put the database (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.dir is not None:
        result = run(args.dir, args.readings)
    else:
        with tempfile.TemporaryDirectory(prefix="pacegate-bench-store-") as tmp:
            result = run(Path(tmp), args.readings)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:36} {value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PostgreSQL against SQLite: readings/s stored by ``store_batch``, same batches, same run.

    .venv/bin/python bench/bench_pgstore.py [--readings N] [--batch 100] [--writers 2] [--json]

Starts a throwaway PostgreSQL (console/postgres.py: loopback, fsync on, as a deployment
would run it), and stores the same readings through :class:`SqliteReadingStore` (WAL,
synchronous=FULL, anchored head) and :class:`PostgresReadingStore` (one transaction per
batch, committed before return: what the ACK promises), at one batch size. Then
``--writers`` processes each write their own readings as writers of their own into one
PostgreSQL database at once (several ingest nodes), and a verify of every chain. Reports
readings/s for each and the PostgreSQL/SQLite ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_store import items, rate  # noqa: E402
from console import postgres  # noqa: E402
from hospital.pgstore import PostgresReadingStore  # noqa: E402
from hospital.store import SqliteReadingStore  # noqa: E402


def _ingest(
    store: SqliteReadingStore | PostgresReadingStore, n: int, start: int, batch: int
) -> float:
    data = items(n, start)
    t = time.perf_counter()
    for i in range(0, n, batch):
        store.store_batch(data[i : i + batch])
    return time.perf_counter() - t


def _writer(dsn: str, ring: str, writer: str, n: int, start: int, batch: int, go: object) -> None:
    with PostgresReadingStore.open(dsn, Path(ring), writer) as store:
        go.wait()  # type: ignore[attr-defined]
        _ingest(store, n, start, batch)


def run(root: Path, total: int, batch: int, writers: int) -> dict[str, object]:
    out: dict[str, object] = {"readings": total, "batch": batch}
    with SqliteReadingStore.open(
        root / "sqlite" / "readings.db", root / "sqlite" / "keyring.json"
    ) as s:
        out["sqlite_readings_per_s"] = rate(total, _ingest(s, total, 0, batch))
    pgroot = Path(tempfile.mkdtemp(prefix="pacegate-bench-pg-"))
    pgroot.chmod(0o711)  # the server user must enter it
    try:
        with postgres.running(pgroot / "cluster", durable=True) as server:
            dsn = server.dsn()
            ring = root / "pg" / "keyring.json"
            ring.parent.mkdir(parents=True)
            with PostgresReadingStore.open(dsn, ring, "node-1") as p:
                out["postgresql_readings_per_s"] = rate(total, _ingest(p, total, 0, batch))
                dup = _ingest(p, min(total, 5 * batch), 0, batch)
                out["postgresql_duplicate_readings_per_s"] = rate(min(total, 5 * batch), dup)
            ctx = multiprocessing.get_context("spawn")
            go = ctx.Event()
            per = total // writers
            procs = [
                ctx.Process(
                    target=_writer,
                    args=(dsn, str(ring), f"node-{w + 2}", per, 10_000_000 * (w + 1), batch, go),
                )
                for w in range(writers)
            ]
            for proc in procs:
                proc.start()
            time.sleep(2.0)  # let every writer connect before the clock starts
            t = time.perf_counter()
            go.set()
            for proc in procs:
                proc.join()
            elapsed = time.perf_counter() - t
            if any(proc.exitcode != 0 for proc in procs):
                raise SystemExit("a writer process failed")
            out[f"postgresql_{writers}_writers_readings_per_s"] = rate(per * writers, elapsed)
            with PostgresReadingStore.open(dsn, ring, "node-1") as p:
                t = time.perf_counter()
                report = p.verify()
                out["postgresql_verify_rows_per_s"] = rate(report.rows, time.perf_counter() - t)
                out["postgresql_verify_ok"] = report.ok
                out["postgresql_rows"] = p.count()
    finally:
        shutil.rmtree(pgroot, ignore_errors=True)
    sqlite_rate = float(str(out["sqlite_readings_per_s"]))
    out["ratio_postgresql_to_sqlite"] = round(
        float(str(out["postgresql_readings_per_s"])) / sqlite_rate, 2
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacegate-bench-pgstore-") as tmp:
        result = run(Path(tmp), args.readings, args.batch, args.writers)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:40} {value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

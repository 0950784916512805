"""CKKS aggregation throughput: the front worker's in-process aggregator against a Dask
cluster of 1 and 2 workers, in one run, real parts only.

    .venv/bin/python bench/bench_dask.py [--batches 64] [--bands 1] [--per-task 8] [--json]

The same pre-encrypted session (``--batches`` batches of ``lanes(bands)`` ciphertexts, each
batch 4,096 readings, one per slot) is driven through :class:`cloud.worker.CloudSession`
exactly as the hospital drives it (OPEN, every CT, a FETCH per accumulator), three times:

1. ``InProcessAggregator`` (today's worker, the default);
2. ``DaskBackend`` on a local TLS cluster (``console.dask_cluster``) with 1 worker;
3. the same cluster with a second worker added.

Every run is decrypted and checked against the plaintext sums. Timed: OPEN to the last
RESULT, the front worker's own checks of every ciphertext included (it loads each one
under the public context before an aggregator sees it). Also printed: the time of those
checks alone, and the ratios against the in-process run. Encryption (the hospital's
work) is outside the timing.

What 2 cores mean: the front worker, the scheduler and the Dask workers share them, so
2 Dask workers cannot exceed ~2x one core's arithmetic, and the front worker's serial
checks (the "front checks" figure) bound any speed-up from above (Amdahl).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from cloud.aggregator import AggregatorFactory, InProcessAggregator
from cloud.config import DEFAULT_BATCHES_PER_TASK
from cloud.dask_aggregator import DaskBackend, DaskSettings
from cloud.worker import CloudSession
from console.dask_cluster import start_cluster, worker_name
from pacegate import analytics_wire as wire
from pacegate import ckks


def make_session(
    ctx: ts.Context, batches: int, bands: int
) -> tuple[list[list[bytes]], dict[str, np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(12)
    lanes = wire.lanes(bands)
    plan = wire.accumulator_plan(bands)
    sums = {spec.name: np.zeros(ckks.SLOTS) for spec in plan}
    cts = []
    for _ in range(batches):
        plain = [rng.integers(0, 2, ckks.SLOTS).astype(float) for _ in range(lanes)]
        plain[wire.LANE_HEART_RATE] = rng.integers(40, 180, ckks.SLOTS).astype(float)
        plain[wire.LANE_AGE] = rng.integers(18, 90, ckks.SLOTS).astype(float)
        for spec in plan:
            term = plain[spec.lane]
            sums[spec.name] += term if spec.other is None else term * plain[spec.other]
        cts.append([ckks.encrypt_vector(ctx, lane) for lane in plain])
    return cts, sums


def run_session(
    ctx: ts.Context,
    public: bytes,
    bands: int,
    cts: list[list[bytes]],
    want: dict[str, np.ndarray[Any, Any]],
    aggregator: AggregatorFactory,
) -> float:
    session = CloudSession(aggregator=aggregator)
    started = time.perf_counter()
    session.handle(wire.encode(wire.Open(bands, public)))
    for b, batch in enumerate(cts):
        for lane, data in enumerate(batch):
            reply = wire.decode(session.handle(wire.encode(wire.Ciphertext(b, lane, data))))
            if not isinstance(reply, wire.Ack):
                raise RuntimeError(f"batch {b} lane {lane}: {reply}")
    results = {}
    for spec in wire.accumulator_plan(bands):
        reply = wire.decode(session.handle(wire.encode(wire.Fetch(len(cts), spec.name))))
        if not isinstance(reply, wire.Result):
            raise RuntimeError(f"FETCH {spec.name}: {reply}")
        results[spec.name] = (reply.data, spec.degree)
    elapsed = time.perf_counter() - started
    session.close()
    for name, (data, degree) in results.items():
        err = float(np.max(np.abs(ckks.decrypt_vector(ctx, data, degree=degree) - want[name])))
        if err > 0.05:
            raise RuntimeError(f"{name} is off by {err}: the aggregate is wrong")
    return elapsed


def front_checks(public: bytes, cts: list[list[bytes]]) -> float:
    pub = ckks.load_public_context(public)
    started = time.perf_counter()
    for batch in cts:
        for data in batch:
            ckks.load_ciphertext(pub, data)
    return time.perf_counter() - started


def task_compute(public: bytes, bands: int, cts: list[list[bytes]], per_task: int) -> float:
    """Every Dask task's own work (load the lanes, fold, serialize the partials), run here
    one after another: what the cluster must compute, without Dask's transport."""
    from cloud.dask_aggregator import aggregate_chunk

    plan = wire.accumulator_plan(bands)
    aggregate_chunk(public, plan, cts[:1])  # parses the context once, as a worker does
    started = time.perf_counter()
    for i in range(0, len(cts), per_task):
        aggregate_chunk(public, plan, cts[i : i + per_task])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--bands", type=int, default=1)
    parser.add_argument(
        "--per-task", type=int, default=DEFAULT_BATCHES_PER_TASK, help="batches per Dask task"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ctx = ckks.create_context()
    public = ckks.public_context_bytes(ctx)
    cts, want = make_session(ctx, args.batches, args.bands)
    readings = args.batches * ckks.SLOTS
    out: dict[str, Any] = {
        "batches": args.batches,
        "bands": args.bands,
        "ciphertexts": args.batches * wire.lanes(args.bands),
        "readings": readings,
        "batches_per_task": args.per_task,
        "cpus": os.cpu_count(),
    }
    out["front_checks_s"] = front_checks(public, cts)
    out["task_compute_s"] = task_compute(public, args.bands, cts, args.per_task)
    seconds = {"in_process": run_session(ctx, public, args.bands, cts, want, InProcessAggregator)}
    with tempfile.TemporaryDirectory(prefix="pacegate-bench-dask-") as tmp:
        cluster = start_cluster(Path(tmp), workers=1)
        try:
            backend = DaskBackend(
                DaskSettings(
                    scheduler=cluster.address,
                    ca_file=cluster.ca_file,
                    cert=cluster.client_cert,
                    key=cluster.client_key,
                    batches_per_task=args.per_task,
                )
            )
            try:
                backend.client.wait_for_workers(1)
                run_session(ctx, public, args.bands, cts[:2], _first(want, ctx, cts), backend)
                seconds["dask_1_worker"] = run_session(ctx, public, args.bands, cts, want, backend)
                cluster.add_worker(worker_name(2))
                backend.client.wait_for_workers(2)
                seconds["dask_2_workers"] = run_session(ctx, public, args.bands, cts, want, backend)
            finally:
                backend.close()
        finally:
            cluster.stop()
    out["seconds"] = seconds
    out["readings_per_s"] = {k: readings / v for k, v in seconds.items()}
    base = seconds["in_process"]
    out["speedup_vs_in_process"] = {k: base / v for k, v in seconds.items()}
    out["dask_2_over_1"] = seconds["dask_1_worker"] / seconds["dask_2_workers"]
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"{args.batches} batches x {wire.lanes(args.bands)} ciphertexts = {readings:,} readings "
        f"(bands {args.bands}), {args.per_task} batches per Dask task, {os.cpu_count()} CPUs"
    )
    print(f"front worker's checks of every ciphertext alone: {out['front_checks_s']:.2f} s")
    print(f"every Dask task's own work, serially in this process: {out['task_compute_s']:.2f} s")
    for name, s in seconds.items():
        print(
            f"  {name:15s} {s:7.2f} s  {readings / s:10,.0f} readings/s  "
            f"x{base / s:.2f} vs in-process"
        )
    print(f"  2 Dask workers / 1 Dask worker: x{out['dask_2_over_1']:.2f}")


def _first(
    want: dict[str, np.ndarray[Any, Any]], ctx: ts.Context, cts: list[list[bytes]]
) -> dict[str, np.ndarray[Any, Any]]:
    """Plaintext sums of the first two batches (a warm-up run: workers import TenSEAL and
    parse the context once), recomputed by decrypting them."""
    del want
    sums: dict[str, np.ndarray[Any, Any]] = {}
    bands = len(cts[0]) - wire.LANE_FIRST_BAND
    for spec in wire.accumulator_plan(bands):
        total = np.zeros(ckks.SLOTS)
        for batch in cts[:2]:
            lane = np.round(ckks.decrypt_vector(ctx, batch[spec.lane]))
            other = (
                np.ones(ckks.SLOTS)
                if spec.other is None
                else np.round(ckks.decrypt_vector(ctx, batch[spec.other]))
            )
            total += lane * other
        sums[spec.name] = total
    return sums


if __name__ == "__main__":
    main()

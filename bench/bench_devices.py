"""How many simulated pacemakers one process holds: connect time, acknowledged readings/s,
the simulator's CPU and memory, against the real embedded broker or Debian's mosquitto.

    .venv/bin/python bench/bench_devices.py --count 2000 --rate 0.5 --duration 30
        [--broker mosquitto]

Prints one JSON object. It enrolls ``count`` devices in a temporary PKI first (not timed).
Numbers are from one run on the machine at hand: use them for design, not as promises.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from console.workdir import WorkLayout
from device_sim.device import Endpoint
from device_sim.fleet import FleetProgress, run_fleet
from pacegate.pki import enroll_devices, init_pki
from tests.support import BrokerHandle, embedded_broker, mosquitto_broker


def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    work = WorkLayout(root)
    t0 = time.perf_counter()
    init_pki(work.pki.root)
    enroll_devices(work.pki.root, [f"pm-{i:05d}" for i in range(args.count)])
    enroll_s = time.perf_counter() - t0
    broker_cm: AbstractContextManager[BrokerHandle] = (
        mosquitto_broker(work.pki.root, root / "mosquitto")
        if args.broker == "mosquitto"
        else embedded_broker(work.pki.root, root / "embedded")
    )
    me = psutil.Process()
    samples: list[FleetProgress] = []
    peak_rss = 0
    broker_peak_rss = 0
    with broker_cm as broker:
        broker_proc = psutil.Process(broker.proc.pid)

        def progress(p: FleetProgress) -> None:
            nonlocal peak_rss, broker_peak_rss
            samples.append(p)
            peak_rss = max(peak_rss, me.memory_info().rss)
            broker_peak_rss = max(broker_peak_rss, broker_proc.memory_info().rss)

        cpu0 = me.cpu_times()
        summary = asyncio.run(
            run_fleet(
                work.pki,
                count=args.count,
                rate=args.rate,
                duration=args.duration,
                endpoints=[Endpoint(broker.host, broker.port)],
                progress=progress,
            )
        )
        cpu1 = me.cpu_times()
    all_connected = next((p.elapsed_s for p in samples if p.connected_now == args.count), None)
    steady = [p.ack_rate for p in samples if p.connected_now == args.count]
    return {
        "broker": args.broker,
        "devices": args.count,
        "rate_hz_per_device": args.rate,
        "enroll_s": round(enroll_s, 1),
        "all_connected_after_s": all_connected,
        "summary": summary.to_json(),
        "acks_per_s_steady_mean": round(sum(steady) / len(steady), 1) if steady else None,
        "acks_per_s_offered": args.count * args.rate,
        "simulator_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1),
        "simulator_peak_rss_mb": round(peak_rss / 2**20, 1),
        "broker_peak_rss_mb": round(broker_peak_rss / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacegate-bench-devices-") as tmp:
        result = _run(args, Path(tmp))
    print(json.dumps(result, indent=1))
    return 0 if result["summary"]["acknowledged"] else 1


if __name__ == "__main__":
    sys.exit(main())

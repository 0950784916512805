"""Acknowledged means stored? Kill services with SIGKILL under ``pacegate up`` and count.

    .venv/bin/python bench/bench_ack_loss.py [--broker embedded|mosquitto]
        [--kill gateway,hospital,broker] [--devices 20] [--rate 2] [--duration 40]
        [--mosquitto-persistence "autosave_interval 10"] [--pause-gateway S] [--json]

Runs ``pacegate up`` (a subprocess; it restarts what dies) and ``pacegate devices
--acked-log``; kills each named service once, in turn, with SIGKILL, a few seconds apart;
then waits for the hospital to have committed every acknowledged reading (or a timeout)
and reports: readings acknowledged to devices, stored, acknowledged but not stored (lost),
stored more than once, the supervisor's restarts, and each service's stop time at the
final SIGTERM. ``--mosquitto-persistence`` replaces the ``autosave_*`` lines of the
Mosquitto configuration (to measure its loss window under other settings).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from console.stack import (  # noqa: E402
    MOSQUITTO_CONFIG,
    choose_endpoints,
    prepare_workdir,
    write_configs,
    write_mosquitto_config,
)
from console.workdir import WorkLayout  # noqa: E402
from device_sim.fleet import read_acked_log  # noqa: E402

UP_READY = "pacegate is up in"
WAIT_S = 90.0
# pacing between the kills (not a measured figure): readings flow before each one
SETTLE_S = 6.0
BETWEEN_KILLS_S = 4.0


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def status(work: WorkLayout) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((work.root / "supervision.json").read_text())
    except (OSError, ValueError):
        return {}
    return data


def stored_pairs(work: WorkLayout) -> list[tuple[str, int]]:
    from hospital.keyring import Keyring
    from hospital.store import SqliteReadingStore

    store = SqliteReadingStore(
        work.hospital_dir / "readings.db", Keyring.load(work.hospital_dir / "keyring.json")
    )
    try:
        return [(r.device_id, r.counter) for batch in store.iter_records() for r in batch]
    finally:
        store.close()


def exported_pairs(work: WorkLayout) -> list[tuple[str, int]]:
    """(device, counter) of every row ``pacegate hospital export`` gives (it refuses a store
    whose chain does not verify: then this raises)."""
    proc = subprocess.run(
        [sys.executable, "-m", "console", "hospital", "export", "-c", str(work.hospital_config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hospital export failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return [(str(r["device_id"]), int(r["counter"])) for r in rows]


def _set_persistence(work: WorkLayout, lines: str) -> None:
    path = work.root / MOSQUITTO_CONFIG
    text = re.sub(r"^autosave_\w+ .*\n", "", path.read_text(), flags=re.MULTILINE)
    extra = "".join(f"{line.strip()}\n" for line in lines.split(";") if line.strip())
    path.write_text(text.replace("persistence true\n", f"persistence true\n{extra}"))


def run(
    root: Path,
    *,
    broker: str = "embedded",
    kills: tuple[str, ...] = ("gateway", "hospital", "broker"),
    devices: int = 20,
    rate: float = 2.0,
    duration: float = 40.0,
    mosquitto_persistence: str | None = None,
    pause_gateway_s: float = 0.0,
) -> dict[str, Any]:
    """One run in ``root`` (a fresh directory); returns the figures (see module doc)."""
    work = WorkLayout(root / "work")
    prepare_workdir(work, devices)
    # ephemeral ports, written before 'up' (which keeps them): no race for 8883 with another
    # pacegate on the machine
    ep = choose_endpoints(prefer_defaults=False)
    write_configs(work, ep, overwrite=True)
    if broker == "mosquitto":
        write_mosquitto_config(work, ep, overwrite=True)
        if mosquitto_persistence is not None:
            _set_persistence(work, mosquitto_persistence)
    up_log = root / "up.log"
    acked_log = root / "acked.jsonl"
    with open(up_log, "w") as out:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "console",
                "up",
                "--workdir",
                str(work.root),
                "--broker",
                broker,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    fleet: subprocess.Popen[str] | None = None
    try:
        if not _wait(lambda: UP_READY in up_log.read_text(), WAIT_S):
            raise RuntimeError(f"pacegate up did not start:\n{up_log.read_text()[-3000:]}")
        fleet = subprocess.Popen(
            [
                *(sys.executable, "-m", "console", "devices", "--workdir", str(work.root)),
                *("--count", str(devices), "--rate", str(rate), "--duration", str(duration)),
                *("--drain", "60", "--acked-log", str(acked_log), "--json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        time.sleep(SETTLE_S)
        for name in kills:
            pid = status(work).get(name, {}).get("pid")
            if not pid:
                raise RuntimeError(f"no pid for {name}: {status(work)}")
            gateway = status(work).get("gateway", {}).get("pid")
            if name == "broker" and pause_gateway_s and gateway:
                # the gateway frozen (alive, so not restarted): the broker queues for it
                os.kill(int(gateway), signal.SIGSTOP)
                time.sleep(pause_gateway_s)
            os.kill(int(pid), signal.SIGKILL)
            if not _wait(
                lambda n=name: (
                    status(work).get(n, {}).get("restarts", 0) >= 1  # type: ignore[misc]
                    and bool(status(work).get(n, {}).get("pid"))
                ),
                WAIT_S,
            ):
                raise RuntimeError(f"{name} was not restarted:\n{up_log.read_text()[-3000:]}")
            if name == "broker" and pause_gateway_s and gateway:
                os.kill(int(gateway), signal.SIGCONT)
            time.sleep(BETWEEN_KILLS_S)
        summary_text, _ = fleet.communicate(timeout=duration + 180)
        summary = json.loads(summary_text)
        acked = read_acked_log(acked_log)
        _wait(lambda: set(acked) <= set(stored_pairs(work)), WAIT_S)
        stored = Counter(exported_pairs(work))  # what a clinician or auditor reads
        restarts = {n: e.get("restarts", 0) for n, e in status(work).items()}
        up.send_signal(signal.SIGTERM)
        up_exit = up.wait(timeout=90)
    finally:
        for proc in (fleet, up):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    stops = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"(\w+) stopped in ([\d.]+) s", up_log.read_text())
    }
    return {
        "broker": broker,
        "mosquitto_persistence": mosquitto_persistence,
        "gateway_paused_before_broker_kill_s": pause_gateway_s,
        "killed": list(kills),
        "devices": devices,
        "rate_hz": rate,
        "duration_s": duration,
        "acknowledged": len(acked),
        "acknowledged_distinct": len(set(acked)),
        "fleet_summary": summary,
        "stored": sum(stored.values()),
        "lost": sorted(set(acked) - set(stored)),
        "stored_twice": sorted(p for p, n in stored.items() if n > 1),
        "restarts": restarts,
        "stop_s": stops,
        "up_exit_code": up_exit,
        "up_log_killed_after_grace": "did not stop within" in up_log.read_text(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", choices=("embedded", "mosquitto"), default="embedded")
    ap.add_argument("--kill", default="gateway,hospital,broker")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--mosquitto-persistence", help='e.g. "autosave_interval 1"')
    ap.add_argument(
        "--pause-gateway",
        type=float,
        default=0.0,
        help="SIGSTOP the gateway this long before the broker kill (SIGCONT after)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacegate-ackloss-") as tmp:
        # run as root, mosquitto drops to its own account, which must enter this directory
        os.chmod(tmp, 0o711)  # noqa: S103 (search only, no listing)
        result = run(
            Path(tmp),
            broker=args.broker,
            kills=tuple(k for k in args.kill.split(",") if k),
            devices=args.devices,
            rate=args.rate,
            duration=args.duration,
            mosquitto_persistence=args.mosquitto_persistence,
            pause_gateway_s=args.pause_gateway,
        )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['broker']}: killed {', '.join(result['killed'])}: "
            f"{result['acknowledged']} acknowledged, {result['stored']} stored, "
            f"{len(result['lost'])} lost, {len(result['stored_twice'])} stored twice; "
            f"restarts {result['restarts']}; stop times {result['stop_s']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``pacegate devices``: N simulated pacemakers in one process, one event loop.

Each device is two coroutines (sensor and radio, see :mod:`device_sim.device`) with its own
certificate, key, PSK, MQTT client id and persisted counter. The fleet:

1. picks the first N *active* devices of the PKI registry (sorted by id);
2. loads their bundles and opens their counter stores (one fsync each) in worker threads;
3. connects them (at most ``connect_concurrency`` TLS handshakes at once, so a fleet does
   not overflow the broker's accept backlog), each sampling at ``rate`` Hz with a random
   phase so that publications spread over the period;
4. after ``duration`` seconds stops sampling, waits up to ``drain_s`` for outstanding
   PUBACKs, says DISCONNECT, and returns a :class:`FleetSummary`.

Accounting: every reading produced ends in exactly one of ``acknowledged``, ``dropped``
(buffer overflow while disconnected) or ``failed`` (still unacknowledged at the end), so
``produced == acknowledged + dropped + failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from device_sim.counter import DEFAULT_BLOCK, CounterStore
from device_sim.device import DEFAULT_BUFFER_LIMIT, Backoff, Endpoint, SimulatedDevice
from device_sim.model import HeartModel, derive_seed
from pacegate.errors import ConfigError
from pacegate.layout import PkiLayout
from pacegate.sealed import PSK_SIZE
from pacegate.secretfile import read_secret
from pacegate.tlsconf import client_context

log = logging.getLogger(__name__)

# amqtt accepts about 150 TLS connections/s on 2 cores; more handshakes in parallel only
# lengthen each one and risk the listen backlog.
DEFAULT_CONNECT_CONCURRENCY = 64
DEFAULT_DRAIN_S = 5.0
PROGRESS_INTERVAL_S = 0.5


@dataclass(frozen=True)
class FleetSummary:
    devices: int
    connected: int  # devices whose MQTT session was accepted at least once
    sent: int
    acknowledged: int
    failed: int
    dropped: int
    duration_s: float
    produced: int
    retransmitted: int
    connect_failures: int
    reconnects: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FleetProgress:
    elapsed_s: float
    devices: int
    connected_now: int
    sent: int
    acknowledged: int
    failed: int
    dropped: int
    ack_rate: float  # acknowledged readings per second over the last interval


@dataclass(frozen=True)
class DeviceBundle:
    device_id: str
    cert: Path
    key: Path
    psk: bytes


class AckedLog:
    """``--acked-log FILE``: one JSON line per reading the broker acknowledged,
    ``{"device_id": "pm-0001", "counter": 17}``, appended as the PUBACKs arrive (flushed at
    every line, so that a killed simulator leaves what it had seen). What a pacemaker would
    delete from its buffer: an audit compares it with what the hospital stored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed by close()

    def record(self, device_id: str, counter: int) -> None:
        self._file.write(json.dumps({"device_id": device_id, "counter": counter}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_acked_log(path: Path) -> list[tuple[str, int]]:
    """The (device_id, counter) pairs of an ``--acked-log`` file, in order."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            out.append((str(entry["device_id"]), int(entry["counter"])))
    return out


def active_device_ids(pki: PkiLayout) -> list[str]:
    """Active (not revoked) enrolled device ids, sorted, from the PKI registry."""
    from pacegate.pki import device_ids

    return device_ids(pki.root, status="active")


def load_bundle(pki: PkiLayout, device_id: str) -> DeviceBundle:
    """What is flashed on a device: certificate, key and PSK (checked, not logged)."""
    psk_path = pki.device_psk(device_id)
    fix = f"re-enroll it: pacegate pki enroll <new id> --dir {pki.root}"
    psk = read_secret(psk_path, "device PSK", missing_fix=fix)
    if len(psk) != PSK_SIZE:
        raise ConfigError(psk_path, "", f"a PSK is {PSK_SIZE} raw bytes, got {len(psk)}", fix=fix)
    return DeviceBundle(device_id, pki.device_cert(device_id), pki.device_key(device_id), psk)


def select_devices(pki: PkiLayout, count: int, *, skip: int = 0) -> list[str]:
    """``count`` active devices, after the first ``skip`` (several simulator processes
    share one PKI: each takes its own slice)."""
    if count < 1:
        raise ConfigError(None, "--count", f"must be at least 1, got {count}")
    if skip < 0:
        raise ConfigError(None, "--skip", f"must be at least 0, got {skip}")
    ids = active_device_ids(pki)[skip:]
    if len(ids) < count:
        raise ConfigError(
            pki.registry,
            "devices",
            f"{count} devices asked for, but only {len(ids)} active devices are enrolled",
            fix=f"enroll {count - len(ids)} more with 'pacegate pki enroll DEVICE_ID "
            f"--dir {pki.root}', or lower --count",
        )
    return ids[:count]


def _prepare(
    pki: PkiLayout, ids: list[str], counter_block: int
) -> list[tuple[DeviceBundle, ssl.SSLContext, CounterStore]]:
    out = []
    for did in ids:
        bundle = load_bundle(pki, did)
        ctx = client_context(pki.ca_cert, bundle.cert, bundle.key)
        store = CounterStore(pki.device_counter(did), did, block=counter_block)
        store.reserve()  # the first block is durable before the first reading
        out.append((bundle, ctx, store))
    return out


def _totals(devices: list[SimulatedDevice]) -> dict[str, int]:
    t = {
        "produced": 0,
        "sent": 0,
        "acknowledged": 0,
        "dropped": 0,
        "retransmitted": 0,
        "connect_failures": 0,
        "reconnects": 0,
        "connected": 0,
        "connected_now": 0,
        "unacknowledged": 0,
    }
    for d in devices:
        s = d.stats
        t["produced"] += s.produced
        t["sent"] += s.sent
        t["acknowledged"] += s.acknowledged
        t["dropped"] += s.dropped
        t["retransmitted"] += s.retransmitted
        t["connect_failures"] += s.connect_failures
        t["reconnects"] += max(0, s.connects - 1)
        t["connected"] += s.connects > 0
        t["connected_now"] += d.connected
        t["unacknowledged"] += d.unacknowledged
    return t


async def run_fleet(
    pki: PkiLayout,
    *,
    endpoints: Sequence[Endpoint],
    count: int,
    rate: float,
    duration: float,
    seed: int = 0,
    counter_block: int = DEFAULT_BLOCK,
    buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    connect_concurrency: int = DEFAULT_CONNECT_CONCURRENCY,
    drain_s: float = DEFAULT_DRAIN_S,
    progress: Callable[[FleetProgress], None] | None = None,
    stop: asyncio.Event | None = None,
    acked_log: Path | None = None,
    skip: int = 0,
) -> FleetSummary:
    """Run ``count`` enrolled devices of the PKI ``pki`` against the broker at ``endpoints``
    (one, or several edge nodes: each device has a home node and fails over to the next) for
    ``duration`` seconds at ``rate`` Hz each (or until ``stop`` is set), then drain and
    disconnect."""
    if not rate > 0:
        raise ConfigError(None, "--rate", f"must be > 0 readings/s, got {rate}")
    if not duration > 0:
        raise ConfigError(None, "--duration", f"must be > 0 s, got {duration}")
    if not endpoints:
        raise ConfigError(None, "--broker", "no broker endpoint given")
    ids = select_devices(pki, count, skip=skip)
    targets = tuple(endpoints)
    prepared = await asyncio.to_thread(_prepare, pki, ids, counter_block)
    gate = asyncio.Semaphore(connect_concurrency)
    rng = random.Random(seed)
    audit = AckedLog(acked_log) if acked_log is not None else None
    devices = [
        SimulatedDevice(
            device_id=bundle.device_id,
            psk=bundle.psk,
            ssl_context=ctx,
            endpoints=targets,
            counter=store,
            model=HeartModel(bundle.device_id, seed=seed),
            connect_gate=gate,
            backoff=Backoff(random.Random(derive_seed(seed, "backoff:" + bundle.device_id))),
            buffer_limit=buffer_limit,
            on_acknowledged=audit.record if audit is not None else None,
        )
        for bundle, ctx, store in prepared
    ]
    log.info(
        "starting %d devices against %s at %.3g Hz for %.1f s",
        len(devices),
        ", ".join(f"{t.host}:{t.port}" for t in targets),
        rate,
        duration,
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    radios = [asyncio.create_task(d.stay_connected(), name=f"radio:{d.device_id}") for d in devices]
    sensors = [
        asyncio.create_task(
            d.sample_forever(rate, phase_s=rng.uniform(0.0, 1.0 / rate)),
            name=f"sensor:{d.device_id}",
        )
        for d in devices
    ]
    reporter = (
        asyncio.create_task(_report(devices, progress, started)) if progress is not None else None
    )
    try:
        if stop is None:
            await asyncio.sleep(duration)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=duration)
        for t in sensors:
            t.cancel()
        await asyncio.gather(*sensors, return_exceptions=True)
        drain_until = loop.time() + drain_s
        while loop.time() < drain_until and any(d.unacknowledged and d.connected for d in devices):  # noqa: ASYNC110 - polls state that has no event (a counter, a flag)
            await asyncio.sleep(0.05)
    finally:
        for t in sensors:
            t.cancel()
        for d in devices:
            d.disconnect()
        for t in radios:
            t.cancel()
        await asyncio.gather(*sensors, *radios, return_exceptions=True)
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        if audit is not None:
            audit.close()
    elapsed = loop.time() - started
    totals = _totals(devices)
    if progress is not None:
        # The last frame outlives the connections: show who connected during the run and the
        # run's average rate, not the zeros of a fleet that has just hung up.
        final = dict(totals, connected_now=totals["connected"])
        progress(
            _progress(final, len(devices), elapsed, totals["acknowledged"] / max(elapsed, 1e-9))
        )
    return FleetSummary(
        devices=len(devices),
        connected=totals["connected"],
        sent=totals["sent"],
        acknowledged=totals["acknowledged"],
        failed=totals["unacknowledged"],
        dropped=totals["dropped"],
        duration_s=round(elapsed, 3),
        produced=totals["produced"],
        retransmitted=totals["retransmitted"],
        connect_failures=totals["connect_failures"],
        reconnects=totals["reconnects"],
    )


def _progress(t: dict[str, int], devices: int, elapsed: float, ack_rate: float) -> FleetProgress:
    return FleetProgress(
        elapsed_s=elapsed,
        devices=devices,
        connected_now=t["connected_now"],
        sent=t["sent"],
        acknowledged=t["acknowledged"],
        failed=t["unacknowledged"],
        dropped=t["dropped"],
        ack_rate=ack_rate,
    )


async def _report(
    devices: list[SimulatedDevice], progress: Callable[[FleetProgress], None], started: float
) -> None:
    loop = asyncio.get_running_loop()
    last_acked, last_at = 0, started
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        now = loop.time()
        t = _totals(devices)
        rate = (t["acknowledged"] - last_acked) / max(now - last_at, 1e-9)
        last_acked, last_at = t["acknowledged"], now
        progress(_progress(t, len(devices), now - started, rate))

"""One simulated pacemaker: takes readings on a timer, seals them, and publishes them at
QoS 1 over its own mTLS connection, reconnecting with exponential backoff and full jitter.

Two coroutines per device, no thread: :meth:`SimulatedDevice.sample_forever` (the sensor)
and :meth:`SimulatedDevice.stay_connected` (the radio). They share a bounded queue:

    sample -> seal (counter from the NVS store) -> pending (bounded; oldest dropped)
           -> in flight (PUBLISH written, PUBACK awaited; at most MAX_IN_FLIGHT)
           -> acknowledged

When a connection drops, readings in flight go back to the front of the queue and are sent
again on the next connection: the *same* bytes (same counter, same nonce, same plaintext),
so a retransmission is never a nonce reuse; the gateway's replay window drops the copy if
the first one did arrive (MQTT QoS 1 is at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from device_sim.counter import CounterStore
from device_sim.model import HeartModel
from device_sim.mqtt import (
    ConnectionLost,
    ConnectionRefused,
    MqttConnection,
    MqttProtocolError,
    PubAck,
)
from pacegate.errors import InvariantError
from pacegate.identity import telemetry_topic
from pacegate.log import security_event
from pacegate.sealed import new_epoch, seal_reading

log = logging.getLogger(__name__)

# An ESP32 keeps a few hundred sealed readings (40 bytes each) in RAM while the broker is
# unreachable: 512 readings is 20 KB and 8.5 minutes at 1 Hz. Beyond that the oldest go.
DEFAULT_BUFFER_LIMIT = 512
# At most this many PUBLISH awaiting PUBACK per device (like MQTT 5's Receive Maximum):
# bounds the memory a slow broker can make us hold in transport buffers.
MAX_IN_FLIGHT = 32
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
# A connection that lasted this long counts as healthy: the next failure starts the backoff
# from the beginning. A broker that accepts and then drops us at once keeps backing off.
STABLE_CONNECTION_S = 10.0
KEEPALIVE_S = 60
CONNECT_TIMEOUT_S = 20.0
# Moving to another edge node after a failed connect waits U(0, this): enough to spread a
# fleet that lost its node over a second, far below the backoff's 30 s ceiling.
FAILOVER_JITTER_S = 1.0


class Backoff:
    """Exponential backoff with full jitter (sans-IO): delay ~ U(0, min(cap, base * 2^n)).

    Full jitter spreads a fleet's reconnections after a broker restart over the whole
    window instead of synchronising them into waves.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        base: float = BACKOFF_BASE_S,
        cap: float = BACKOFF_CAP_S,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self._rng = rng
        self.base = base
        self.cap = cap
        self.attempt = 0

    def ceiling(self) -> float:
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0

    def rng_uniform(self, ceiling: float) -> float:
        """A jittered pause in [0, ceiling) that does not grow the backoff."""
        return self._rng.uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int


class EndpointList:
    """Where a device connects next (sans-IO): one broker, or several edge nodes.

    A device starts at its home endpoint (``start``, e.g. spread over the nodes by device id)
    and stays there while it can. A connection that cannot be opened moves it to the next
    endpoint; a connection that was open and was lost is first retried where it was (a node
    restarted by its supervisor is back in about a second), and moves on if that retry fails.
    ``round_failed()`` says every endpoint has failed in a row: only then does the device wait
    out its full backoff, so a dead node costs a failover of one connect attempt, not 30 s.
    """

    def __init__(self, endpoints: Sequence[Endpoint], *, start: int = 0) -> None:
        if not endpoints:
            raise ValueError("a device needs at least one broker endpoint")
        self.endpoints = tuple(endpoints)
        self._index = start % len(self.endpoints)
        self._failures_in_row = 0

    @property
    def current(self) -> Endpoint:
        return self.endpoints[self._index]

    def connected(self) -> None:
        self._failures_in_row = 0

    def connect_failed(self) -> None:
        self._failures_in_row += 1
        self._index = (self._index + 1) % len(self.endpoints)

    def round_failed(self) -> bool:
        """True when the last ``len(endpoints)`` attempts all failed (or there is one)."""
        return self._failures_in_row >= len(self.endpoints) or len(self.endpoints) == 1


@dataclass(slots=True)
class DeviceStats:
    produced: int = 0  # readings sealed
    sent: int = 0  # distinct readings written to the broker at least once
    retransmitted: int = 0  # PUBLISH written again after a reconnect
    acknowledged: int = 0  # distinct readings the broker acknowledged (PUBACK)
    dropped: int = 0  # oldest readings dropped because the buffer was full
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0


@dataclass(slots=True)
class _Outgoing:
    counter: int
    payload: bytes
    sent: bool = False


@dataclass
class SimulatedDevice:
    device_id: str
    psk: bytes = field(repr=False)
    ssl_context: ssl.SSLContext = field(repr=False)
    # the broker, or the edge nodes in the order this device tries them (EndpointList)
    endpoints: Sequence[Endpoint]
    counter: CounterStore
    model: HeartModel
    connect_gate: asyncio.Semaphore = field(repr=False)
    backoff: Backoff = field(repr=False)
    buffer_limit: int = DEFAULT_BUFFER_LIMIT
    max_in_flight: int = MAX_IN_FLIGHT
    keepalive: int = KEEPALIVE_S
    stats: DeviceStats = field(default_factory=DeviceStats)
    # This boot's epoch: the v2 seal's key is derived from (PSK, device, epoch), so a counter
    # file rolled back to an old copy never repeats a (key, nonce) pair (docs/devices.md).
    epoch: bytes = field(default_factory=new_epoch, repr=False)
    # called with (device_id, counter) for each reading the broker acknowledged
    on_acknowledged: Callable[[str, int], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.buffer_limit < 1:
            raise ValueError(f"buffer_limit must be >= 1, got {self.buffer_limit}")
        self.topic = telemetry_topic(self.device_id)
        self._pending: deque[_Outgoing] = deque()
        self._in_flight: dict[int, _Outgoing] = {}
        self._conn: MqttConnection | None = None
        # home node by device id: a fleet spreads over the edge nodes, each device stably
        self.route = EndpointList(self.endpoints, start=zlib.crc32(self.device_id.encode()))

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint the device is connected to, or tries next."""
        return self.route.current

    # -- what the fleet reads --------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def unacknowledged(self) -> int:
        """Readings produced and neither acknowledged nor dropped (buffered or in flight)."""
        return len(self._pending) + len(self._in_flight)

    # -- the sensor ------------------------------------------------------------------------
    def take_reading(self, dt: float, when: datetime) -> int:
        """Sample the model, seal the reading under a fresh counter, queue it, send what the
        connection allows. Returns the counter used."""
        reading = self.model.step(dt, when)
        counter = self.counter.next()
        self._enqueue(
            _Outgoing(
                counter, seal_reading(self.psk, self.device_id, counter, reading, epoch=self.epoch)
            )
        )
        self.stats.produced += 1
        self._pump()
        return counter

    async def sample_forever(self, rate_hz: float, *, phase_s: float = 0.0) -> None:
        """Take ``rate_hz`` readings per second until cancelled. Late ticks are not caught
        up in a burst: a sensor that fell behind just samples at the next period."""
        loop = asyncio.get_running_loop()
        period = 1.0 / rate_hz
        await asyncio.sleep(phase_s)
        next_at = loop.time()
        while True:
            if self.counter.needs_reservation:
                # the fsync of a new block runs off the event loop
                await asyncio.to_thread(self.counter.reserve)
            self.take_reading(period, datetime.now(UTC))
            next_at += period
            delay = next_at - loop.time()
            if delay < 0:
                next_at = loop.time()
                delay = 0.0
            await asyncio.sleep(delay)

    def _enqueue(self, item: _Outgoing) -> None:
        while len(self._pending) >= self.buffer_limit:
            self._pending.popleft()
            self.stats.dropped += 1
        self._pending.append(item)

    # -- the radio -------------------------------------------------------------------------
    def _pump(self) -> None:
        conn = self._conn
        if conn is None:
            return
        while self._pending and len(self._in_flight) < self.max_in_flight:
            item = self._pending.popleft()
            pid, data = conn.protocol.publish(self.topic, item.payload, qos=1, dup=item.sent)
            if item.sent:
                self.stats.retransmitted += 1
            else:
                self.stats.sent += 1
                item.sent = True
            if pid is None:
                raise InvariantError("pid unset here (QoS 1)")
            self._in_flight[pid] = item
            conn.write(data)

    def _requeue_in_flight(self) -> None:
        items = sorted(self._in_flight.values(), key=lambda o: o.counter)
        self._in_flight.clear()
        self._pending.extendleft(reversed(items))
        while len(self._pending) > self.buffer_limit:
            self._pending.popleft()
            self.stats.dropped += 1

    async def _connect(self) -> MqttConnection:
        async with self.connect_gate:
            return await MqttConnection.open(
                self.endpoint.host,
                self.endpoint.port,
                self.ssl_context,
                self.device_id,
                keepalive=self.keepalive,
                timeout=CONNECT_TIMEOUT_S,
            )

    async def stay_connected(self) -> None:
        """Connect, publish, reconnect after any failure, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn = await self._connect()
            except (OSError, ssl.SSLError, TimeoutError, ConnectionLost, ConnectionRefused) as exc:
                self.stats.connect_failures += 1
                log.debug("%s: connect to %s failed: %s", self.device_id, self.endpoint, exc)
                await self._after_connect_failure()
                continue
            except MqttProtocolError as exc:
                self.stats.connect_failures += 1
                self._report_protocol_error(exc)
                await self._after_connect_failure()
                continue
            self.stats.connects += 1
            self.route.connected()
            connected_at = loop.time()
            self._conn = conn
            try:
                self._pump()
                while True:
                    for event in await conn.read_events():
                        if not isinstance(event, PubAck):
                            continue
                        item = self._in_flight.pop(event.packet_id, None)
                        if item is not None:
                            self.stats.acknowledged += 1
                            if self.on_acknowledged is not None:
                                self.on_acknowledged(self.device_id, item.counter)
                    self._pump()
            except (ConnectionLost, OSError, ssl.SSLError) as exc:
                log.debug("%s: connection lost: %s", self.device_id, exc)
            except MqttProtocolError as exc:
                self._report_protocol_error(exc)
            finally:
                self._conn = None
                conn.close(graceful=False)
                self._requeue_in_flight()
            self.stats.disconnects += 1
            if loop.time() - connected_at >= STABLE_CONNECTION_S:
                self.backoff.reset()
            await asyncio.sleep(self.backoff.next_delay())

    async def _after_connect_failure(self) -> None:
        """Move to the next endpoint; wait the backoff only once every endpoint has failed
        (a short jittered pause otherwise, so a fleet failing over does not stampede)."""
        self.route.connect_failed()
        if self.route.round_failed():
            await asyncio.sleep(self.backoff.next_delay())
        else:
            await asyncio.sleep(self.backoff.rng_uniform(FAILOVER_JITTER_S))

    def _report_protocol_error(self, exc: MqttProtocolError) -> None:
        security_event(
            "broker_protocol_error",
            component="device_sim",
            reason=exc.reason,
            peer=f"{self.endpoint.host}:{self.endpoint.port}",
            device=self.device_id,
            detail=str(exc),
        )

    def disconnect(self) -> None:
        """Say DISCONNECT and close (after the fleet cancelled :meth:`stay_connected`)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close(graceful=True)

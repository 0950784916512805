"""Forwarding that loses nothing: batches over the PQ channel, or into the encrypted spool.

A reading is *durable* once the hospital acknowledged its batch (the hospital ACKs only after
its commit) or once it is written to the spool. Only then does the service persist the replay
window and acknowledge the MQTT message (:class:`Pending` carries what the ack needs). So at
every instant a reading is held by at least one of: the broker (unacked QoS 1 message in the
gateway's persistent session), the spool, the hospital's database.

Order: while the spool holds anything, new batches are appended to it rather than sent, and
the spool drains oldest first, so the hospital receives readings in arrival order.

When the spool is full (gateway.yaml ``spool.when_full: pause-mqtt``) the batch is *not*
acknowledged; the service leaves the broker, which keeps the messages in the session, and
comes back once the spool has room again. Counted in ``pacegate_gateway_spool_full_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import HospitalSettings
from gateway.metrics import GatewayMetrics
from gateway.spool import Spool, SpoolFull
from pacegate.errors import InvariantError, PacegateError, RemoteProtocolError
from pacegate.ingest import IngestAck, IngestBatch, IngestItem, decode, encode_batch
from pacegate.log import security_event

log = logging.getLogger("pacegate.gateway.forwarder")

# Resume MQTT once this share of the spool is free again, so that a full spool does not make
# the gateway flap between connected and paused on every drained batch.
RESUME_FREE_SHARE = 0.1


class ChannelStream(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    def close(self) -> Any: ...


Connector = Callable[[], Awaitable[ChannelStream]]


@dataclass(frozen=True, slots=True)
class Pending:
    """An accepted reading and what is needed to acknowledge its MQTT message."""

    item: IngestItem
    mid: int
    qos: int
    generation: int  # the MQTT connection it arrived on; acks to older ones are not sent
    arrived: float  # time.monotonic()


class HospitalUnavailable(Exception):
    """The batch did not reach durable storage at the hospital (try again / spool)."""


class Forwarder:
    def __init__(
        self,
        settings: HospitalSettings,
        spool: Spool,
        metrics: GatewayMetrics,
        *,
        connector: Connector | None,
        on_durable: Callable[[Sequence[Pending]], None],
        on_spool_full: Callable[[], None],
        on_spool_room: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self._connector = connector
        self._on_durable = on_durable
        self._on_spool_full = on_spool_full
        self._on_spool_room = on_spool_room
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._stream: ChannelStream | None = None
        self._next_attempt = 0.0
        self._failures = 0
        self._batch_id = random.SystemRandom().getrandbits(32) << 16
        self._paused = False
        self.metrics.spooled.set(spool.readings)

    # -- input -----------------------------------------------------------------------------
    def submit(self, pending: Pending) -> None:
        self._queue.put_nowait(pending)

    def drop_queued(self) -> int:
        """Forget queued readings that are not durable (their MQTT messages come again)."""
        n = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            n += 1
        return n

    @property
    def connected(self) -> bool:
        return self._stream is not None

    # -- main loop -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                if self._stream is None and time.monotonic() >= self._next_attempt:
                    await self._connect()
                busy = self._stream is not None and bool(self.spool)
                batch = await self._collect(stop, wait=not busy)
                if batch:
                    await self._handle(batch)
                if self._stream is not None and self.spool:
                    await self._drain_one()
        finally:
            await self._disconnect()

    async def _collect(self, stop: asyncio.Event, *, wait: bool) -> list[Pending]:
        """Up to ``batch_max_readings`` readings; with ``wait``, block for the first until it
        comes, the next reconnect attempt is due, or ``stop``.

        The batch closes as soon as no more readings are waiting (after one turn of the
        loop, so that the messages paho's thread has already handed over are in), and at
        the latest ``batch_max_delay`` after the first while they keep coming. Waiting out
        the window on an idle channel only added latency (it set the median): the next
        batch fills while this one is in flight to the hospital, so under load the batches
        still grow (group commit), and at a trickle each reading goes out at once."""
        batch: list[Pending] = []
        if self._queue.empty():
            if not wait:
                return batch
            timeout = 0.5
            if self._stream is None:
                timeout = min(timeout, max(0.0, self._next_attempt - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                batch.append(await asyncio.wait_for(self._queue.get(), timeout))
            if not batch or stop.is_set():
                return batch
        deadline = time.monotonic() + self.settings.batch_max_delay_s
        limit = self.settings.batch_max_readings
        while len(batch) < limit:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0)  # let readings already posted to the loop arrive
            if self._queue.empty():
                break  # nothing more waiting: send now, the next batch fills meanwhile
        return batch

    async def _handle(self, batch: list[Pending]) -> None:
        if self._paused:
            # MQTT is paused: these are not durable and will be delivered again
            return
        if self._stream is not None and not self.spool:
            try:
                await self._send([p.item for p in batch])
            except HospitalUnavailable:
                pass
            else:
                self.metrics.forwarded.inc(len(batch))
                self._durable(batch)
                return
        try:
            self.spool.append([p.item for p in batch])
        except SpoolFull as exc:
            self._paused = True
            self.metrics.spool_full.inc()
            log.error(
                "spool full (%s): pausing MQTT; the broker keeps the %d unacknowledged "
                "readings until the hospital is back",
                exc,
                len(batch) + self._queue.qsize(),
            )
            self.drop_queued()
            self._on_spool_full()
            return
        self.metrics.spooled.set(self.spool.readings)
        self._durable(batch)

    def _durable(self, batch: Sequence[Pending]) -> None:
        now = time.monotonic()
        for p in batch:
            self.metrics.forward_latency.observe(now - p.arrived)
        self._on_durable(batch)

    async def _drain_one(self) -> None:
        spooled = self.spool.oldest()
        if spooled is None:
            return
        try:
            await self._send(list(spooled.items))
        except HospitalUnavailable:
            return
        self.spool.remove(spooled.seq)
        self.metrics.forwarded.inc(len(spooled.items))
        self.metrics.spooled.set(self.spool.readings)
        if not self.spool:
            log.info("spool drained")
        if self._paused and self.spool.room() >= self.spool.max_readings * RESUME_FREE_SHARE:
            self._paused = False
            log.info("spool has room again: resuming MQTT")
            self._on_spool_room()

    # -- the channel -----------------------------------------------------------------------
    async def _send(self, items: list[IngestItem]) -> IngestAck:
        stream = self._stream
        if stream is None:
            raise InvariantError("stream unset here")
        self._batch_id += 1
        batch = IngestBatch(self._batch_id, tuple(items))
        try:
            await stream.send(encode_batch(batch))
            raw = await asyncio.wait_for(stream.recv(), self.settings.ack_timeout_s)
            ack = decode(raw)
            if not isinstance(ack, IngestAck):
                raise RemoteProtocolError("hospital sent a BATCH, expected an ACK")
            if ack.batch_id != batch.batch_id or ack.stored + ack.duplicates != len(items):
                raise RemoteProtocolError(
                    f"ACK for batch {ack.batch_id} ({ack.stored}+{ack.duplicates}) does not "
                    f"match batch {batch.batch_id} of {len(items)}"
                )
        except RemoteProtocolError as exc:
            security_event(
                "hospital_protocol_error", component="gateway", reason=exc.reason, detail=str(exc)
            )
            await self._lost(f"protocol error: {exc}")
            raise HospitalUnavailable from None
        except (TimeoutError, OSError, PacegateError, EOFError, ConnectionError) as exc:
            await self._lost(f"{type(exc).__name__}: {exc}")
            raise HospitalUnavailable from None
        return ack

    async def _connect(self) -> None:
        if self._connector is None:
            self._schedule_retry()
            return
        try:
            self._stream = await asyncio.wait_for(
                self._connector(), max(self.settings.ack_timeout_s, 5.0)
            )
        except RemoteProtocolError as exc:
            security_event(
                "hospital_refused", component="gateway", reason=exc.reason, detail=str(exc)
            )
            self._schedule_retry()
        except (TimeoutError, OSError, PacegateError, EOFError, ConnectionError) as exc:
            if self._failures == 0:
                log.warning(
                    "hospital %s:%d unreachable (%s); spooling",
                    self.settings.host,
                    self.settings.port,
                    exc,
                )
            self._schedule_retry()
        else:
            self._failures = 0
            self.metrics.hospital_up.set(1)
            log.info("hospital channel up (%s:%d)", self.settings.host, self.settings.port)

    def _schedule_retry(self) -> None:
        self._failures += 1
        base = self.settings.reconnect_min_s * 2 ** min(self._failures - 1, 16)
        delay = min(self.settings.reconnect_max_s, base)
        delay *= random.uniform(0.5, 1.0)  # noqa: S311 (jitter, not a secret)
        self._next_attempt = time.monotonic() + delay

    async def _lost(self, why: str) -> None:
        log.warning("hospital channel lost (%s); spooling until it returns", why)
        await self._disconnect()
        self._schedule_retry()

    async def _disconnect(self) -> None:
        stream, self._stream = self._stream, None
        self.metrics.hospital_up.set(0)
        if stream is not None:
            with contextlib.suppress(Exception):
                res = stream.close()
                if inspect.isawaitable(res):
                    await asyncio.wait_for(res, 2.0)

"""The gateway's batches to the hospital: sent as soon as nothing more is waiting.

The forwarder runs against an in-memory channel stream (the hospital side is this test: it
reads each BATCH and answers its ACK when told to), so that what is in each batch, and when
it leaves relative to the other readings, is decided by the test and not by timing. The
batch window is an hour: a forwarder that waited it out would never send during the test
(pytest's timeout would fail it), so no wall-clock figure is asserted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import HospitalSettings
from gateway.forwarder import Forwarder, Pending
from gateway.metrics import GatewayMetrics
from gateway.spool import Spool
from pacegate.ingest import IngestAck, IngestBatch, IngestItem, decode, encode_ack
from pacegate.reading import Reading

AN_HOUR_S = 3600.0


class HospitalEnd:
    """The hospital's end of an in-memory channel: batches received, ACKs on request."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue[IngestBatch] = asyncio.Queue()
        self._acks: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = False

    async def send(self, data: bytes) -> None:
        message = decode(data)
        assert isinstance(message, IngestBatch)
        await self.batches.put(message)

    async def recv(self) -> bytes:
        return await self._acks.get()

    def close(self) -> None:
        self.closed = True

    def ack(self, batch: IngestBatch) -> None:
        self._acks.put_nowait(encode_ack(IngestAck(batch.batch_id, len(batch.items), 0)))


def _settings(*, max_readings: int = 200) -> HospitalSettings:
    return HospitalSettings(
        host="127.0.0.1",
        port=1,
        server_name="hospital",
        server_key=Path("unused"),
        identity=Path("unused"),
        batch_max_readings=max_readings,
        batch_max_delay_s=AN_HOUR_S,
        ack_timeout_s=60.0,
        reconnect_min_s=0.1,
        reconnect_max_s=1.0,
    )


def _pending(counter: int) -> Pending:
    reading = Reading(60, 700, 1, datetime(2026, 1, 1, tzinfo=UTC))
    return Pending(IngestItem("pm-0001", counter, reading), counter, 1, 1, 0.0)


async def _forwarding(
    tmp_path: Path, hospital: HospitalEnd, settings: HospitalSettings
) -> tuple[Forwarder, list[list[int]], asyncio.Event, asyncio.Task[None]]:
    durable: list[list[int]] = []
    spool = Spool(tmp_path / "spool.db", tmp_path / "spool.key", max_readings=1000)

    def on_durable(batch: Sequence[Pending]) -> None:
        durable.append([p.item.counter for p in batch])

    async def connector() -> HospitalEnd:
        return hospital

    forwarder = Forwarder(
        settings,
        spool,
        GatewayMetrics(),
        connector=connector,
        on_durable=on_durable,
        on_spool_full=lambda: None,
        on_spool_room=lambda: None,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(forwarder.run(stop))
    return forwarder, durable, stop, task


@pytest.mark.timeout(60)
def test_a_lone_reading_is_sent_without_waiting_out_the_batch_window(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[int], list[list[int]]]:
        hospital = HospitalEnd()
        forwarder, durable, stop, task = await _forwarding(tmp_path, hospital, _settings())
        forwarder.submit(_pending(1))
        batch = await hospital.batches.get()  # an hour's window: only an early close sends
        hospital.ack(batch)
        while not durable:  # the callback has no event of its own
            await asyncio.sleep(0.01)
        stop.set()
        await task
        return [i.counter for i in batch.items], durable

    sent, durable = asyncio.run(scenario())
    assert sent == [1]
    assert durable == [[1]]


@pytest.mark.timeout(60)
def test_readings_arriving_while_a_batch_is_in_flight_form_the_next_batch(
    tmp_path: Path,
) -> None:
    """Group commit: the next batch fills during the hospital's round trip, in order, and
    each reading is acknowledged (made durable) only with its own batch's ACK."""

    async def scenario() -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        hospital = HospitalEnd()
        forwarder, durable, stop, task = await _forwarding(tmp_path, hospital, _settings())
        forwarder.submit(_pending(1))
        first = await hospital.batches.get()
        for c in range(2, 6):  # the first batch is in flight (not yet acknowledged)
            forwarder.submit(_pending(c))
        await asyncio.sleep(0)
        before_ack = [list(b) for b in durable]
        hospital.ack(first)
        second = await hospital.batches.get()
        hospital.ack(second)
        while len(durable) < 2:  # the callback has no event of its own
            await asyncio.sleep(0.01)
        stop.set()
        await task
        sent = [[i.counter for i in b.items] for b in (first, second)]
        return sent, before_ack, durable

    sent, before_ack, durable = asyncio.run(scenario())
    assert sent == [[1], [2, 3, 4, 5]]
    assert before_ack == []
    assert durable == [[1], [2, 3, 4, 5]]


@pytest.mark.timeout(60)
def test_a_batch_still_holds_at_most_batch_max_readings(tmp_path: Path) -> None:
    async def scenario() -> list[list[int]]:
        hospital = HospitalEnd()
        forwarder, _durable, stop, task = await _forwarding(
            tmp_path, hospital, _settings(max_readings=3)
        )
        for c in range(1, 8):  # all waiting before the forwarder's first look
            forwarder.submit(_pending(c))
        sent: list[list[int]] = []
        while sum(len(b) for b in sent) < 7:
            batch = await hospital.batches.get()
            sent.append([i.counter for i in batch.items])
            hospital.ack(batch)
        stop.set()
        await task
        return sent

    assert asyncio.run(scenario()) == [[1, 2, 3], [4, 5, 6], [7]]

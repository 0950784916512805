"""End-to-end acknowledgement on the embedded broker: a device's PUBACK means the gateway
has acknowledged its reading (and the gateway acknowledges only what is durable).

Real broker subprocess, real TLS, real paho clients (the device and the ``gateway``
identity, persistent session, manual acks). The bookkeeping (:class:`GatewayAcks`) is
also tested as pure logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from broker.delivery import (
    MAX_AWAITING_GATEWAY_PER_CONNECTION,
    GatewayAcks,
    TrackedPayload,
)
from pacegate.identity import telemetry_topic
from tests.support import BrokerHandle, connect_as, wait_until
from tests.test_broker_delivery import WAIT, subscriber

# How long an absence (no PUBACK) is watched for. Not a duration the test asserts: a PUBACK
# that came later than this would still be a failure of the property.
QUIET_S = 2.0


@contextlib.contextmanager
def device(broker: BrokerHandle, device_id: str) -> Iterator[mqtt.Client]:
    outcome, dev = connect_as(broker, device_id)
    assert dev is not None, outcome
    try:
        yield dev.client
    finally:
        dev.close()


def _publish(
    client: mqtt.Client, device_id: str, payloads: list[str]
) -> list[mqtt.MQTTMessageInfo]:
    return [client.publish(telemetry_topic(device_id), p, qos=1) for p in payloads]


def _published(infos: list[mqtt.MQTTMessageInfo]) -> int:
    return sum(i.is_published() for i in infos)


# -- the broker, for real -------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_device_is_acknowledged_only_once_the_gateway_acknowledged_its_reading(
    embedded_broker: BrokerHandle,
) -> None:
    broker = embedded_broker
    sent = [f"e2e-{i}" for i in range(5)]
    with device(broker, "pm-0001") as dev:
        with subscriber(broker, ack=False) as sub:
            infos = _publish(dev, "pm-0001", sent)
            assert wait_until(lambda: len(sub.received) == len(sent), WAIT), sub.received
            time.sleep(QUIET_S)
            assert _published(infos) == 0  # the gateway holds them unacknowledged
        with subscriber(broker, ack=True) as sub:  # redelivered, acknowledged this time
            assert wait_until(lambda: _published(infos) == len(sent), WAIT)
            assert sub.payloads() == sent


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_publishes_made_before_any_gateway_connected_reach_it_when_it_subscribes(
    embedded_broker: BrokerHandle,
) -> None:
    """A fresh broker (as after a crash): no gateway session exists yet. The device gets no
    PUBACK; its publishes are parked and handed to the gateway when it subscribes."""
    broker = embedded_broker
    sent = [f"early-{i}" for i in range(10)]
    with device(broker, "pm-0002") as dev:
        infos = _publish(dev, "pm-0002", sent)
        time.sleep(QUIET_S)
        assert _published(infos) == 0
        with subscriber(broker, ack=True) as sub:
            assert wait_until(lambda: _published(infos) == len(sent), WAIT)
            assert sub.payloads() == sent


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_device_that_reconnects_before_the_gateway_acked_resends_and_is_then_acknowledged(
    embedded_broker: BrokerHandle,
) -> None:
    """The first connection's publishes are abandoned unacknowledged; the device's resend
    (DUP, a new connection) is what the gateway's PUBACK acknowledges."""
    broker = embedded_broker
    with subscriber(broker, ack=False) as silent, device(broker, "pm-0003") as dev:
        first = _publish(dev, "pm-0003", ["lost-conn"])
        assert wait_until(lambda: silent.received, WAIT)
        time.sleep(QUIET_S)
        assert _published(first) == 0
    with subscriber(broker, ack=True) as sub, device(broker, "pm-0003") as dev:
        again = _publish(dev, "pm-0003", ["lost-conn"])  # what the device still holds
        assert wait_until(lambda: _published(again) == 1, WAIT)
        assert set(sub.payloads()) == {"lost-conn"}  # the gateway's replay window drops copies


async def _flood(broker: BrokerHandle, device_id: str, n: int) -> tuple[int, bool]:
    """Publish ``n`` QoS 1 messages at once (no in-flight limit); return (PUBACKs, closed)."""
    from device_sim.mqtt import ConnectionLost, MqttConnection, PubAck
    from pacegate.tlsconf import client_context

    pki = broker.pki
    ctx = client_context(pki.ca_cert, pki.device_cert(device_id), pki.device_key(device_id))
    conn = await MqttConnection.open(broker.host, broker.port, ctx, device_id)
    for i in range(n):
        _, data = conn.protocol.publish(telemetry_topic(device_id), f"flood-{i}".encode())
        conn.write(data)
    acked = 0
    try:
        async with asyncio.timeout(WAIT):
            while True:
                acked += sum(isinstance(e, PubAck) for e in await conn.read_events())
    except ConnectionLost:
        return acked, True
    except TimeoutError:
        return acked, False
    finally:
        conn.close(graceful=False)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_connection_over_its_bound_of_unacknowledged_publishes_is_closed_and_logged(
    embedded_broker: BrokerHandle,
) -> None:
    broker = embedded_broker
    n = MAX_AWAITING_GATEWAY_PER_CONNECTION + 20
    with subscriber(broker, ack=False) as sub:
        acked, closed = asyncio.run(_flood(broker, "pm-0001", n))
        assert closed
        assert acked == 0
        broker.wait_for_log("too_many_unacknowledged", WAIT)
        time.sleep(QUIET_S)
        assert 0 < len(sub.received) <= MAX_AWAITING_GATEWAY_PER_CONNECTION  # the rest refused
    # the broker keeps running: an acknowledging gateway, a well-behaved device is PUBACKed
    with subscriber(broker, ack=True), device(broker, "pm-0002") as dev:
        infos = _publish(dev, "pm-0002", ["after-flood"])
        assert wait_until(lambda: _published(infos) == 1, WAIT)


# -- the bookkeeping, as pure logic -----------------------------------------------------------
def _acks(limit: int = 3, per_connection: int = 2) -> GatewayAcks:
    return GatewayAcks(lambda s: s is not None, limit=limit, per_connection=per_connection)


def test_publishes_awaiting_the_gateway_are_bounded_per_connection_and_in_all() -> None:
    acks = _acks()
    assert acks.refusal(0) is None
    assert acks.refusal(2) == ("too_many_unacknowledged", 2)
    for _ in range(3):
        acks.open("t", b"x")
    assert acks.awaiting == 3
    assert acks.refusal(0) == ("broker_busy", 3)


def test_an_acknowledged_or_abandoned_ticket_is_released_once() -> None:
    async def run() -> None:
        acks = _acks()
        a, b = acks.open("t", b"a"), acks.open("t", b"b")
        acks.acknowledge(a.ticket)
        acks.acknowledge(a.ticket)  # a second copy's PUBACK: no double release
        acks.abandon(b.ticket)
        acks.acknowledge(b.ticket)  # the gateway acks a copy of an abandoned one: no-op
        assert acks.awaiting == 0
        assert await a.ticket.wait() is True
        assert await b.ticket.wait() is False

    asyncio.run(run())


def test_parked_publishes_are_handed_over_oldest_first_and_only_if_still_awaited() -> None:
    async def run() -> None:
        acks = _acks(limit=10)
        p1 = acks.open("pacemakers/pm-0001/telemetry", b"1")
        p2 = acks.open("other/topic", b"2")
        p3 = acks.open("pacemakers/pm-0002/telemetry", b"3")
        p4 = acks.open("pacemakers/pm-0003/telemetry", b"4")
        for p in (p1, p2, p3, p4):
            acks.park(p)
        acks.abandon(p3.ticket)  # its device left: it will resend
        out = acks.unpark(lambda topic: topic.startswith("pacemakers/"))
        assert out == [p1, p4]
        assert all(isinstance(p, TrackedPayload) for p in out)
        assert bytes(out[0]) == b"1"
        assert out[0].ticket is p1.ticket
        assert acks.parked == 1  # other/topic still parked

    asyncio.run(run())


def test_copies_whose_device_left_are_dropped_from_an_offline_queue_and_no_other() -> None:
    from broker.amqtt_api import ApplicationMessage
    from broker.delivery import abandoned, compact

    async def run() -> None:
        acks = _acks(limit=10, per_connection=10)
        left, acked, waiting = (acks.open("t", b) for b in (b"left", b"acked", b"waiting"))
        acks.abandon(left.ticket)
        acks.acknowledge(acked.ticket)
        queue: asyncio.Queue[ApplicationMessage] = asyncio.Queue()
        for payload in (left, acked, waiting, b"untracked"):
            queue.put_nowait(ApplicationMessage(None, "t", 1, payload, False))
        assert [abandoned(p) for p in (left, acked, waiting, b"untracked")] == [
            True,
            False,
            False,
            False,
        ]
        assert compact(queue) == 1
        kept = [queue.get_nowait().data for _ in range(queue.qsize())]
        assert kept == [acked, waiting, b"untracked"]  # order kept

    asyncio.run(run())

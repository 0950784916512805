"""Fuzzing the embedded broker over real mutual TLS (issue 9, item 5), bounded in count and
time, with a fixed seed.

Mutations of valid CONNECT, PUBLISH, SUBSCRIBE, PUBACK, PUBREL, PINGREQ and DISCONNECT
packets (bit flips, byte changes, truncations, insertions, forged lengths, splices) are
sent by a device over TLS, a few per connection. Invariant, stated here and checked after
every round: the broker process is up, still relays a device's publish to a
gateway-identity subscriber, has logged no traceback, and its RSS stays under a fixed
ceiling and does not grow from round to round."""

from __future__ import annotations

import random
import time
from pathlib import Path

import psutil
import pytest

from pacegate.identity import telemetry_topic
from tests.support import (
    PINGREQ,
    BrokerHandle,
    RawMqtt,
    connect_as,
    connect_packet,
    embedded_broker,
    mqtt_packet,
    mqtt_string,
    publish_packet,
    subscribe_packet,
    wait_until,
)

# every test here starts or reaches a process or a server
pytestmark = pytest.mark.integration

SEED = 20261202
ROUNDS = 4
MUTATIONS_PER_ROUND = 100  # 400 mutated packets in all
PACKETS_PER_CONNECTION = 2
TIME_BUDGET_S = 150.0  # stop early (and still check the invariant) past this
# The broker starts at ~45 MB; amqtt with a few connections stays far below this.
RSS_CEILING = 300 * 1024 * 1024
# Growth allowed from the first round to the last (allocator noise, caches warming up).
RSS_GROWTH = 25 * 1024 * 1024

TOPIC = telemetry_topic("pm-0001")
SEEDS = (
    publish_packet(TOPIC, b"sealed-reading-bytes", qos=1, packet_id=1),
    publish_packet(TOPIC, b"q0", qos=0),
    subscribe_packet("pacemakers/#"),
    mqtt_packet(0x82, b"\x00\x05" + mqtt_string("a/+/b") + b"\x01" + mqtt_string("#") + b"\x00"),
    mqtt_packet(0xA2, b"\x00\x06" + mqtt_string("pacemakers/#")),
    mqtt_packet(0x40, b"\x00\x01"),  # PUBACK
    mqtt_packet(0x62, b"\x00\x01"),  # PUBREL
    PINGREQ,
    b"\xe0\x00",  # DISCONNECT
)
CONNECT = connect_packet("pm-0001")


def mutate(rng: random.Random, packet: bytes) -> bytes:
    data = bytearray(packet)
    op = rng.randrange(7)
    if op == 0:  # flip a bit
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # replace a byte
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == 2:  # truncate
        del data[rng.randrange(1, len(data) + 1) :]
    elif op == 3:  # insert bytes
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.randbytes(rng.randrange(1, 8))
    elif op == 4:  # forge the remaining length (up to a 5-byte varint)
        data[1:2] = bytes(rng.choice([[0xFF, 0xFF, 0xFF, 0xFF, 0x7F], [0x80], [0xFF, 0x7F], [0]]))
    elif op == 5:  # change the first byte (type and flags)
        data[0] = rng.randrange(256)
    else:  # splice two packets
        other = rng.choice(SEEDS)
        data = data[: rng.randrange(len(data) + 1)] + bytearray(other[rng.randrange(len(other)) :])
    return bytes(data)


def _rss(broker: BrokerHandle) -> int:
    return int(psutil.Process(broker.proc.pid).memory_info().rss)


def _control_publish_reaches_the_gateway(broker: BrokerHandle, marker: bytes) -> None:
    outcome, gw = connect_as(broker, "gateway")
    assert outcome.connected, outcome
    assert gw is not None, outcome
    try:
        assert gw.subscribe("pacemakers/#") == [1]
        outcome, dev = connect_as(broker, "pm-0002")
        assert outcome.connected, outcome
        assert dev is not None, outcome
        try:
            dev.publish(telemetry_topic("pm-0002"), marker)
            assert wait_until(lambda: (telemetry_topic("pm-0002"), marker) in gw.messages)
        finally:
            dev.close()
    finally:
        gw.close()


def _fuzz_connection(broker: BrokerHandle, rng: random.Random, count: int) -> None:
    """One TLS connection: a CONNECT (mutated one time in ten), then ``count`` mutations."""
    first = mutate(rng, CONNECT) if rng.random() < 0.1 else CONNECT
    try:
        with RawMqtt(broker, "pm-0001", timeout=3.0) as conn:
            conn.send(first)
            for _ in range(count):
                conn.send(mutate(rng, rng.choice(SEEDS)))
            conn.send(PINGREQ)
            conn.closed_by_peer(timeout=1.0)  # either closed, or idle: both are fine
    except OSError:
        pass  # the broker closed it mid-way: what it should do with garbage


@pytest.mark.timeout(400)
def test_broker_survives_fuzzed_packets_with_bounded_memory_and_no_traceback(
    pki_dir: Path, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    rss: list[int] = []
    sent = 0
    with embedded_broker(pki_dir, tmp_path / "fuzz") as broker:
        for round_no in range(ROUNDS):
            done = 0
            while done < MUTATIONS_PER_ROUND and time.monotonic() - started < TIME_BUDGET_S:
                n = min(PACKETS_PER_CONNECTION, MUTATIONS_PER_ROUND - done)
                _fuzz_connection(broker, rng, n)
                done += n
            sent += done
            assert broker.proc.poll() is None, f"the broker died in round {round_no}"
            _control_publish_reaches_the_gateway(broker, f"control-{round_no}".encode())
            rss.append(_rss(broker))
            log = broker.log_text()
            assert "Traceback" not in log, log[-4000:]
            assert "Unhandled exception" not in log
            assert "never retrieved" not in log
        print(f"fuzz: {sent} mutations, broker RSS per round (MB): {[r >> 20 for r in rss]}")
        assert sent >= MUTATIONS_PER_ROUND, f"only {sent} mutations within the time budget"
        assert max(rss) < RSS_CEILING, rss
        assert rss[-1] - rss[0] < RSS_GROWTH, f"RSS grew across rounds: {rss}"
        lines = broker.log_text().count("\n")
        # every refused connection is one line, at most: never one per packet received
        assert lines < sent + 50, f"{lines} log lines for {sent} mutated packets"

"""The broker enforces identity without exceptions (issue 9): session takeover, revocation of
every live connection, no retained messages, QoS 2 refused, malformed packets closed with
one security event. Raw MQTT over real mutual TLS (and paho), against both brokers where
the behaviour is MQTT's own; the embedded broker alone where it is pacegate's profile."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import pytest

from broker import packets
from broker.strict import MAX_UNKNOWN_ACKS
from pacegate.identity import telemetry_topic
from pacegate.log import EVENT_BURST, EVENT_WINDOW_S, SUPPRESSED_EVENT
from pacegate.pki import revoke_device
from tests.support import (
    PINGREQ,
    BrokerHandle,
    MqttClient,
    RawMqtt,
    connect_as,
    connect_packet,
    mqtt_packet,
    mqtt_string,
    publish_packet,
    subscribe_packet,
    wait_until,
)

TOPIC = telemetry_topic("pm-0001")


def _security_events(broker: BrokerHandle) -> list[dict[str, object]]:
    out = []
    for line in broker.log_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("logger") == "pacegate.security":
                out.append(rec)
    return out


def _gateway(broker: BrokerHandle) -> MqttClient:
    outcome, gw = connect_as(broker, "gateway")
    assert outcome.connected, outcome
    assert gw is not None, outcome
    assert gw.subscribe("pacemakers/#") == [1]
    return gw


def _session_present(connack: bytes) -> bool:
    assert connack[3] == 0, f"CONNACK refused: {connack!r}"
    return bool(connack[2] & 0x01)


# -- session takeover ------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize(
    ("first_clean", "second_clean"),
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["clean-clean", "clean-persistent", "persistent-clean", "persistent-persistent"],
)
def test_second_connect_with_the_same_client_id_closes_the_first(
    broker: BrokerHandle, first_clean: bool, second_clean: bool
) -> None:
    with RawMqtt(broker, "pm-0001") as first, RawMqtt(broker, "pm-0001") as second:
        first.connect("pm-0001", clean_session=first_clean)
        assert first.alive()
        second.connect("pm-0001", clean_session=second_clean)
        assert first.closed_by_peer(timeout=5.0), "the older connection was left open"
        assert second.alive()


@pytest.mark.integration
def test_takeover_resumes_a_persistent_session_and_a_clean_one_discards_it(
    broker: BrokerHandle,
) -> None:
    """MQTT 3.1.1 §3.1.2.4: a persistent takeover keeps the subscription (session present,
    messages still delivered without a new SUBSCRIBE); a clean one starts afresh."""
    outcome, dev = connect_as(broker, "pm-0001")
    assert outcome.connected
    assert dev is not None
    try:
        with RawMqtt(broker, "gateway") as first:
            _session_present(first.connect("gateway", clean_session=False))
            first.send(subscribe_packet("pacemakers/#"))
            suback = first.recv_packet()
            assert suback is not None
            assert suback[0] == 0x90
            assert suback[-1] == 1
            with RawMqtt(broker, "gateway") as second:
                assert _session_present(second.connect("gateway", clean_session=False))
                assert first.closed_by_peer()
                dev.publish(TOPIC, b"to-the-resumed-session")
                got = second.recv_packet()
                assert got is not None
                assert got[0] >> 4 == 3
                assert got.endswith(b"to-the-resumed-session")
                with RawMqtt(broker, "gateway") as third:
                    assert not _session_present(third.connect("gateway", clean_session=True))
                    assert second.closed_by_peer()
                    dev.publish(TOPIC, b"to-nobody")
                    with pytest.raises(TimeoutError):
                        third.recv_packet(timeout=1.0)  # no subscription survived
                    assert third.alive()
    finally:
        dev.close()


def _refused_at_connect(broker: BrokerHandle, identity: str) -> bool:
    """True if the broker refuses a new connection of ``identity`` (TLS or CONNACK)."""
    try:
        with RawMqtt(broker, identity) as again:
            again.send(connect_packet(identity))
            connack = again.recv_packet()
            return connack is None or connack[3] != 0
    except OSError:
        return True


# -- revocation ------------------------------------------------------------------------
@pytest.mark.integration
def test_revocation_closes_every_live_connection_of_the_revoked_certificate(
    embedded_broker: BrokerHandle,
) -> None:
    """The issue's scenario: pm-0002 opens a persistent connection, then another with the
    same client id (which takes over). Once pm-0002 is revoked, no connection of it is
    left and nothing it sends reaches the gateway; pm-0001 is untouched."""
    broker = embedded_broker
    gw = _gateway(broker)
    bystander = RawMqtt(broker, "pm-0001")
    older = RawMqtt(broker, "pm-0002")
    newer = RawMqtt(broker, "pm-0002")
    try:
        bystander.connect("pm-0001")
        older.connect("pm-0002", clean_session=False)
        newer.connect("pm-0002", clean_session=False)
        assert older.closed_by_peer()
        newer.send(publish_packet(telemetry_topic("pm-0002"), b"before", packet_id=1))
        assert wait_until(lambda: (telemetry_topic("pm-0002"), b"before") in gw.messages)
        revoke_device(broker.pki.root, "pm-0002")
        assert newer.closed_by_peer(timeout=10.0), "the revoked device's connection stayed open"
        assert bystander.alive()
        events = _security_events(broker)
        assert any(
            e["event"] == "session_closed" and e["reason"] == "certificate_revoked" for e in events
        )
        assert _refused_at_connect(broker, "pm-0002")  # and it cannot come back
    finally:
        for c in (bystander, older, newer):
            c.close()
        gw.close()


# -- retained messages -----------------------------------------------------------------
@pytest.mark.integration
def test_device_retained_publish_is_refused_and_reaches_no_later_client(
    broker: BrokerHandle,
) -> None:
    with RawMqtt(broker, "pm-0001") as dev:
        dev.connect("pm-0001")
        dev.send(publish_packet(TOPIC, b"retained-bytes", packet_id=1, flags=0x01))
        # both close it: the embedded broker by its packet rules, mosquitto by
        # retain_available false
        assert dev.closed_by_peer()
    time.sleep(0.5)
    with RawMqtt(broker, "gateway") as later_gw, RawMqtt(broker, "pm-0002") as later_dev:
        later_gw.connect("gateway")
        later_gw.send(subscribe_packet("pacemakers/#"))
        suback = later_gw.recv_packet()
        assert suback is not None
        assert suback[0] == 0x90
        later_dev.connect("pm-0002")
        for client in (later_gw, later_dev):
            with pytest.raises(TimeoutError):  # nothing comes: the retained bytes were refused
                client.recv_packet(timeout=1.5)
    if broker.kind == "embedded":
        refused = [e for e in _security_events(broker) if e.get("reason") == "retain_refused"]
        assert len(refused) == 1
        assert refused[0]["peer"] == "pm-0001"


# -- malformed packets -----------------------------------------------------------------
# Forbidden by MQTT 3.1.1 itself: every broker must close the connection.
MALFORMED = {
    "qos3": publish_packet(TOPIC, b"x", qos=3),
    "wildcard_plus": publish_packet("pacemakers/+/telemetry", b"x"),
    "wildcard_hash": publish_packet("pacemakers/#", b"x"),
    "invalid_utf8": publish_packet(b"pacemakers/\xff\xfe/telemetry", b"x"),
    "null_character": publish_packet(b"pacemakers/pm-0001\x00/telemetry", b"x"),
    "empty_subscribe": mqtt_packet(0x82, b"\x00\x01"),
    "second_connect": connect_packet("pm-0001"),
    "reserved_type": mqtt_packet(0xF0, b""),
    "bad_subscribe_flags": mqtt_packet(0x80, b"\x00\x01" + mqtt_string("a") + b"\x01"),
}
EXPECTED_REASON = {
    "qos3": packets.QOS_INVALID,
    "wildcard_plus": packets.TOPIC_WILDCARD,
    "wildcard_hash": packets.TOPIC_WILDCARD,
    "invalid_utf8": packets.TOPIC_INVALID_UTF8,
    "null_character": packets.TOPIC_NULL,
    "empty_subscribe": packets.SUBSCRIBE_EMPTY,
    "second_connect": packets.SECOND_CONNECT,
    "reserved_type": packets.RESERVED_TYPE,
    "bad_subscribe_flags": packets.BAD_FLAGS,
    "qos2": packets.QOS2_REFUSED,
    "pubrel": packets.QOS2_FLOW_REFUSED,
    "pubrec": packets.QOS2_FLOW_REFUSED,
    "dup_on_qos0": packets.DUP_ON_QOS0,
    "packet_id_zero": packets.PACKET_ID_ZERO,
    "connack_from_client": packets.SERVER_PACKET,
}
# Legal MQTT, outside pacegate's profile (no QoS 2): the embedded broker closes these.
PROFILE = {
    "qos2": publish_packet(TOPIC, b"x", qos=2),
    "pubrel": mqtt_packet(0x62, b"\x00\x07"),
    "pubrec": mqtt_packet(0x50, b"\x00\x07"),
    "dup_on_qos0": publish_packet(TOPIC, b"x", qos=0, flags=0x08),
    "packet_id_zero": publish_packet(TOPIC, b"x", qos=1, packet_id=0),
    "connack_from_client": mqtt_packet(0x20, b"\x00\x00"),
}


def _assert_closed_with_one_event(broker: BrokerHandle, reason: str) -> None:
    def matching() -> list[dict[str, object]]:
        return [e for e in _security_events(broker) if e.get("reason") == reason]

    assert wait_until(lambda: len(matching()) >= 1, timeout=5.0), broker.log_text()
    time.sleep(0.2)
    assert len(matching()) == 1, matching()
    assert "Traceback" not in broker.log_text()


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_packet_closes_the_connection(broker: BrokerHandle, case: str) -> None:
    with RawMqtt(broker, "pm-0001") as dev:
        dev.connect("pm-0001")
        dev.send(MALFORMED[case])
        assert dev.closed_by_peer(), f"{broker.kind} kept the connection open after {case}"
    if broker.kind == "embedded":
        _assert_closed_with_one_event(broker, EXPECTED_REASON[case])
    with RawMqtt(broker, "pm-0002") as other:  # and the broker still serves
        other.connect("pm-0002")
        assert other.alive()


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(PROFILE))
def test_packet_outside_the_profile_closes_the_connection_with_one_event(
    embedded_broker: BrokerHandle, case: str
) -> None:
    broker = embedded_broker
    gw = _gateway(broker)
    try:
        with RawMqtt(broker, "pm-0001") as dev:
            dev.connect("pm-0001")
            dev.send(PROFILE[case])
            assert dev.closed_by_peer()
        _assert_closed_with_one_event(broker, EXPECTED_REASON[case])
        assert not gw.messages, "a refused publish was relayed"
    finally:
        gw.close()


@pytest.mark.integration
def test_publish_before_connect_is_refused_with_one_event(broker: BrokerHandle) -> None:
    with RawMqtt(broker, "pm-0001") as dev:
        dev.send(publish_packet(TOPIC, b"x"))
        assert dev.closed_by_peer()
    if broker.kind == "embedded":
        _assert_closed_with_one_event(broker, packets.FIRST_NOT_CONNECT)


@pytest.mark.integration
def test_unknown_puback_flood_closes_the_connection_and_logs_a_bounded_number_of_lines(
    embedded_broker: BrokerHandle,
) -> None:
    broker = embedded_broker
    flood = 20 * MAX_UNKNOWN_ACKS
    before = len(broker.log_text().splitlines())
    with RawMqtt(broker, "pm-0001") as dev:
        dev.connect("pm-0001")
        puback = b"".join(
            mqtt_packet(0x40, (i % 65535 + 1).to_bytes(2, "big")) for i in range(flood)
        )
        try:
            dev.send(puback)
        except OSError:
            pass  # closed while we were still sending: that is the point
        assert dev.closed_by_peer()
    _assert_closed_with_one_event(broker, "too_many_unknown_acks")
    lines = broker.log_text().splitlines()[before:]
    assert len(lines) <= EVENT_BURST + 10, f"{len(lines)} log lines for {flood} PUBACKs"
    # the ignored ones beyond the burst are counted, and reported in one summary line once
    # the rate-limit window is over
    broker.wait_for_log(SUPPRESSED_EVENT, timeout=EVENT_WINDOW_S + 10)
    summaries = [e for e in _security_events(broker) if e["event"] == SUPPRESSED_EVENT]
    assert len(summaries) == 1, summaries
    assert summaries[0]["suppressed_event"] == "puback_ignored"
    assert summaries[0]["suppressed"] == MAX_UNKNOWN_ACKS - EVENT_BURST


# -- independent clients: Debian's mosquitto_pub / mosquitto_sub ----------------------
def _mosquitto_client(tool: str, broker: BrokerHandle, identity: str, *args: str) -> list[str]:
    from tests.support import identity_files

    assert shutil.which(tool), f"{tool} missing: ./dev setup installs mosquitto-clients"
    cert, key = identity_files(broker.pki, identity)
    return [
        tool,
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "--cafile",
        str(broker.pki.ca_cert),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "-i",
        identity,
        "-V",
        "mqttv311",
        *args,
    ]


@pytest.mark.integration
def test_mosquitto_pub_retained_message_reaches_no_later_mosquitto_sub(
    broker: BrokerHandle,
) -> None:
    pub = _mosquitto_client(
        "mosquitto_pub", broker, "pm-0001", "-t", TOPIC, "-m", "retained-bytes", "-q", "1", "-r"
    )
    subprocess.run(pub, capture_output=True, timeout=30, check=False)
    sub = _mosquitto_client(
        "mosquitto_sub", broker, "gateway", "-t", "pacemakers/#", "-q", "1", "-C", "1", "-W", "3"
    )
    got = subprocess.run(sub, capture_output=True, timeout=30, check=False)
    assert b"retained-bytes" not in got.stdout, "a later subscriber got the retained message"
    if broker.kind == "embedded":
        assert any(e.get("reason") == "retain_refused" for e in _security_events(broker))


@pytest.mark.integration
def test_mosquitto_pub_qos2_is_refused_and_its_qos1_reaches_the_gateway(
    embedded_broker: BrokerHandle,
) -> None:
    broker = embedded_broker
    gw = _gateway(broker)
    try:
        for qos, payload in (("2", "at-qos-2"), ("1", "at-qos-1")):
            cmd = _mosquitto_client(
                "mosquitto_pub", broker, "pm-0001", "-t", TOPIC, "-m", payload, "-q", qos
            )
            subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        assert wait_until(lambda: (TOPIC, b"at-qos-1") in gw.messages)
        assert (TOPIC, b"at-qos-2") not in gw.messages
        assert [
            e["reason"] for e in _security_events(broker) if e["event"] == "packet_refused"
        ] == [packets.QOS2_REFUSED]
    finally:
        gw.close()


@pytest.mark.integration
def test_a_peer_that_never_reads_cannot_queue_work_without_bound(
    embedded_broker: BrokerHandle,
) -> None:
    """PINGREQ and SUBSCRIBE answered into a socket the peer never reads: the broker stops
    reading that peer (TCP back-pressure) instead of queueing a task per packet."""
    import psutil

    broker = embedded_broker
    proc = psutil.Process(broker.proc.pid)
    flood = b"".join([PINGREQ, subscribe_packet("pacemakers/#", packet_id=7)] * 20_000)
    with RawMqtt(broker, "pm-0001") as dev:
        dev.connect("pm-0001")
        before = proc.memory_info().rss
        dev.sock.settimeout(10.0)
        try:
            dev.sock.sendall(flood)  # blocks once the broker stops reading: that is the point
        except TimeoutError:
            pass
        time.sleep(2.0)
        grown = proc.memory_info().rss - before
        assert grown < 30 * 1024 * 1024, f"broker RSS grew by {grown >> 20} MB"
    with RawMqtt(broker, "pm-0002") as other:  # still serving
        other.connect("pm-0002")
        assert other.alive()


class _MemoryWriter:
    """What a StrictHandler writes, kept in memory (the unit tests below have no socket)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def get_peer_info(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def get_ssl_info(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


class _HeldReader:
    """Gives ``data``, then waits as an idle peer would (no end of stream)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, n: int = -1) -> bytes:
        if not self._data:
            await asyncio.Event().wait()
        chunk, self._data = self._data[:n], self._data[n:]
        return chunk

    def feed_eof(self) -> None:
        return None


@pytest.mark.parametrize("revoked", [False, True], ids=["valid", "revoked"])
async def test_publish_of_a_certificate_revoked_after_connect_is_never_relayed(
    revoked: bool,
) -> None:
    """The relay-time check: whatever the CRL watcher's timing, once the broker's revoked
    set holds the connection's serial, its PUBLISH is neither relayed nor acknowledged."""
    from broker.amqtt_api import Session
    from broker.delivery import GatewayAcks
    from broker.strict import StrictHandler

    relayed: list[bytes] = []

    async def deliver(_handler: object, message: object) -> bool:
        relayed.append(bytes(message.data))  # type: ignore[attr-defined]
        return True

    session = Session()
    session.client_id = "pm-0001"
    writer = _MemoryWriter()
    handler = StrictHandler(
        None,  # type: ignore[arg-type]
        deliver=deliver,
        acks=GatewayAcks(lambda _session: False),
        limit=4096,
        source="127.0.0.1",
        is_revoked=lambda: revoked,
    )
    handler.attach(session, _HeldReader(publish_packet(TOPIC, b"reading", packet_id=9)), writer)  # type: ignore[arg-type]
    await handler.start()
    for _ in range(500):  # until the PUBLISH has been judged (or 5 s)
        if relayed or handler.refused or b"\x40\x02" in writer.data:
            break
        await asyncio.sleep(0.01)
    await handler.stop()
    if revoked:
        assert relayed == []
        assert handler.refused == "certificate_revoked"
        assert b"\x40\x02\x00\x09" not in writer.data  # no PUBACK
    else:
        # relayed; its PUBACK waits for the gateway's (end-to-end acknowledgement)
        assert relayed == [b"reading"]
        assert handler.refused is None

"""The devices' MQTT 3.1.1 client core (sans-IO): what it sends, what a broker may answer."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_sim.device import Backoff
from device_sim.mqtt import (
    ConnAck,
    ConnectionState,
    MqttClientProtocol,
    MqttProtocolError,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    encode_remaining_length,
)
from pacegate.errors import LocalProtocolError, RemoteProtocolError

CONNACK_OK = b"\x20\x02\x00\x00"


def _connected() -> MqttClientProtocol:
    proto = MqttClientProtocol()
    proto.connect("pm-0001")
    assert proto.receive_data(CONNACK_OK) == [ConnAck(session_present=False, return_code=0)]
    return proto


def test_connect_packet_is_mqtt_311_with_clean_session_and_client_id() -> None:
    data = MqttClientProtocol().connect("pm-0001", keepalive=60)
    assert data == (
        b"\x10\x13"  # CONNECT, remaining length 19
        b"\x00\x04MQTT\x04\x02\x00\x3c"  # protocol, level 4, clean session, keepalive 60
        b"\x00\x07pm-0001"
    )


def test_publish_qos1_carries_a_packet_id_and_is_acknowledged_once() -> None:
    proto = _connected()
    pid, data = proto.publish("pacemakers/pm-0001/telemetry", b"\x01" * 40)
    assert pid == 1
    assert data[0] == 0x32  # PUBLISH, QoS 1
    assert data.endswith(b"\x00\x01" + b"\x01" * 40)
    assert proto.in_flight == 1
    assert proto.receive_data(b"\x40\x02\x00\x01") == [PubAck(1)]
    assert proto.in_flight == 0
    with pytest.raises(MqttProtocolError, match="not in flight"):
        proto.receive_data(b"\x40\x02\x00\x01")


def test_retransmission_sets_the_dup_flag() -> None:
    proto = _connected()
    _, data = proto.publish("pacemakers/pm-0001/telemetry", b"x", dup=True)
    assert data[0] == 0x3A


def test_packet_ids_skip_those_still_in_flight() -> None:
    proto = _connected()
    ids = [proto.publish("t/a", b"x")[0] for _ in range(3)]
    assert ids == [1, 2, 3]
    proto.receive_data(b"\x40\x02\x00\x02")
    proto._next_id = 1  # wrap around onto ids 1 and 3, still in flight
    assert proto.publish("t/a", b"x")[0] == 2


def test_events_split_across_reads_and_packed_in_one_read() -> None:
    proto = _connected()
    proto.publish("t/a", b"x")
    proto.publish("t/a", b"y")
    stream = b"\x40\x02\x00\x01\x40\x02\x00\x02\xd0\x00"
    events = []
    for i in range(len(stream)):
        events += proto.receive_data(stream[i : i + 1])
    assert events == [PubAck(1), PubAck(2), PingResp()]


def test_refused_connack_closes_the_protocol() -> None:
    proto = MqttClientProtocol()
    proto.connect("pm-0001")
    assert proto.receive_data(b"\x20\x02\x00\x05") == [ConnAck(False, 5)]
    assert proto.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError):
        proto.publish("t/a", b"x")


def test_anything_but_connack_before_connack_is_a_protocol_error() -> None:
    proto = MqttClientProtocol()
    proto.connect("pm-0001")
    with pytest.raises(MqttProtocolError, match="expected CONNACK"):
        proto.receive_data(b"\xd0\x00")


def test_oversized_packet_is_refused_before_it_is_buffered() -> None:
    proto = _connected()
    with pytest.raises(MqttProtocolError) as err:
        proto.receive_data(b"\x30" + encode_remaining_length(10_000_000))
    assert err.value.reason == "oversized"


def test_qos2_and_server_only_packets_are_refused() -> None:
    for packet in (b"\x34\x05\x00\x01t\x00\x01", b"\x10\x00", b"\x62\x02\x00\x01", b"\xf0\x00"):
        with pytest.raises(MqttProtocolError):
            _connected().receive_data(packet)


def test_subscribe_and_incoming_publish_for_a_subscriber() -> None:
    proto = _connected()
    pid, data = proto.subscribe([("pacemakers/#", 1)])
    assert data[0] == 0x82
    assert proto.receive_data(b"\x90\x03" + struct.pack(">H", pid) + b"\x01") == [SubAck(pid, (1,))]
    topic = b"pacemakers/pm-0001/telemetry"
    body = struct.pack(">H", len(topic)) + topic + b"\x00\x07" + b"sealed"
    (event,) = proto.receive_data(b"\x32" + encode_remaining_length(len(body)) + body)
    assert event == Publish(topic.decode(), b"sealed", 1, 7, False, False)
    assert proto.puback(7) == b"\x40\x02\x00\x07"


def test_remaining_length_encoding_matches_the_specification() -> None:
    assert encode_remaining_length(0) == b"\x00"
    assert encode_remaining_length(127) == b"\x7f"
    assert encode_remaining_length(128) == b"\x80\x01"
    assert encode_remaining_length(16_383) == b"\xff\x7f"
    assert encode_remaining_length(268_435_455) == b"\xff\xff\xff\x7f"


@given(st.binary(max_size=300))
def test_arbitrary_broker_bytes_parse_or_raise_the_remote_error(data: bytes) -> None:
    # the h11 fuzz invariant: whole, then byte by byte
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        proto = MqttClientProtocol()
        proto.connect("pm-0001")
        try:
            for chunk in chunks:
                proto.receive_data(chunk)
        except RemoteProtocolError:
            pass


@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_connack_parse_or_raise_the_remote_error(data: bytes) -> None:
    proto = _connected()
    proto.publish("t/a", b"x")
    try:
        proto.receive_data(data)
    except RemoteProtocolError:
        pass


def test_backoff_grows_exponentially_to_its_cap_with_full_jitter() -> None:
    backoff = Backoff(random.Random(1), base=0.5, cap=8.0)
    ceilings = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        assert 0.0 <= backoff.next_delay() <= ceilings[-1]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.ceiling() == 0.5


def test_backoff_jitter_spreads_a_fleet() -> None:
    delays = [Backoff(random.Random(i), base=1.0).next_delay() for i in range(200)]
    assert min(delays) < 0.1
    assert max(delays) > 0.9

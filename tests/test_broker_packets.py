"""The broker's packet rules (broker.packets) as pure functions: each refusal has
its stable reason, and every packet pacegate's own clients send passes."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from broker import packets
from broker.packets import Frame, PacketRefused, check_client_packet, check_connect
from tests.support import connect_packet, mqtt_packet, mqtt_string, publish_packet, subscribe_packet


def _frame(raw: bytes) -> Frame:
    length_bytes = b""
    pos = 1
    while (n := packets.parse_remaining_length(length_bytes)) is None:
        length_bytes += raw[pos : pos + 1]
        pos += 1
    assert len(raw) == pos + n
    return Frame(raw[0] >> 4, raw[0] & 0x0F, raw[pos:])


def _reason(raw: bytes, *, first: bool = False) -> str | None:
    try:
        (check_connect if first else check_client_packet)(_frame(raw))
    except PacketRefused as exc:
        return exc.reason
    return None


TOPIC = "pacemakers/pm-0001/telemetry"


def test_packets_pacegate_clients_send_pass_the_rules() -> None:
    assert _reason(connect_packet("pm-0001"), first=True) is None
    assert _reason(connect_packet("gateway", clean_session=False), first=True) is None
    assert _reason(publish_packet(TOPIC, b"sealed", qos=1, packet_id=7)) is None
    assert _reason(publish_packet(TOPIC, b"sealed", qos=1, packet_id=7, flags=0x08)) is None
    assert _reason(publish_packet(TOPIC, b"sealed", qos=0)) is None
    assert _reason(subscribe_packet("pacemakers/#")) is None
    assert _reason(mqtt_packet(0x40, b"\x00\x07")) is None  # PUBACK
    assert _reason(mqtt_packet(0xA2, b"\x00\x02" + mqtt_string("pacemakers/#"))) is None
    assert _reason(b"\xc0\x00") is None
    assert _reason(b"\xe0\x00") is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (publish_packet(TOPIC, b"x", qos=3), packets.QOS_INVALID),
        (publish_packet(TOPIC, b"x", qos=2), packets.QOS2_REFUSED),
        (publish_packet(TOPIC, b"x", flags=0x01), packets.RETAIN_REFUSED),
        (publish_packet(TOPIC, b"x", qos=0, flags=0x08), packets.DUP_ON_QOS0),
        (publish_packet(TOPIC, b"x", packet_id=0), packets.PACKET_ID_ZERO),
        (publish_packet("", b"x"), packets.TOPIC_EMPTY),
        (publish_packet("a/+/b", b"x"), packets.TOPIC_WILDCARD),
        (publish_packet("a/#", b"x"), packets.TOPIC_WILDCARD),
        (publish_packet(b"a/\xc3\x28", b"x"), packets.TOPIC_INVALID_UTF8),
        (publish_packet(b"a/\xed\xa0\x80", b"x"), packets.TOPIC_INVALID_UTF8),  # surrogate
        (publish_packet(b"a/\x00b", b"x"), packets.TOPIC_NULL),
        (mqtt_packet(0x30, b"\x00\x09ab"), packets.BAD_LENGTH),  # topic runs past the end
        (mqtt_packet(0x82, b"\x00\x01"), packets.SUBSCRIBE_EMPTY),
        (mqtt_packet(0x82, b"\x00\x01" + mqtt_string("a") + b"\x03"), packets.SUBSCRIBE_BAD_QOS),
        (mqtt_packet(0x82, b"\x00\x01" + mqtt_string("a")), packets.BAD_LENGTH),
        (mqtt_packet(0x82, b"\x00\x01" + mqtt_string("") + b"\x01"), packets.TOPIC_EMPTY),
        (mqtt_packet(0x80, b"\x00\x01" + mqtt_string("a") + b"\x01"), packets.BAD_FLAGS),
        (mqtt_packet(0xA2, b"\x00\x01"), packets.UNSUBSCRIBE_EMPTY),
        (mqtt_packet(0x62, b"\x00\x01"), packets.QOS2_FLOW_REFUSED),
        (mqtt_packet(0x50, b"\x00\x01"), packets.QOS2_FLOW_REFUSED),
        (mqtt_packet(0x70, b"\x00\x01"), packets.QOS2_FLOW_REFUSED),
        (mqtt_packet(0x60, b"\x00\x01"), packets.BAD_FLAGS),  # PUBREL without its 0b0010
        (mqtt_packet(0x40, b"\x00"), packets.BAD_LENGTH),
        (mqtt_packet(0x40, b"\x00\x00"), packets.PACKET_ID_ZERO),
        (mqtt_packet(0xC0, b"\x00"), packets.BAD_LENGTH),
        (mqtt_packet(0x00, b""), packets.RESERVED_TYPE),
        (mqtt_packet(0xF0, b""), packets.RESERVED_TYPE),
        (mqtt_packet(0x20, b"\x00\x00"), packets.SERVER_PACKET),
        (mqtt_packet(0x90, b"\x00\x01\x00"), packets.SERVER_PACKET),
        (connect_packet("pm-0001"), packets.SECOND_CONNECT),
    ],
)
def test_malformed_or_forbidden_packet_is_refused_with_its_reason(raw: bytes, reason: str) -> None:
    assert _reason(raw) == reason


def test_first_packet_must_be_a_connect_with_a_valid_client_id() -> None:
    assert _reason(publish_packet(TOPIC, b"x"), first=True) == packets.FIRST_NOT_CONNECT
    assert _reason(b"\xc0\x00", first=True) == packets.FIRST_NOT_CONNECT
    bad_id = mqtt_packet(0x10, mqtt_string("MQTT") + b"\x04\x02\x00\x1e" + mqtt_string(b"\xff"))
    assert _reason(bad_id, first=True) == packets.CLIENT_ID_INVALID
    nul_id = mqtt_packet(0x10, mqtt_string("MQTT") + b"\x04\x02\x00\x1e" + mqtt_string(b"a\x00"))
    assert _reason(nul_id, first=True) == packets.CLIENT_ID_INVALID
    assert _reason(mqtt_packet(0x10, b"\x00\x04MQ"), first=True) == packets.BAD_LENGTH
    assert _reason(mqtt_packet(0x11, b""), first=True) == packets.BAD_FLAGS


def test_remaining_length_of_more_than_four_bytes_is_malformed() -> None:
    assert packets.parse_remaining_length(b"\x7f") == 127
    assert packets.parse_remaining_length(b"\xff\xff\xff\x7f") == 268_435_455
    assert packets.parse_remaining_length(b"\xff\xff\xff") is None
    with pytest.raises(PacketRefused) as err:
        packets.parse_remaining_length(b"\xff\xff\xff\xff")
    assert err.value.reason == packets.MALFORMED_LENGTH


def test_random_bytes_are_judged_or_refused_never_crash() -> None:
    """The rules' own fuzz invariant: any body either passes or raises PacketRefused."""
    rng = random.Random(9)
    for _ in range(5000):
        body = rng.randbytes(rng.randrange(0, 40))
        frame = Frame(rng.randrange(16), rng.randrange(16), body)
        for check in (check_client_packet, check_connect):
            reason = _refusal_reason(check, frame)
            assert reason is None or reason in packets.REASONS


def _refusal_reason(check: Callable[[Frame], object], frame: Frame) -> str | None:
    """The reason ``check`` refuses ``frame`` for, or None if it accepts it (any other
    exception propagates and fails the test)."""
    try:
        check(frame)
    except PacketRefused as exc:
        return exc.reason
    return None


def test_every_packet_refusal_reason_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "pki-and-broker.md").read_text()
    assert [r for r in packets.REASONS if f"`{r}`" not in doc] == []

"""The MQTT 3.1.1 packet rules the embedded broker enforces before amqtt decodes a packet.

Sans-IO: :func:`parse_remaining_length` decodes a fixed header's length, and
:func:`check_connect` / :func:`check_client_packet` judge one frame from a client. Both raise
:class:`PacketRefused` with a stable reason (docs/security-events.md); the broker's reader
then closes the connection with one security event. amqtt 0.12.1 itself discards a
malformed packet and reads on (``except MQTTError: "Message discarded"``), decodes an
invalid UTF-8 topic as the text ``"b'...'"``, accepts QoS 3 into an unhandled-task
traceback, an empty SUBSCRIBE, and a topic with U+0000: none of that reaches it now.

What a pacegate peer may send is narrower than MQTT: no client publishes with RETAIN
(retained messages would reach later subscribers outside their subscription), no client
publishes at QoS 2 and the broker never sends QoS 2 (grants at most QoS 1), so PUBREC,
PUBREL and PUBCOMP from a client are protocol errors too: no per-connection QoS 2 state
can grow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Packet types (MQTT 3.1.1 §2.2.1)
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    8,
    9,
    10,
    11,
    12,
    13,
    14,
)
_SERVER_TO_CLIENT = frozenset({CONNACK, SUBACK, UNSUBACK, PINGRESP})
_QOS2_FLOW = frozenset({PUBREC, PUBREL, PUBCOMP})
# §2.2.2: PUBREL, SUBSCRIBE and UNSUBSCRIBE carry flags 0b0010, every other type but
# PUBLISH carries 0 (MQTT-2.2.2-2: anything else closes the connection).
_FIXED_FLAGS = {PUBREL: 0x2, SUBSCRIBE: 0x2, UNSUBSCRIBE: 0x2}

# The remaining length takes at most 4 bytes (§2.2.3).
MAX_REMAINING_LENGTH_BYTES = 4

# Stable reasons (security event ``reason`` values)
MALFORMED_LENGTH = "malformed_remaining_length"
PACKET_TOO_LARGE = "packet_too_large"
RESERVED_TYPE = "reserved_packet_type"
SERVER_PACKET = "server_packet_from_client"
FIRST_NOT_CONNECT = "first_packet_not_connect"
SECOND_CONNECT = "second_connect"
BAD_FLAGS = "bad_header_flags"
BAD_LENGTH = "bad_packet_length"
QOS_INVALID = "qos_invalid"
QOS2_REFUSED = "qos2_refused"
QOS2_FLOW_REFUSED = "qos2_flow_refused"
RETAIN_REFUSED = "retain_refused"
DUP_ON_QOS0 = "dup_on_qos0"
PACKET_ID_ZERO = "packet_id_zero"
TOPIC_EMPTY = "topic_empty"
TOPIC_INVALID_UTF8 = "topic_invalid_utf8"
TOPIC_NULL = "topic_null_character"
TOPIC_WILDCARD = "topic_wildcard"
SUBSCRIBE_EMPTY = "subscribe_empty"
SUBSCRIBE_BAD_QOS = "subscribe_bad_qos"
UNSUBSCRIBE_EMPTY = "unsubscribe_empty"
CLIENT_ID_INVALID = "client_id_invalid"
UNDECODABLE = "undecodable"

# Every reason above (the docs test checks each is documented).
REASONS = (
    MALFORMED_LENGTH,
    PACKET_TOO_LARGE,
    RESERVED_TYPE,
    SERVER_PACKET,
    FIRST_NOT_CONNECT,
    SECOND_CONNECT,
    BAD_FLAGS,
    BAD_LENGTH,
    QOS_INVALID,
    QOS2_REFUSED,
    QOS2_FLOW_REFUSED,
    RETAIN_REFUSED,
    DUP_ON_QOS0,
    PACKET_ID_ZERO,
    TOPIC_EMPTY,
    TOPIC_INVALID_UTF8,
    TOPIC_NULL,
    TOPIC_WILDCARD,
    SUBSCRIBE_EMPTY,
    SUBSCRIBE_BAD_QOS,
    UNSUBSCRIBE_EMPTY,
    CLIENT_ID_INVALID,
    UNDECODABLE,
)


class PacketRefused(Exception):
    """A client sent something MQTT 3.1.1 (or pacegate's narrower profile) forbids."""

    def __init__(self, reason: str, packet_type: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.packet_type = packet_type


@dataclass(frozen=True)
class Frame:
    packet_type: int
    flags: int
    body: bytes

    @property
    def first_byte(self) -> int:
        return (self.packet_type << 4) | self.flags

    def to_bytes(self) -> bytes:
        return bytes([self.first_byte]) + encode_remaining_length(len(self.body)) + self.body


def encode_remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def parse_remaining_length(encoded: bytes) -> int | None:
    """The remaining length (§2.2.3) from its bytes read so far; None while a continuation
    bit asks for one more byte. More than 4 bytes is malformed."""
    length, multiplier = 0, 1
    for i, byte in enumerate(encoded):
        if i >= MAX_REMAINING_LENGTH_BYTES:
            raise PacketRefused(MALFORMED_LENGTH)
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            if i + 1 != len(encoded):
                raise PacketRefused(MALFORMED_LENGTH)
            return length
        multiplier *= 128
    if len(encoded) >= MAX_REMAINING_LENGTH_BYTES:
        raise PacketRefused(MALFORMED_LENGTH)
    return None


def _string(body: bytes, pos: int, reason: str, packet_type: int) -> tuple[str, int]:
    """An MQTT UTF-8 string at ``pos`` (§1.5.3): strict UTF-8, no U+0000."""
    if pos + 2 > len(body):
        raise PacketRefused(BAD_LENGTH, packet_type)
    (n,) = struct.unpack_from("!H", body, pos)
    raw = body[pos + 2 : pos + 2 + n]
    if len(raw) != n:
        raise PacketRefused(BAD_LENGTH, packet_type)
    try:
        text = raw.decode("utf-8", errors="strict")  # refuses surrogates too (MQTT-1.5.3-1)
    except UnicodeDecodeError:
        raise PacketRefused(reason, packet_type) from None
    if "\x00" in text:  # MQTT-1.5.3-2
        raise PacketRefused(TOPIC_NULL if reason == TOPIC_INVALID_UTF8 else reason, packet_type)
    return text, pos + 2 + n


def _packet_id(body: bytes, pos: int, packet_type: int) -> int:
    if pos + 2 > len(body):
        raise PacketRefused(BAD_LENGTH, packet_type)
    (pid,) = struct.unpack_from("!H", body, pos)
    if pid == 0:  # MQTT-2.3.1-1
        raise PacketRefused(PACKET_ID_ZERO, packet_type)
    return int(pid)


def check_connect(frame: Frame) -> None:
    """The first packet of a connection: a CONNECT whose client id is a valid string.
    (amqtt checks the protocol name, level and flags and answers with a CONNACK code.)"""
    if frame.packet_type != CONNECT:
        raise PacketRefused(FIRST_NOT_CONNECT, frame.packet_type)
    if frame.flags:
        raise PacketRefused(BAD_FLAGS, CONNECT)
    body = frame.body
    # protocol name (string), level (1), flags (1), keep alive (2), then the client id
    if len(body) < 2:
        raise PacketRefused(BAD_LENGTH, CONNECT)
    (name_len,) = struct.unpack_from("!H", body, 0)
    pos = 2 + name_len + 4
    if pos > len(body):
        raise PacketRefused(BAD_LENGTH, CONNECT)
    _string(body, pos, CLIENT_ID_INVALID, CONNECT)


def check_client_packet(frame: Frame) -> None:
    """A packet from a connected client (after its CONNECT)."""
    t, flags, body = frame.packet_type, frame.flags, frame.body
    if t in (0, 15):
        raise PacketRefused(RESERVED_TYPE, t)
    if t == CONNECT:
        raise PacketRefused(SECOND_CONNECT, t)  # MQTT-3.1.0-2
    if t in _SERVER_TO_CLIENT:
        raise PacketRefused(SERVER_PACKET, t)
    if t == PUBLISH:
        _check_publish(flags, body)
        return
    if flags != _FIXED_FLAGS.get(t, 0):
        raise PacketRefused(BAD_FLAGS, t)
    if t in _QOS2_FLOW:
        raise PacketRefused(QOS2_FLOW_REFUSED, t)
    if t == PUBACK:
        if len(body) != 2:
            raise PacketRefused(BAD_LENGTH, t)
        _packet_id(body, 0, t)
    elif t in (PINGREQ, DISCONNECT):
        if body:
            raise PacketRefused(BAD_LENGTH, t)
    elif t == SUBSCRIBE:
        pos = 2
        _packet_id(body, 0, t)
        if pos >= len(body):
            raise PacketRefused(SUBSCRIBE_EMPTY, t)  # MQTT-3.8.3-3
        while pos < len(body):
            topic, pos = _string(body, pos, TOPIC_INVALID_UTF8, t)
            if not topic:
                raise PacketRefused(TOPIC_EMPTY, t)  # MQTT-4.7.3-1
            if pos >= len(body):
                raise PacketRefused(BAD_LENGTH, t)
            if body[pos] > 2:  # MQTT-3.8.3-4: reserved bits 0, QoS 0..2
                raise PacketRefused(SUBSCRIBE_BAD_QOS, t)
            pos += 1
    elif t == UNSUBSCRIBE:
        pos = 2
        _packet_id(body, 0, t)
        if pos >= len(body):
            raise PacketRefused(UNSUBSCRIBE_EMPTY, t)  # MQTT-3.10.3-2
        while pos < len(body):
            topic, pos = _string(body, pos, TOPIC_INVALID_UTF8, t)
            if not topic:
                raise PacketRefused(TOPIC_EMPTY, t)


def _check_publish(flags: int, body: bytes) -> None:
    qos = (flags >> 1) & 0x03
    if qos == 3:  # MQTT-3.3.1-4
        raise PacketRefused(QOS_INVALID, PUBLISH)
    if qos == 2:
        raise PacketRefused(QOS2_REFUSED, PUBLISH)
    if flags & 0x08 and qos == 0:  # MQTT-3.3.1-2
        raise PacketRefused(DUP_ON_QOS0, PUBLISH)
    if flags & 0x01:
        raise PacketRefused(RETAIN_REFUSED, PUBLISH)
    topic, pos = _string(body, 0, TOPIC_INVALID_UTF8, PUBLISH)
    if not topic:
        raise PacketRefused(TOPIC_EMPTY, PUBLISH)  # MQTT-4.7.3-1
    if "+" in topic or "#" in topic:  # MQTT-3.3.2-2
        raise PacketRefused(TOPIC_WILDCARD, PUBLISH)
    if qos:
        _packet_id(body, pos, PUBLISH)

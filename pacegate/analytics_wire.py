"""The analytics wire format: what the hospital and the cloud worker say to each other
inside the post-quantum channel. This module owns it; both sides import it.

One session is one channel connection, strictly request/reply (the hospital may keep a
window of requests in flight; replies come back in order)::

    hospital -> cloud                               cloud -> hospital
    OPEN   type=1 | version u8 | bands u8 |         READY  type=2 | slots u32 | max_batches u32
           context_len u32 | public context
    CT     type=3 | batch u32 | lane u8 |           ACK    type=4 | batch u32 | lane u8
           sha256 (32) | ct_len u32 | ciphertext
    FETCH  type=5 | batches u32 | name_len u8 |     RESULT type=6 | batches u32 | compute_s f64 |
           name                                            name_len u8 | name | sha256 (32) |
                                                           ct_len u32 | ciphertext
                                                    ERROR  type=7 | code_len u8 | code |
                                                           msg_len u16 | message (UTF-8)

A batch is ``lanes(bands)`` ciphertexts of :data:`pacegate.ckks.SLOTS` slots, one message
each (a few hundred KB: well under the channel's per-message limit, ``max_message_size``,
16 MiB by default; the channel itself cuts a message into 64 KiB records), sent lane by
lane, batch after batch, from 0. The worker answers FETCH only when every batch it received is
complete and the count matches the hospital's, then returns the named accumulator.

The SHA-256 beside each ciphertext catches corruption that SEAL's structural checks would
let through (a flipped bit in a coefficient still below the modulus). It is not
authentication: the channel (ML-KEM + X25519, AES-256-GCM, ML-DSA identities) is.

Which accumulators exist, and from which lanes, is :func:`accumulator_plan`: the worker
executes it and the hospital interprets its results, so both read the same table.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from pacegate.errors import RemoteProtocolError

PROTOCOL_VERSION = 1

MSG_OPEN = 1
MSG_READY = 2
MSG_CT = 3
MSG_ACK = 4
MSG_FETCH = 5
MSG_RESULT = 6
MSG_ERROR = 7

# Input lanes of one batch. Bands follow: lane LANE_FIRST_BAND + k is band k's indicator.
LANE_HEART_RATE = 0  # heart rate, bpm
LANE_AGE = 1  # age, years
LANE_OUT_OF_RANGE = 2  # 1.0 when the heart rate is outside the normal range
LANE_FIRST_BAND = 3
MAX_BANDS = 16  # a band is a ciphertext per batch: more would multiply the cost
MAX_NAME = 64
MAX_MESSAGE_TEXT = 2000

_OPEN = struct.Struct(">BBBI")
_READY = struct.Struct(">BII")
_CT = struct.Struct(">BIB32sI")
_ACK = struct.Struct(">BIB")
_FETCH = struct.Struct(">BIB")
_RESULT_HEAD = struct.Struct(">BIdB")
_RESULT_TAIL = struct.Struct(">32sI")


class AnalyticsProtocolError(RemoteProtocolError):
    """The one error a malformed or refused analytics message raises."""


@dataclass(frozen=True, slots=True)
class Accumulator:
    """``name`` is the slot-wise sum over batches of ``lane`` (times ``other`` when set)."""

    name: str
    lane: int
    other: int | None = None

    @property
    def degree(self) -> int:
        return 1 if self.other is None else 2


def lanes(bands: int) -> int:
    """Number of ciphertexts per batch for ``bands`` age bands."""
    return LANE_FIRST_BAND + bands


def accumulator_plan(bands: int) -> tuple[Accumulator, ...]:
    """What the worker computes blind, per session (sums over every batch, slot-wise)."""
    if not 1 <= bands <= MAX_BANDS:
        raise ValueError(f"bands must be in [1, {MAX_BANDS}], got {bands}")
    hr, age = LANE_HEART_RATE, LANE_AGE
    plan = [
        Accumulator("hr", hr),
        Accumulator("hr2", hr, hr),
        Accumulator("age", age),
        Accumulator("age2", age, age),
        Accumulator("age_hr", age, hr),
        Accumulator("out_of_range", LANE_OUT_OF_RANGE),
    ]
    for k in range(bands):
        plan.append(Accumulator(f"band{k}_n", LANE_FIRST_BAND + k))
        plan.append(Accumulator(f"band{k}_hr", LANE_FIRST_BAND + k, hr))
    return tuple(plan)


@dataclass(frozen=True, slots=True)
class Open:
    bands: int
    context: bytes
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Ready:
    slots: int
    max_batches: int


@dataclass(frozen=True, slots=True)
class Ciphertext:
    batch: int
    lane: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    batch: int
    lane: int


@dataclass(frozen=True, slots=True)
class Fetch:
    batches: int
    name: str


@dataclass(frozen=True, slots=True)
class Result:
    batches: int
    name: str
    data: bytes
    compute_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str


Message = Open | Ready | Ciphertext | Ack | Fetch | Result | Error


def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) > MAX_NAME:
        raise ValueError(f"name must be 1..{MAX_NAME} bytes, got {name!r}")
    return raw


def encode(msg: Message) -> bytes:
    """Serialize one message (a local misuse raises ValueError)."""
    if isinstance(msg, Open):
        if not 1 <= msg.bands <= MAX_BANDS:
            raise ValueError(f"bands must be in [1, {MAX_BANDS}]")
        return _OPEN.pack(MSG_OPEN, msg.version, msg.bands, len(msg.context)) + msg.context
    if isinstance(msg, Ready):
        return _READY.pack(MSG_READY, msg.slots, msg.max_batches)
    if isinstance(msg, Ciphertext):
        digest = hashlib.sha256(msg.data).digest()
        return _CT.pack(MSG_CT, msg.batch, msg.lane, digest, len(msg.data)) + msg.data
    if isinstance(msg, Ack):
        return _ACK.pack(MSG_ACK, msg.batch, msg.lane)
    if isinstance(msg, Fetch):
        name = _name_bytes(msg.name)
        return _FETCH.pack(MSG_FETCH, msg.batches, len(name)) + name
    if isinstance(msg, Result):
        name = _name_bytes(msg.name)
        digest = hashlib.sha256(msg.data).digest()
        return (
            _RESULT_HEAD.pack(MSG_RESULT, msg.batches, msg.compute_seconds, len(name))
            + name
            + _RESULT_TAIL.pack(digest, len(msg.data))
            + msg.data
        )
    if isinstance(msg, Error):
        code = _name_bytes(msg.code)
        text = msg.message.encode()[:MAX_MESSAGE_TEXT]
        return bytes([MSG_ERROR, len(code)]) + code + struct.pack(">H", len(text)) + text
    raise TypeError(f"not an analytics message: {type(msg).__name__}")


def _check_digest(digest: bytes, data: bytes, what: str) -> None:
    if hashlib.sha256(data).digest() != digest:
        raise AnalyticsProtocolError(
            f"{what}: SHA-256 does not match the ciphertext (corrupted or tampered)",
            reason="digest_mismatch",
        )


def _name(raw: bytes) -> str:
    name = raw.decode("utf-8")
    if not name or not name.isprintable():
        raise AnalyticsProtocolError("empty or unprintable name", reason="malformed")
    return name


def decode(message: bytes) -> Message:
    """Parse one message, or raise :class:`AnalyticsProtocolError` (never anything else)."""
    if not message:
        raise AnalyticsProtocolError("empty analytics message")
    kind = message[0]
    try:
        if kind == MSG_OPEN:
            _, version, bands, clen = _OPEN.unpack_from(message)
            if version != PROTOCOL_VERSION:
                raise AnalyticsProtocolError(
                    f"analytics protocol version {version}, this worker speaks {PROTOCOL_VERSION}",
                    reason="version",
                )
            if not 1 <= bands <= MAX_BANDS:
                raise AnalyticsProtocolError(f"bands {bands} outside [1, {MAX_BANDS}]")
            body = message[_OPEN.size :]
            if len(body) != clen:
                raise AnalyticsProtocolError("OPEN: context length does not match")
            return Open(bands=bands, context=body, version=version)
        if kind == MSG_READY:
            if len(message) != _READY.size:
                raise AnalyticsProtocolError(f"READY must be {_READY.size} bytes")
            _, slots, max_batches = _READY.unpack(message)
            return Ready(slots, max_batches)
        if kind == MSG_CT:
            _, batch, lane, digest, clen = _CT.unpack_from(message)
            body = message[_CT.size :]
            if len(body) != clen:
                raise AnalyticsProtocolError("CT: ciphertext length does not match")
            _check_digest(digest, body, f"batch {batch} lane {lane}")
            return Ciphertext(batch, lane, body)
        if kind == MSG_ACK:
            if len(message) != _ACK.size:
                raise AnalyticsProtocolError(f"ACK must be {_ACK.size} bytes")
            _, batch, lane = _ACK.unpack(message)
            return Ack(batch, lane)
        if kind == MSG_FETCH:
            _, batches, nlen = _FETCH.unpack_from(message)
            raw = message[_FETCH.size :]
            if len(raw) != nlen:
                raise AnalyticsProtocolError("FETCH: name length does not match")
            return Fetch(batches, _name(raw))
        if kind == MSG_RESULT:
            _, batches, seconds, nlen = _RESULT_HEAD.unpack_from(message)
            pos = _RESULT_HEAD.size
            raw = message[pos : pos + nlen]
            if len(raw) != nlen:
                raise AnalyticsProtocolError("RESULT: truncated name")
            name = _name(raw)
            digest, clen = _RESULT_TAIL.unpack_from(message, pos + nlen)
            body = message[pos + nlen + _RESULT_TAIL.size :]
            if len(body) != clen:
                raise AnalyticsProtocolError("RESULT: ciphertext length does not match")
            _check_digest(digest, body, f"result {name}")
            return Result(batches, name, body, seconds)
        if kind == MSG_ERROR:
            clen = message[1]
            raw_code = message[2 : 2 + clen]
            (mlen,) = struct.unpack_from(">H", message, 2 + clen)
            text = message[4 + clen :]
            code = _name(raw_code)
            if len(raw_code) != clen or len(text) != mlen:
                raise AnalyticsProtocolError("ERROR: lengths do not match")
            return Error(code, text.decode("utf-8", errors="replace"))
        raise AnalyticsProtocolError(f"unknown analytics message type {kind}")
    except AnalyticsProtocolError:
        raise
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise AnalyticsProtocolError(f"malformed analytics message: {exc}") from None

"""The ingest wire format: what the gateway sends the hospital inside the PQ channel.

This module owns the format (both gateway and hospital import it). Each channel message
is one of:

    BATCH  type=1 | batch_id u64 | count u16 | count x item
           item = device_id_len u8 | device_id | counter u64 | flags u8 | reading (15 bytes)
    ACK    type=2 | batch_id u64 | stored u16 | duplicates u16

The hospital answers each BATCH with one ACK *after* the batch is committed to disk;
the gateway acknowledges the MQTT messages (QoS 1) only then. ``stored + duplicates ==
count``: a duplicate (same device and counter already stored) is not an error, it is
at-least-once delivery being absorbed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pacegate.errors import RemoteProtocolError
from pacegate.identity import is_valid_device_id
from pacegate.reading import READING_SIZE, Reading

MSG_BATCH = 1
MSG_ACK = 2
# One batch must fit in one channel record with room to spare. 500 readings is ~45 KB;
# bigger batches add latency without measurably raising throughput (see bench/).
MAX_BATCH_ITEMS = 500
FLAG_IMPLAUSIBLE = 0x01  # heart rate or age outside physiological bounds: flagged, stored

_BATCH_HEAD = struct.Struct(">BQH")
_ACK = struct.Struct(">BQHH")
_ITEM_TAIL = struct.Struct(">QB")


class IngestWireError(RemoteProtocolError):
    """The one error a malformed ingest message raises."""


@dataclass(frozen=True, slots=True)
class IngestItem:
    device_id: str
    counter: int
    reading: Reading
    flags: int = 0


@dataclass(frozen=True, slots=True)
class IngestBatch:
    batch_id: int
    items: tuple[IngestItem, ...]


@dataclass(frozen=True, slots=True)
class IngestAck:
    batch_id: int
    stored: int
    duplicates: int


def encode_batch(batch: IngestBatch) -> bytes:
    if len(batch.items) > MAX_BATCH_ITEMS:
        raise ValueError(f"batch holds {len(batch.items)} items, limit {MAX_BATCH_ITEMS}")
    parts = [_BATCH_HEAD.pack(MSG_BATCH, batch.batch_id, len(batch.items))]
    for item in batch.items:
        did = item.device_id.encode()
        parts.append(
            bytes([len(did)])
            + did
            + _ITEM_TAIL.pack(item.counter, item.flags)
            + item.reading.to_bytes()
        )
    return b"".join(parts)


def encode_ack(ack: IngestAck) -> bytes:
    return _ACK.pack(MSG_ACK, ack.batch_id, ack.stored, ack.duplicates)


def decode(message: bytes) -> IngestBatch | IngestAck:
    """Parse one ingest message, or raise :class:`IngestWireError` (never anything else)."""
    if not message:
        raise IngestWireError("empty ingest message")
    kind = message[0]
    try:
        if kind == MSG_ACK:
            if len(message) != _ACK.size:
                raise IngestWireError(f"ACK must be {_ACK.size} bytes")
            _, batch_id, stored, dups = _ACK.unpack(message)
            return IngestAck(batch_id, stored, dups)
        if kind != MSG_BATCH:
            raise IngestWireError(f"unknown ingest message type {kind}")
        if len(message) < _BATCH_HEAD.size:
            raise IngestWireError("truncated BATCH header")
        _, batch_id, count = _BATCH_HEAD.unpack_from(message)
        if count > MAX_BATCH_ITEMS:
            raise IngestWireError(f"batch of {count} items exceeds {MAX_BATCH_ITEMS}")
        pos = _BATCH_HEAD.size
        items = []
        for _ in range(count):
            dlen = message[pos]
            did_raw = message[pos + 1 : pos + 1 + dlen]
            pos += 1 + dlen
            did = did_raw.decode("utf-8")
            if len(did_raw) != dlen or not is_valid_device_id(did):
                raise IngestWireError("invalid device id in batch")
            counter, flags = _ITEM_TAIL.unpack_from(message, pos)
            pos += _ITEM_TAIL.size
            raw = message[pos : pos + READING_SIZE]
            pos += READING_SIZE
            items.append(IngestItem(did, counter, Reading.from_bytes(raw), flags))
        if pos != len(message):
            raise IngestWireError("trailing bytes after batch")
        return IngestBatch(batch_id, tuple(items))
    except IngestWireError:
        raise
    except (IndexError, struct.error, UnicodeDecodeError, ValueError, RemoteProtocolError) as exc:
        raise IngestWireError(f"malformed ingest message: {exc}") from None

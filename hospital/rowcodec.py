"""The plaintext inside each stored token (this module owns that format), shared by every
:class:`~hospital.store.ReadingStore` backend. Pure: no I/O.

The JSON of the reading and who sent it, padded with spaces to a multiple of
:data:`PLAINTEXT_BLOCK` bytes::

    {"counter": 7, "device_id": "pm-0001", "flags": 0, "reading": {...}, "v": 1}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pacegate.ingest import IngestItem
from pacegate.reading import Reading

# Plaintext is padded to a multiple of this, so token length does not reveal the length of
# a device id or of a timestamp's fraction. 256 covers every device id (<= 64 characters).
PLAINTEXT_BLOCK = 256


@dataclass(frozen=True, slots=True)
class StoredReading:
    """A reading as stored: the reading plus who sent it and its flags."""

    device_id: str
    counter: int
    flags: int
    reading: Reading


def encode_plaintext(item: IngestItem) -> bytes:
    body = json.dumps(
        {
            "v": 1,
            "device_id": item.device_id,
            "counter": item.counter,
            "flags": item.flags,
            "reading": item.reading.to_json(),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    padded = -(-len(body) // PLAINTEXT_BLOCK) * PLAINTEXT_BLOCK
    return body + b" " * (padded - len(body))  # JSON ignores trailing whitespace


def decode_plaintext(plaintext: bytes) -> StoredReading:
    obj: Any = json.loads(plaintext)
    return StoredReading(
        device_id=str(obj["device_id"]),
        counter=int(obj["counter"]),
        flags=int(obj["flags"]),
        reading=Reading.from_json(obj["reading"]),
    )


def in_period(timestamp: str, since: datetime | None, until: datetime | None) -> bool:
    """Whether the JSON ``timestamp`` of a plaintext lies in ``[since, until)``."""
    ts = datetime.fromisoformat(timestamp)
    if ts.tzinfo is None:  # as Reading.from_json
        ts = ts.replace(tzinfo=UTC)
    return (since is None or ts >= since) and (until is None or ts < until)

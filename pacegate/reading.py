"""The pacemaker reading of the specification and its compact binary encoding.

The specification's reading is ``{age, heart_rate_bpm, sensor_id, timestamp}``. On the
wire (inside the sealed payload) it is 15 bytes, big-endian::

    age             u8    years
    heart_rate_bpm  u16   beats per minute
    sensor_id       u32   the pacemaker's sensor number
    timestamp       i64   microseconds since the Unix epoch, UTC

JSON would be 90 bytes: on a battery-powered radio every byte costs energy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pacegate.errors import RemoteProtocolError

_READING = struct.Struct(">BHIq")
READING_SIZE = _READING.size  # 15

# Physiological plausibility, not device limits: a reading outside these bounds is
# stored but *flagged*, never silently accepted as normal.
HEART_RATE_PLAUSIBLE_MIN = 20
HEART_RATE_PLAUSIBLE_MAX = 250
# The clinical "normal" resting range used by the analytics' out-of-range share.
HEART_RATE_NORMAL_MIN = 60
HEART_RATE_NORMAL_MAX = 100
AGE_MAX = 120

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Reading:
    age: int
    heart_rate_bpm: int
    sensor_id: int
    timestamp: datetime

    def __post_init__(self) -> None:
        if not 0 <= self.age <= 255:
            raise ValueError(f"age must fit in one byte, got {self.age}")
        if not 0 <= self.heart_rate_bpm <= 0xFFFF:
            raise ValueError(f"heart_rate_bpm must fit in u16, got {self.heart_rate_bpm}")
        if not 0 <= self.sensor_id <= 0xFFFFFFFF:
            raise ValueError(f"sensor_id must fit in u32, got {self.sensor_id}")
        if self.timestamp.tzinfo is None:
            raise ValueError("timestamp must be timezone-aware (UTC)")

    @property
    def plausible(self) -> bool:
        """False for a value no living heart produces: flag it, do not drop it."""
        return (
            HEART_RATE_PLAUSIBLE_MIN <= self.heart_rate_bpm <= HEART_RATE_PLAUSIBLE_MAX
            and self.age <= AGE_MAX
        )

    def to_bytes(self) -> bytes:
        micros = (self.timestamp - _EPOCH) // timedelta(microseconds=1)
        return _READING.pack(self.age, self.heart_rate_bpm, self.sensor_id, micros)

    @classmethod
    def from_bytes(cls, data: bytes) -> Reading:
        if len(data) != READING_SIZE:
            raise RemoteProtocolError(
                f"reading must be {READING_SIZE} bytes, got {len(data)}", reason="malformed"
            )
        age, hr, sensor_id, micros = _READING.unpack(data)
        try:
            ts = _EPOCH + timedelta(microseconds=micros)
        except OverflowError as exc:
            raise RemoteProtocolError("timestamp out of range", reason="malformed") from exc
        return cls(age=age, heart_rate_bpm=hr, sensor_id=sensor_id, timestamp=ts)

    def to_json(self) -> dict[str, Any]:
        """The specification's JSON shape (used at rest, inside the Fernet token)."""
        return {
            "age": self.age,
            "heart_rate_bpm": self.heart_rate_bpm,
            "sensor_id": self.sensor_id,
            "timestamp": self.timestamp.isoformat(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Reading:
        ts = datetime.fromisoformat(obj["timestamp"])
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        return cls(
            age=int(obj["age"]),
            heart_rate_bpm=int(obj["heart_rate_bpm"]),
            sensor_id=int(obj["sensor_id"]),
            timestamp=ts,
        )


def parse_time_option(value: str | None, option: str) -> datetime | None:
    """A ``--since``/``--until`` command-line value: ISO 8601, UTC when no zone is given."""
    from pacegate.errors import ConfigError

    if value is None:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            None, option, f"{value!r} is not an ISO 8601 timestamp", fix="e.g. 2025-01-31T12:00:00Z"
        ) from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)

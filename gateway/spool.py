"""The gateway's encrypted, bounded store-and-forward spool (SQLite + Fernet).

While the hospital is unreachable, accepted readings are written here *before* their MQTT
messages are acknowledged, and drained in order when it returns. Each row is one batch
(the :mod:`pacegate.ingest` BATCH encoding, so nothing parses readings twice) inside a Fernet
token under a 32-byte key file of mode 0600 kept beside the database. Only the row number
and the reading count stay in clear: no device id, no counter, no value.

Bounded by readings: :meth:`Spool.append` raises :class:`SpoolFull` rather than grow past
``max_readings``; the service then pauses MQTT (gateway.yaml ``spool.when_full``).
"""

from __future__ import annotations

import base64
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from pacegate.errors import ConfigError, InvariantError
from pacegate.ingest import IngestBatch, IngestItem, IngestWireError, decode, encode_batch
from pacegate.layout import SECRET_DIR_MODE, create_private, write_secret
from pacegate.secretfile import read_secret
from pacegate.sqlite import open_database

SPOOL_KEY_SIZE = 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    readings INTEGER NOT NULL,
    token    BLOB NOT NULL
)
"""


class SpoolFull(Exception):
    """Appending would exceed the spool's bound; nothing was written."""


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    seq: int
    items: tuple[IngestItem, ...]


def _load_or_create_key(path: Path) -> bytes:
    if path.exists():
        raw = read_secret(
            path,
            "spool key",
            key="spool.key",
            missing_fix="restore the key file; without it the spooled readings cannot be read",
        )
        if len(raw) != SPOOL_KEY_SIZE:
            raise ConfigError(
                path,
                "spool.key",
                f"spool key must be {SPOOL_KEY_SIZE} bytes, got {len(raw)}",
                fix="restore the key file; without it the spooled readings cannot be read",
            )
        return raw
    key = os.urandom(SPOOL_KEY_SIZE)
    write_secret(path, key)
    return key


def _unreadable(path: Path, exc: sqlite3.DatabaseError) -> ConfigError:
    return ConfigError(
        path,
        "spool.path",
        f"spool database is unreadable: {exc}",
        fix="restore it from backup; moving it aside starts an empty spool, and the "
        "readings it held are lost (the broker already had their acknowledgements)",
    )


class Spool:
    def __init__(self, path: Path, key_path: Path, *, max_readings: int) -> None:
        self.path = path
        self.max_readings = max_readings
        path.parent.mkdir(parents=True, exist_ok=True, mode=SECRET_DIR_MODE)
        self._fernet = Fernet(base64.urlsafe_b64encode(_load_or_create_key(key_path)))
        # owner-only before SQLite makes its -wal and -shm files (also an older spool's)
        create_private(path)
        try:
            # a spooled reading is acknowledged to the broker: it must be on disk first
            self._db = open_database(path, synchronous_full=True)
        except sqlite3.DatabaseError as exc:
            raise _unreadable(path, exc) from None
        try:
            self._db.execute(_SCHEMA)
            row = self._db.execute(
                "SELECT COALESCE(SUM(readings), 0), COUNT(*) FROM spool"
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise _unreadable(path, exc) from None
        self._readings = int(row[0])
        self._batches = int(row[1])

    @property
    def readings(self) -> int:
        return self._readings

    @property
    def batches(self) -> int:
        return self._batches

    def __bool__(self) -> bool:
        return self._batches > 0

    def room(self) -> int:
        return max(0, self.max_readings - self._readings)

    def append(self, items: Sequence[IngestItem]) -> int:
        """Write ``items`` durably as one row; return its sequence number."""
        if not items:
            raise ValueError("nothing to spool")
        if len(items) > self.room():
            raise SpoolFull(f"spool holds {self._readings} of {self.max_readings} readings")
        token = self._fernet.encrypt(encode_batch(IngestBatch(0, tuple(items))))
        with self._db:
            self._db.execute("BEGIN")
            cur = self._db.execute(
                "INSERT INTO spool (readings, token) VALUES (?, ?)", (len(items), token)
            )
        self._readings += len(items)
        self._batches += 1
        seq = cur.lastrowid
        if seq is None:
            raise InvariantError("seq unset here")
        return seq

    def oldest(self) -> SpooledBatch | None:
        row = self._db.execute("SELECT seq, token FROM spool ORDER BY seq LIMIT 1").fetchone()
        if row is None:
            return None
        seq, token = int(row[0]), bytes(row[1])
        try:
            batch = decode(self._fernet.decrypt(token))
        except (InvalidToken, IngestWireError) as exc:
            raise ConfigError(
                self.path,
                "spool",
                f"row {seq} does not decrypt under the spool key ({type(exc).__name__})",
                fix="restore the matching spool.key, or move the spool aside to start empty",
            ) from None
        if not isinstance(batch, IngestBatch):
            raise ConfigError(self.path, "spool", f"row {seq} is not a batch")
        return SpooledBatch(seq, batch.items)

    def items(self) -> list[IngestItem]:
        """Every spooled reading, oldest first (inspection and tests; the drain uses
        :meth:`oldest`)."""
        out: list[IngestItem] = []
        for (seq,) in self._db.execute("SELECT seq FROM spool ORDER BY seq").fetchall():
            row = self._db.execute("SELECT token FROM spool WHERE seq = ?", (seq,)).fetchone()
            batch = decode(self._fernet.decrypt(bytes(row[0])))
            if isinstance(batch, IngestBatch):
                out.extend(batch.items)
        return out

    def remove(self, seq: int) -> None:
        with self._db:
            self._db.execute("BEGIN")
            row = self._db.execute("SELECT readings FROM spool WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
        self._readings -= int(row[0])
        self._batches -= 1

    def close(self) -> None:
        self._db.close()

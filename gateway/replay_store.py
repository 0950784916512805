"""Per-device replay windows that survive a gateway restart (SQLite).

Two windows per device:

- the *live* window, in memory, is what the pipeline checks and advances as messages arrive;
- the *durable* window, mirrored in SQLite, records only counters whose readings were durably
  handed on (hospital ACK, or written to the spool). It is committed *before* the MQTT
  message is acknowledged.

Why two: an MQTT message that was accepted but not yet acknowledged when the gateway died is
delivered again by the broker. If the live window had been persisted, that redelivery would
be refused as a replay and the reading lost. With the durable window it is accepted again,
and the hospital's uniqueness on (device, counter) absorbs the rare duplicate. After an MQTT
reconnect the broker redelivers unacknowledged messages too, so :meth:`reset_live` rewinds
the live windows to the durable ones.

Counters are up to 2^64-1 and the bitmap is ``size`` bits, so both are stored as big-endian
blobs (SQLite integers are signed 64-bit).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from pacegate.errors import ConfigError
from pacegate.layout import create_private
from pacegate.replay import DEFAULT_WINDOW_SIZE, ReplayRejected, ReplayWindow
from pacegate.sqlite import open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replay_window (
    device_id TEXT PRIMARY KEY,
    highest   BLOB NOT NULL,
    bitmap    BLOB NOT NULL
) WITHOUT ROWID
"""


def _unreadable(path: Path, exc: sqlite3.DatabaseError) -> ConfigError:
    return ConfigError(
        path,
        "state_dir",
        f"replay state database is unreadable: {exc}",
        fix="restore it from backup; deleting it re-opens a replay window for every "
        "device's old readings",
    )


class ReplayStore:
    def __init__(self, path: Path, *, size: int = DEFAULT_WINDOW_SIZE) -> None:
        self.path = path
        self.size = size
        # replay windows tell which devices spoke and how much: owner-only, like the spool
        create_private(path)
        try:
            # the window is committed before an MQTT ack: it must reach the disk
            self._db = open_database(path, synchronous_full=True)
        except sqlite3.DatabaseError as exc:
            raise _unreadable(path, exc) from None
        try:
            self._db.execute(_SCHEMA)
            rows = self._db.execute("SELECT device_id, highest, bitmap FROM replay_window")
            self._durable = {
                did: ReplayWindow.from_state(
                    int.from_bytes(h, "big"), int.from_bytes(b, "big"), size
                )
                for did, h, b in rows
            }
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise _unreadable(path, exc) from None
        self._live: dict[str, ReplayWindow] = {}

    def live(self, device_id: str) -> ReplayWindow:
        w = self._live.get(device_id)
        if w is None:
            d = self._durable.get(device_id)
            w = ReplayWindow.from_state(*d.to_state(), self.size) if d else ReplayWindow(self.size)
            self._live[device_id] = w
        return w

    def durable(self, device_id: str) -> ReplayWindow | None:
        d = self._durable.get(device_id)
        return ReplayWindow.from_state(*d.to_state(), self.size) if d else None

    def mark_durable(self, spent: Iterable[tuple[str, int]]) -> None:
        """Record (device, counter) pairs as durably handed on; one fsynced transaction."""
        changed: set[str] = set()
        for device_id, counter in spent:
            w = self._durable.get(device_id)
            if w is None:
                w = self._durable[device_id] = ReplayWindow(self.size)
            with contextlib.suppress(ReplayRejected):  # a duplicate: already durable
                w.accept(counter)
                changed.add(device_id)
        if not changed:
            return
        nbytes = (self.size + 7) // 8
        rows = []
        for did in changed:
            highest, bitmap = self._durable[did].to_state()
            rows.append((did, highest.to_bytes(8, "big"), bitmap.to_bytes(nbytes, "big")))
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO replay_window (device_id, highest, bitmap) VALUES (?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET highest=excluded.highest, "
                "bitmap=excluded.bitmap",
                rows,
            )

    def reset_live(self) -> None:
        """Rewind live windows to the durable ones (unacked messages will come again)."""
        self._live.clear()

    def close(self) -> None:
        self._db.close()

"""The chain head's anchor outside the database: an append-only, fsynced log of MACed heads.

The chain head inside the database (``meta``) moves with the database: a WAL truncated to
0 bytes, to half, or by its last 100 bytes, or an older copy of the file put back, leaves
a database whose chain and head agree, only shorter. So after every commit the store also
appends the new head here (and fsyncs it) *before* the batch is acknowledged, and
``verify`` compares: a database that ends before the anchored row was rolled back. This
module owns the file's format::

    record = magic "PGH1" (4) || integrity-key version u32 || seq u64 || chain (32)
             || HMAC(chain key of that version, "anchor" || seq || chain) (32)

80 bytes, big-endian, appended. A torn last record (a crash mid-append) or garbage fails
its MAC and is ignored; the valid record with the highest ``seq`` is the anchor.

What it does not stop: someone who can write this file as well as the database can roll
both back together. Keep the anchor on another volume (``store.anchor`` in hospital.yaml),
or record ``verify``'s head elsewhere (see docs/hospital.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pacegate.errors import PacegateError
from pacegate.layout import SECRET_FILE_MODE, write_secret

MAGIC = b"PGH1"
RECORD = struct.Struct(">4sIQ32s32s")
RECORD_SIZE = RECORD.size  # 80
# The log is cut back to its last record once it reaches this size: ~800 heads of history
# nobody needs (only the newest counts), and small enough to read at every verify.
MAX_LOG_BYTES = 64 * 1024
# A log larger than this is not one of ours: read no further than this.
MAX_READ_BYTES = 4 * MAX_LOG_BYTES


class AnchorError(PacegateError):
    """The anchor file cannot be used (missing where it must exist, unwritable, locked)."""


@dataclass(frozen=True, slots=True)
class AnchorRecord:
    version: int  # the integrity-key version whose chain key made ``mac``
    seq: int
    chain: bytes
    mac: bytes

    def encode(self) -> bytes:
        return RECORD.pack(MAGIC, self.version, self.seq, self.chain, self.mac)


class HeadAnchor:
    """The anchor log at ``path``; :meth:`locked` serialises writers across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    def exists(self) -> bool:
        return self.path.exists()

    @contextlib.contextmanager
    def locked(self, timeout: float) -> Iterator[None]:
        """Hold the writers' lock: a commit and its anchor record (or a re-keying and the
        anchor it rewrites) happen as one step, so no stale head lands after a newer one."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, SECRET_FILE_MODE)
        try:
            deadline = time.monotonic() + timeout
            pause = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise AnchorError(
                            f"{self.lock_path}: another writer held the anchor lock for "
                            f"{timeout:g} s (a long 'rotate-key --integrity'?); try again"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def append(self, record: AnchorRecord) -> None:
        """Append and fsync one record (hold :meth:`locked`). Never creates the file: a
        missing anchor means the store was tampered with, and must be looked at."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise AnchorError(
                f"{self.path}: the chain-head anchor is missing: the database may have been "
                "replaced or rolled back. Run 'pacegate hospital verify -c FILE'; once the "
                "store is known good, accept its head with 'pacegate hospital verify -c FILE "
                "--reanchor'"
            ) from None
        try:
            os.write(fd, record.encode())
            os.fdatasync(fd)
            full = os.fstat(fd).st_size >= MAX_LOG_BYTES
        finally:
            os.close(fd)
        if full:
            self.replace(record)

    def replace(self, record: AnchorRecord) -> None:
        """Make ``record`` the whole log, atomically (a new file, fsynced, renamed over the
        old one): at creation, when the log is full, after re-keying, after an operator
        accepted the current head (hold :meth:`locked`)."""
        write_secret(self.path, record.encode())

    def records(self) -> list[AnchorRecord] | None:
        """Every well-formed record, oldest first (MACs not checked: the store does that);
        None when the file does not exist."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_READ_BYTES)
        except FileNotFoundError:
            return None
        out = []
        for off in range(0, len(data) - RECORD_SIZE + 1, RECORD_SIZE):
            magic, version, seq, chain, mac = RECORD.unpack_from(data, off)
            if magic == MAGIC:
                out.append(AnchorRecord(version, seq, chain, mac))
        return out

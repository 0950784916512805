"""The device's persisted nonce counter ("NVS"): a counter value is never handed out twice,
across crashes and power loss too.

The sealed format derives the ChaCha20-Poly1305 nonce from the counter, so a repeated
counter under the same key would be a repeated nonce: it leaks the XOR of two readings and
lets an attacker forge Poly1305 tags. Writing the counter to flash after every reading
would wear an ESP32's NVS out; instead the device *reserves blocks*:

1. on start, read the persisted ceiling ``C`` (the file is written at enrolment; a missing
   one is fatal, never "start again at 1");
2. persist ``C + BLOCK`` (write a temporary file, fsync, rename, fsync the directory)
   **before** handing out any counter above ``C``;
3. hand out ``C + 1 .. C + BLOCK`` from memory; when the block is used up, go to 2.

A crash loses at most the unused rest of the current block (counters are skipped, never
repeated); the gateway's replay window accepts a forward jump. A file rolled back to an old
copy cannot be detected here; the sealed format v2 derives the key per boot epoch so that
even then no (key, nonce) pair repeats. The file format is :mod:`pacegate.counterfile`'s; a
missing, damaged or foreign file is a :class:`ConfigError` whose fix is re-keying. See
``docs/devices.md``.
"""

from __future__ import annotations

from pathlib import Path

from pacegate import counterfile
from pacegate.errors import LocalProtocolError
from pacegate.identity import validate_device_id
from pacegate.sealed import COUNTER_MAX

# 1,024 readings per flash write: at 1 reading/s one NVS write every 17 minutes instead of
# every second, and a crash skips at most 1,023 of the 2^64 counters.
DEFAULT_BLOCK = 1024


class CounterStore:
    """Hands out strictly increasing counters for one device, persisted in reserved blocks.

    :meth:`next` is pure memory while the block lasts. When :attr:`needs_reservation` is
    true, the next call persists a new ceiling first (one fsync); an asyncio caller can run
    :meth:`reserve` in a thread beforehand to keep the fsync off its event loop.
    """

    def __init__(self, path: Path, device_id: str, *, block: int = DEFAULT_BLOCK) -> None:
        if block < 1:
            raise ValueError(f"counter block must be >= 1, got {block}")
        self.path = path
        self.device_id = validate_device_id(device_id)
        self.block = block
        self.reservations = 0
        persisted = self._read()
        self._last = persisted  # the last counter handed out (or skipped): never reused
        self._ceiling = persisted  # the highest counter the file allows us to use
        self.started_at = persisted

    @property
    def ceiling(self) -> int:
        """The persisted ceiling: every counter handed out so far is <= this."""
        return self._ceiling

    @property
    def last(self) -> int:
        return self._last

    @property
    def needs_reservation(self) -> bool:
        return self._last >= self._ceiling

    def _read(self) -> int:
        return counterfile.read(self.path, self.device_id)

    def reserve(self) -> None:
        """Persist the next block's ceiling (durably) if the current block is used up."""
        if not self.needs_reservation:
            return
        new_ceiling = min(COUNTER_MAX, self._ceiling + self.block)
        if new_ceiling <= self._last:
            raise LocalProtocolError(
                f"{self.device_id}: the 64-bit nonce counter is exhausted; re-key the device "
                "('pacegate pki rekey-device')"
            )
        counterfile.write(self.path, self.device_id, new_ceiling)
        # Only now, with the ceiling durable, may counters up to it be used.
        self._ceiling = new_ceiling
        self.reservations += 1

    def next(self) -> int:
        """The next counter: strictly greater than every counter this device ever used."""
        if self.needs_reservation:
            self.reserve()
        self._last += 1
        return self._last

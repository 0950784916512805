"""The device's persisted nonce counter ("NVS"): a counter value is never handed out twice,
across crashes and power loss too.

The sealed format derives the ChaCha20-Poly1305 nonce from the counter, so a repeated
counter under the same PSK would be a repeated nonce: it leaks the XOR of two readings and
lets an attacker forge Poly1305 tags. Writing the counter to flash after every reading
would wear an ESP32's NVS out; instead the device *reserves blocks*:

1. on start, read the persisted ceiling ``C`` (0 if the file does not exist);
2. persist ``C + BLOCK`` (write a temporary file, fsync, rename, fsync the directory)
   **before** handing out any counter above ``C``;
3. hand out ``C + 1 .. C + BLOCK`` from memory; when the block is used up, go to 2.

A crash loses at most the unused rest of the current block (counters are skipped, never
repeated); the gateway's replay window accepts a forward jump. See ``docs/devices.md``.

File format (one line of ASCII, so an operator can read it)::

    pacegate-counter v1 <device_id> <ceiling> <crc32 of the text before it, hex>

The device id inside the file stops a counter file copied to another device's directory
from being used there; the CRC catches a corrupted file. Either is a :class:`ConfigError`:
a device must not guess where its counter stood.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from pacegate.errors import ConfigError, LocalProtocolError
from pacegate.identity import validate_device_id
from pacegate.sealed import COUNTER_MAX

# 1,024 readings per flash write: at 1 reading/s one NVS write every 17 minutes instead of
# every second, and a crash skips at most 1,023 of the 2^64 counters.
DEFAULT_BLOCK = 1024
_MAGIC = "pacegate-counter"
_VERSION = "v1"
_FILE_MODE = 0o600


def _render(device_id: str, ceiling: int) -> bytes:
    body = f"{_MAGIC} {_VERSION} {device_id} {ceiling}"
    return f"{body} {zlib.crc32(body.encode()):08x}\n".encode()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        try:
            text = self.path.read_text(encoding="ascii")
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise self._corrupt(f"cannot read it: {exc}") from None
        parts = text.strip().split(" ")
        if len(parts) != 5 or parts[0] != _MAGIC:
            raise self._corrupt("not a pacegate counter file")
        magic, version, device_id, ceiling_text, crc_text = parts
        if version != _VERSION:
            raise self._corrupt(f"counter file version {version!r} is not supported")
        body = f"{magic} {version} {device_id} {ceiling_text}"
        if f"{zlib.crc32(body.encode()):08x}" != crc_text:
            raise self._corrupt("checksum does not match (the file is damaged)")
        if device_id != self.device_id:
            raise ConfigError(
                self.path,
                "device_id",
                f"counter file belongs to {device_id!r}, not {self.device_id!r}",
                fix="restore this device's own counter.state; never copy one between devices",
            )
        try:
            ceiling = int(ceiling_text)
        except ValueError:
            raise self._corrupt("ceiling is not a number") from None
        if not 0 <= ceiling <= COUNTER_MAX:
            raise self._corrupt(f"ceiling {ceiling} is outside 0..2^64-1")
        return ceiling

    def _corrupt(self, problem: str) -> ConfigError:
        return ConfigError(
            self.path,
            "ceiling",
            problem,
            fix="restore the file from a backup, or re-enroll the device with "
            "'pacegate pki enroll' (a new PSK) - never reset a counter under the same PSK",
        )

    def reserve(self) -> None:
        """Persist the next block's ceiling (durably) if the current block is used up."""
        if not self.needs_reservation:
            return
        new_ceiling = min(COUNTER_MAX, self._ceiling + self.block)
        if new_ceiling <= self._last:
            raise LocalProtocolError(
                f"{self.device_id}: the 64-bit nonce counter is exhausted; re-enroll the device"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            os.write(fd, _render(self.device_id, new_ceiling))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        # Only now, with the ceiling durable, may counters up to it be used.
        self._ceiling = new_ceiling
        self.reservations += 1

    def next(self) -> int:
        """The next counter: strictly greater than every counter this device ever used."""
        if self.needs_reservation:
            self.reserve()
        self._last += 1
        return self._last

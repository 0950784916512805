"""Sealed-reading format v1: a pacemaker reading under ChaCha20-Poly1305 (sans-IO).

This module owns the format; nothing else parses it. Layout (big-endian)::

    offset  size  field
    0       1     version      = 1
    1       8     counter      per-device, strictly increasing, starts at 1
    9       15+16 ciphertext   ChaCha20-Poly1305(reading, 15 bytes) || tag

    nonce = version (1) || 0x000000 (3) || counter (8)            -- 12 bytes
    aad   = b"pacegate/reading" || version || len(device_id) (1) || device_id || counter (8)

Why a counter nonce and not a random one: a 96-bit random nonce is safe for a few billion
messages, but an ESP32 has a weak entropy source at boot; a counter that is persisted in
*reserved blocks* (see :class:`device_sim` 's counter store) can never repeat, even across
power loss, and it doubles as the replay-window sequence number. The AAD binds the device id
(taken from the topic) and the counter, so a payload moved to another device's topic, or
with its counter edited, fails authentication.

A v2 can coexist: :func:`open_reading` dispatches on the first byte and refuses versions it
does not know with reason ``unsupported_version``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pacegate.errors import LocalProtocolError, RemoteProtocolError
from pacegate.reading import READING_SIZE, Reading

VERSION_1 = 1
SUPPORTED_VERSIONS = frozenset({VERSION_1})
PSK_SIZE = 32
TAG_SIZE = 16
COUNTER_MAX = 2**64 - 1
_HEADER = struct.Struct(">BQ")
HEADER_SIZE = _HEADER.size  # 9
SEALED_SIZE_V1 = HEADER_SIZE + READING_SIZE + TAG_SIZE  # 40
# Anything longer than this is refused before any parsing or crypto: a v1 payload is 40
# bytes; the slack leaves room for a v2 without letting a peer make us hash megabytes.
MAX_SEALED_SIZE = 256
_AAD_LABEL = b"pacegate/reading"


class SealedReadingError(RemoteProtocolError):
    """The one error a sealed payload from the network can raise."""


@dataclass(frozen=True, slots=True)
class SealedHeader:
    version: int
    counter: int


def _nonce(version: int, counter: int) -> bytes:
    return bytes([version, 0, 0, 0]) + counter.to_bytes(8, "big")


def _aad(version: int, device_id: str, counter: int) -> bytes:
    did = device_id.encode("utf-8")
    if len(did) > 255:
        raise LocalProtocolError("device id longer than 255 bytes")
    return _AAD_LABEL + bytes([version, len(did)]) + did + counter.to_bytes(8, "big")


def seal_reading(psk: bytes, device_id: str, counter: int, reading: Reading) -> bytes:
    """Seal ``reading`` for ``device_id`` under ``psk`` with the never-reused ``counter``."""
    if len(psk) != PSK_SIZE:
        raise LocalProtocolError(f"PSK must be {PSK_SIZE} bytes, got {len(psk)}")
    if not 1 <= counter <= COUNTER_MAX:
        raise LocalProtocolError(f"counter must be in 1..2^64-1, got {counter}")
    header = _HEADER.pack(VERSION_1, counter)
    body = ChaCha20Poly1305(psk).encrypt(
        _nonce(VERSION_1, counter), reading.to_bytes(), _aad(VERSION_1, device_id, counter)
    )
    return header + body


def parse_header(payload: bytes) -> SealedHeader:
    """Read version and counter without any crypto (for the replay pre-check)."""
    if len(payload) > MAX_SEALED_SIZE:
        raise SealedReadingError(
            f"sealed payload is {len(payload)} bytes, limit {MAX_SEALED_SIZE}", reason="oversized"
        )
    if len(payload) < 1:
        raise SealedReadingError("empty payload", reason="malformed")
    version = payload[0]
    if version not in SUPPORTED_VERSIONS:
        raise SealedReadingError(
            f"sealed-reading version {version} is not supported", reason="unsupported_version"
        )
    if len(payload) != SEALED_SIZE_V1:
        raise SealedReadingError(
            f"v1 sealed payload must be {SEALED_SIZE_V1} bytes, got {len(payload)}",
            reason="malformed",
        )
    _, counter = _HEADER.unpack_from(payload)
    if counter == 0:
        raise SealedReadingError("counter 0 is never used", reason="malformed")
    return SealedHeader(version=version, counter=counter)


def open_reading(psk: bytes, device_id: str, payload: bytes) -> tuple[int, Reading]:
    """Authenticate and open ``payload``; return ``(counter, reading)``.

    Raises :class:`SealedReadingError` (and nothing else) for any payload that is not a
    valid seal by ``device_id``'s key.
    """
    header = parse_header(payload)
    try:
        plain = ChaCha20Poly1305(psk).decrypt(
            _nonce(header.version, header.counter),
            payload[HEADER_SIZE:],
            _aad(header.version, device_id, header.counter),
        )
    except InvalidTag:
        raise SealedReadingError("authentication tag does not verify", reason="bad_tag") from None
    except (ValueError, LocalProtocolError) as exc:
        raise SealedReadingError(f"cannot open payload: {exc}", reason="malformed") from None
    try:
        return header.counter, Reading.from_bytes(plain)
    except RemoteProtocolError as exc:
        raise SealedReadingError(str(exc), reason=exc.reason) from None

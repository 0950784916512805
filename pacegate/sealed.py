"""Sealed-reading formats v1 and v2: a pacemaker reading under ChaCha20-Poly1305 (sans-IO).

This module owns the format; nothing else parses it. Layouts (big-endian)::

    v1  offset  size  field                  v2  offset  size  field
        0       1     version = 1                0       1     version = 2
        1       8     counter                    1       8     boot epoch (random per boot)
        9       15+16 ciphertext || tag          9       8     counter
                                                 17      15+16 ciphertext || tag

    nonce = version (1) || 0x000000 (3) || counter (8)                       -- 12 bytes
    v1: key = PSK
        aad = b"pacegate/reading" || 1 || len(device_id) (1) || device_id || counter (8)
    v2: key = HKDF-SHA256(ikm = PSK, salt = b"pacegate/reading v2",
                          info = len(device_id) (1) || device_id || epoch (8), L = 32)
        aad = b"pacegate/reading" || 2 || len(device_id) (1) || device_id || epoch (8)
              || counter (8)

Why a counter nonce and not a random one: a 96-bit random nonce is safe for a few billion
messages, but an ESP32 has a weak entropy source at boot; a counter that is persisted in
*reserved blocks* (see :class:`device_sim` 's counter store) never repeats while its file is
intact, and it doubles as the replay-window sequence number. The AAD binds the device id
(taken from the topic) and the counter, so a payload moved to another device's topic, or
with its counter edited, fails authentication.

Why v2 adds a boot epoch: the counter file can still be *rolled back* (an old copy restored,
a flash image re-written), and a rolled-back counter under one key is a repeated nonce. In
v2 every boot draws a fresh 64-bit epoch and seals under a key derived from (PSK, device id,
epoch), so a rolled-back counter repeats a nonce only under a *different* key: no
(key, nonce) pair repeats unless the epoch repeats as well (2^-64 per pair of boots). The
gateway still refuses the rolled-back counters (``replay``/``too_old``): the readings are
lost, the key is not. See ``docs/devices.md``.

:func:`open_reading` dispatches on the first byte and refuses versions it does not know with
reason ``unsupported_version``.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pacegate.errors import LocalProtocolError, RemoteProtocolError
from pacegate.reading import READING_SIZE, Reading

VERSION_1 = 1
VERSION_2 = 2
SUPPORTED_VERSIONS = frozenset({VERSION_1, VERSION_2})
PSK_SIZE = 32
TAG_SIZE = 16
EPOCH_SIZE = 8
COUNTER_MAX = 2**64 - 1
_HEADER = struct.Struct(">BQ")
_HEADER_V2 = struct.Struct(">B8sQ")
HEADER_SIZE = _HEADER.size  # 9 (v1)
HEADER_SIZE_V2 = _HEADER_V2.size  # 17
SEALED_SIZE_V1 = HEADER_SIZE + READING_SIZE + TAG_SIZE  # 40
SEALED_SIZE_V2 = HEADER_SIZE_V2 + READING_SIZE + TAG_SIZE  # 48
_SEALED_SIZE = {VERSION_1: SEALED_SIZE_V1, VERSION_2: SEALED_SIZE_V2}
# Anything longer than this is refused before any parsing or crypto: a v2 payload is 48
# bytes; the slack leaves room for a v3 without letting a peer make us hash megabytes.
MAX_SEALED_SIZE = 256
_AAD_LABEL = b"pacegate/reading"
_KDF_SALT_V2 = b"pacegate/reading v2"
# Derived v2 keys kept per (PSK, device, epoch): one HKDF per device boot at the gateway,
# not one per reading. Bounded: a peer cycling epochs costs us an HKDF each, never memory.
_KEY_CACHE_SIZE = 4096


class SealedReadingError(RemoteProtocolError):
    """The one error a sealed payload from the network can raise."""


@dataclass(frozen=True, slots=True)
class SealedHeader:
    version: int
    counter: int
    epoch: bytes | None = None  # v2 only


def new_epoch() -> bytes:
    """A fresh boot epoch for :func:`seal_reading` (once per device start, from the OS CSPRNG)."""
    return os.urandom(EPOCH_SIZE)


def _nonce(version: int, counter: int) -> bytes:
    return bytes([version, 0, 0, 0]) + counter.to_bytes(8, "big")


def _device_id_field(device_id: str) -> bytes:
    did = device_id.encode("utf-8")
    if len(did) > 255:
        raise LocalProtocolError("device id longer than 255 bytes")
    return bytes([len(did)]) + did


def _aad(version: int, device_id: str, counter: int, epoch: bytes | None = None) -> bytes:
    return (
        _AAD_LABEL
        + bytes([version])
        + _device_id_field(device_id)
        + (epoch or b"")
        + counter.to_bytes(8, "big")
    )


@functools.lru_cache(maxsize=_KEY_CACHE_SIZE)
def _v2_aead(psk: bytes, device_id: str, epoch: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(epoch_key(psk, device_id, epoch))


def epoch_key(psk: bytes, device_id: str, epoch: bytes) -> bytes:
    """The v2 AEAD key for one boot epoch (for test vectors and audits; not on the hot path)."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_KDF_SALT_V2,
        info=_device_id_field(device_id) + epoch,
    ).derive(psk)


def seal_reading(
    psk: bytes, device_id: str, counter: int, reading: Reading, *, epoch: bytes | None = None
) -> bytes:
    """Seal ``reading`` for ``device_id`` under ``psk`` with the never-reused ``counter``.

    With ``epoch`` (8 bytes, :func:`new_epoch` once per boot) the result is v2, sealed under
    the epoch's derived key: what devices send. Without it, v1 (the PSK itself as the key),
    kept for devices that cannot be updated and for the published v1 vectors.
    """
    if len(psk) != PSK_SIZE:
        raise LocalProtocolError(f"PSK must be {PSK_SIZE} bytes, got {len(psk)}")
    if not 1 <= counter <= COUNTER_MAX:
        raise LocalProtocolError(f"counter must be in 1..2^64-1, got {counter}")
    if epoch is None:
        header = _HEADER.pack(VERSION_1, counter)
        body = ChaCha20Poly1305(psk).encrypt(
            _nonce(VERSION_1, counter), reading.to_bytes(), _aad(VERSION_1, device_id, counter)
        )
        return header + body
    if len(epoch) != EPOCH_SIZE:
        raise LocalProtocolError(f"boot epoch must be {EPOCH_SIZE} bytes, got {len(epoch)}")
    header = _HEADER_V2.pack(VERSION_2, epoch, counter)
    body = _v2_aead(psk, device_id, epoch).encrypt(
        _nonce(VERSION_2, counter), reading.to_bytes(), _aad(VERSION_2, device_id, counter, epoch)
    )
    return header + body


def parse_header(payload: bytes) -> SealedHeader:
    """Read version, counter (and v2 epoch) without any crypto (for the replay pre-check)."""
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
    size = _SEALED_SIZE[version]
    if len(payload) != size:
        raise SealedReadingError(
            f"v{version} sealed payload must be {size} bytes, got {len(payload)}",
            reason="malformed",
        )
    epoch: bytes | None
    if version == VERSION_1:
        _, counter = _HEADER.unpack_from(payload)
        epoch = None
    else:
        _, epoch, counter = _HEADER_V2.unpack_from(payload)
    if counter == 0:
        raise SealedReadingError("counter 0 is never used", reason="malformed")
    return SealedHeader(version=version, counter=counter, epoch=epoch)


def open_reading(psk: bytes, device_id: str, payload: bytes) -> tuple[int, Reading]:
    """Authenticate and open ``payload``; return ``(counter, reading)``.

    Raises :class:`SealedReadingError` (and nothing else) for any payload that is not a
    valid seal by ``device_id``'s key.
    """
    header = parse_header(payload)
    try:
        if header.epoch is None:
            aead = ChaCha20Poly1305(psk)
            body = payload[HEADER_SIZE:]
        else:
            aead = _v2_aead(psk, device_id, header.epoch)
            body = payload[HEADER_SIZE_V2:]
        plain = aead.decrypt(
            _nonce(header.version, header.counter),
            body,
            _aad(header.version, device_id, header.counter, header.epoch),
        )
    except InvalidTag:
        raise SealedReadingError("authentication tag does not verify", reason="bad_tag") from None
    except (ValueError, LocalProtocolError) as exc:
        raise SealedReadingError(f"cannot open payload: {exc}", reason="malformed") from None
    try:
        return header.counter, Reading.from_bytes(plain)
    except RemoteProtocolError as exc:
        raise SealedReadingError(str(exc), reason=exc.reason) from None

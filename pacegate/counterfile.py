"""The device counter file ``devices/<id>/counter.state``: its one format, and its only writers.

The file is the device's persisted nonce-counter ceiling (its "NVS"). ``pacegate pki enroll``
creates it (ceiling = the key's first counter - 1) and ``pacegate pki rekey-device`` resets it
together with a new PSK; the device (``device_sim.counter.CounterStore``) reads it and moves
the ceiling up. One ASCII line, so an operator can read it::

    pacegate-counter v1 <device_id> <ceiling> <crc32 of the text before it, hex>

The device id inside the file stops a counter file copied to another device's directory
from being used there; the CRC catches a corrupted file.

A missing, damaged or foreign file is fatal for that device, and the only fix offered is a
new key: a counter that goes back under the same PSK is a repeated ChaCha20-Poly1305 nonce.
Restoring a backup is *not* offered: a backup holds an older, lower ceiling.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from pacegate.errors import ConfigError
from pacegate.identity import validate_device_id
from pacegate.layout import write_secret
from pacegate.sealed import COUNTER_MAX

# Each PSK generation of a device starts its counters at generation x 2^40: above every
# counter an earlier key can have used (2^40 readings is 34,000 years at 1 Hz), so after a
# re-key the gateway's replay window sees a forward jump and the hospital's uniqueness on
# (device, counter) never mistakes a new reading for an old one.
GENERATION_STRIDE = 2**40
_MAGIC = "pacegate-counter"
_VERSION = "v1"


def render(device_id: str, ceiling: int) -> bytes:
    body = f"{_MAGIC} {_VERSION} {validate_device_id(device_id)} {ceiling}"
    return f"{body} {zlib.crc32(body.encode()):08x}\n".encode()


def first_ceiling(generation: int) -> int:
    """Where the counter file of a device's ``generation``-th PSK starts (0: enrolment)."""
    ceiling = generation * GENERATION_STRIDE
    if not 0 <= ceiling < COUNTER_MAX:
        raise ValueError(f"PSK generation {generation} leaves no counters; enroll a new device id")
    return ceiling


def rekey_fix(path: Path, device_id: str) -> str:
    """The one recovery: a new PSK and a fresh counter (never a restored or reset file)."""
    # path = <pki>/devices/<id>/counter.state
    pki_dir = path.parent.parent.parent
    return (
        f"re-key the device: 'pacegate pki rekey-device {device_id} --dir {pki_dir}' "
        "(a new PSK for the device and the gateway, and a fresh counter file); never restore "
        "an old copy or reset the counter under the same PSK"
    )


def write(path: Path, device_id: str, ceiling: int) -> None:
    """Durably replace the file (temp file, fsync, rename, fsync the directory), mode 0600."""
    if not 0 <= ceiling <= COUNTER_MAX:
        raise ValueError(f"counter ceiling {ceiling} is outside 0..2^64-1")
    write_secret(path, render(device_id, ceiling))


def read(path: Path, device_id: str) -> int:
    """The persisted ceiling; :class:`ConfigError` (naming the file and the re-key) otherwise."""
    fix = rekey_fix(path, device_id)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(
            path,
            "",
            "counter file not found: the device cannot know which counters it already used "
            "(it is written at enrolment)",
            fix=fix,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "ceiling", f"cannot read it: {exc}", fix=fix) from None
    parts = text.strip().split(" ")
    if len(parts) != 5 or parts[0] != _MAGIC:
        raise ConfigError(path, "ceiling", "not a pacegate counter file", fix=fix)
    magic, version, file_device, ceiling_text, crc_text = parts
    if version != _VERSION:
        raise ConfigError(
            path, "ceiling", f"counter file version {version!r} is not supported", fix=fix
        )
    body = f"{magic} {version} {file_device} {ceiling_text}"
    if f"{zlib.crc32(body.encode()):08x}" != crc_text:
        raise ConfigError(path, "ceiling", "checksum does not match (the file is damaged)", fix=fix)
    if file_device != device_id:
        raise ConfigError(
            path,
            "device_id",
            f"counter file belongs to {file_device!r}, not {device_id!r} "
            "(never copy one between devices)",
            fix=fix,
        )
    try:
        ceiling = int(ceiling_text)
    except ValueError:
        raise ConfigError(path, "ceiling", "ceiling is not a number", fix=fix) from None
    if not 0 <= ceiling <= COUNTER_MAX:
        raise ConfigError(path, "ceiling", f"ceiling {ceiling} is outside 0..2^64-1", fix=fix)
    return ceiling

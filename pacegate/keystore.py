"""The gateway's PSK store: every device's pre-shared key, encrypted at rest.

``pacegate pki enroll`` adds a key, ``pacegate pki revoke`` marks it revoked; the gateway
reads it (and reloads it when the file changes). The store file is AES-256-GCM under a
separate 32-byte key file (mode 0600), so a copy of the store alone (a backup, a disk image)
reveals no PSK. Format (v2)::

    b"PGKS" || version (1) = 2 || generation (8) || nonce (12)
            || AES-256-GCM(json, aad = b"PGKS" || version || generation)

Every save increments the *generation* and records it beside the store key, in
``psk.generation`` (one ASCII number, mode 0600). A store file whose authenticated
generation is below the recorded one is an older copy put back (it would re-activate a
revoked device or an old PSK) and is refused with the fix. The generation is in the AAD, so
it cannot be edited without the key. Writers save the store first, then the generation file:
a crash in between leaves a store *newer* than the record, which loads. A v1 store (no
generation) still loads while no generation file exists; its next save upgrades it.

    json = {"devices": {"<id>": {"psk": "<base64>", "status": "active"|"revoked",
                                   "enrolled_at": "...", "revoked_at": "..."|null}}}
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacegate.errors import ConfigError
from pacegate.identity import validate_device_id
from pacegate.layout import write_secret
from pacegate.sealed import PSK_SIZE
from pacegate.secretfile import read_secret

_MAGIC = b"PGKS"
_VERSION_1 = 1  # no generation: loads only while no generation file exists
_VERSION = 2
_NONCE = 12
_GENERATION_SIZE = 8
STORE_KEY_SIZE = 32

ACTIVE = "active"
REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceKey:
    device_id: str
    psk: bytes = field(repr=False)
    status: str
    enrolled_at: str
    revoked_at: str | None = None

    @property
    def revoked(self) -> bool:
        return self.status == REVOKED


class PskStore:
    """In-memory view of the store; :meth:`save` writes it back encrypted."""

    def __init__(
        self, path: Path, key_path: Path, devices: dict[str, DeviceKey], generation: int = 0
    ) -> None:
        self.path = path
        self.key_path = key_path
        self._devices = devices
        self.generation = generation  # of the file this view was loaded from (0: new)

    # -- reading -----------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, key_path: Path) -> PskStore:
        """A new empty store with a fresh store key (refuses to replace an existing key)."""
        if key_path.exists():
            raise ConfigError(
                key_path,
                "",
                "a PSK store key already exists",
                fix="load the existing store, or remove the PKI directory first",
            )
        write_secret(key_path, os.urandom(STORE_KEY_SIZE))
        store = cls(path, key_path, {})
        store.save()
        return store

    @classmethod
    def load(cls, path: Path, key_path: Path) -> PskStore:
        key = _read_key(key_path)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                path,
                "",
                "PSK store not found",
                fix="run 'pacegate pki init --dir DIR' and enroll devices",
            ) from None
        if len(blob) < len(_MAGIC) + 1 + _NONCE + 16 or not blob.startswith(_MAGIC):
            raise ConfigError(
                path,
                "",
                "not a pacegate PSK store (bad magic or truncated)",
                fix="restore it from backup, or re-create the PKI with 'pacegate pki init --force'",
            )
        version = blob[len(_MAGIC)]
        recorded = read_generation(key_path)
        if version == _VERSION_1:
            if recorded is not None:  # a store from before generations, put back
                raise _rolled_back(path, key_path, 0, recorded)
            generation, body_at = 0, len(_MAGIC) + 1
        elif version == _VERSION and len(blob) >= len(_MAGIC) + 1 + _GENERATION_SIZE + _NONCE + 16:
            at = len(_MAGIC) + 1
            generation = int.from_bytes(blob[at : at + _GENERATION_SIZE], "big")
            body_at = at + _GENERATION_SIZE
        else:
            raise ConfigError(
                path,
                "",
                f"PSK store version {version} is not supported (or the file is truncated)",
                fix="use the pacegate version that wrote it, or re-enroll the devices",
            )
        nonce = blob[body_at : body_at + _NONCE]
        try:
            plain = AESGCM(key).decrypt(nonce, blob[body_at + _NONCE :], blob[:body_at])
        except InvalidTag:
            raise ConfigError(
                path,
                "",
                "PSK store does not decrypt under its key file "
                f"{key_path} (tampered, or the wrong key file)",
            ) from None
        if version == _VERSION and recorded is None:
            raise ConfigError(
                generation_path(key_path),
                "",
                "the PSK store's generation file is missing, so an older store put back "
                "could not be told from the current one",
                fix="restore the generation file beside the store key; if it is lost, "
                "re-create the PKI ('pacegate pki init --force') and re-enroll the devices",
            )
        if recorded is not None and generation < recorded:
            raise _rolled_back(path, key_path, generation, recorded)
        devices = {}
        try:
            data = json.loads(plain)
            for did, entry in data["devices"].items():
                devices[did] = DeviceKey(
                    device_id=did,
                    psk=base64.b64decode(entry["psk"], validate=True),
                    status=entry["status"],
                    enrolled_at=entry["enrolled_at"],
                    revoked_at=entry.get("revoked_at"),
                )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                path,
                "devices",
                f"malformed entry ({type(exc).__name__}: {exc})",
                fix="restore the store from backup; it authenticated, so it was written badly",
            ) from None
        return cls(path, key_path, devices, generation)

    def get(self, device_id: str) -> DeviceKey | None:
        return self._devices.get(device_id)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def device_ids(self) -> list[str]:
        return sorted(self._devices)

    # -- changing ----------------------------------------------------------------------
    def add(self, device_id: str, psk: bytes) -> None:
        validate_device_id(device_id)
        if len(psk) != PSK_SIZE:
            raise ValueError(f"PSK must be {PSK_SIZE} bytes")
        if device_id in self._devices:
            raise ValueError(f"device {device_id!r} is already in the PSK store")
        self._devices[device_id] = DeviceKey(
            device_id, psk, ACTIVE, datetime.now(UTC).isoformat(timespec="seconds")
        )

    def rekey(self, device_id: str, psk: bytes) -> None:
        """Replace an active device's PSK (the old one is gone from the next saved file)."""
        if len(psk) != PSK_SIZE:
            raise ValueError(f"PSK must be {PSK_SIZE} bytes")
        old = self._devices.get(device_id)
        if old is None:
            raise KeyError(device_id)
        if old.revoked:
            raise ValueError(f"device {device_id!r} is revoked; enroll a new id instead")
        self._devices[device_id] = DeviceKey(device_id, psk, ACTIVE, old.enrolled_at)

    def revoke(self, device_id: str) -> None:
        old = self._devices.get(device_id)
        if old is None:
            raise KeyError(device_id)
        self._devices[device_id] = DeviceKey(
            device_id,
            old.psk,
            REVOKED,
            old.enrolled_at,
            datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def save(self) -> None:
        key = _read_key(self.key_path)
        data = {
            "devices": {
                d.device_id: {
                    "psk": base64.b64encode(d.psk).decode(),
                    "status": d.status,
                    "enrolled_at": d.enrolled_at,
                    "revoked_at": d.revoked_at,
                }
                for d in self._devices.values()
            }
        }
        # Above both this view's file and the record: another writer (or a crash between
        # the two writes) may have moved either.
        generation = max(self.generation, read_generation(self.key_path) or 0) + 1
        nonce = os.urandom(_NONCE)
        header = _MAGIC + bytes([_VERSION]) + generation.to_bytes(_GENERATION_SIZE, "big")
        blob = (
            header
            + nonce
            + AESGCM(key).encrypt(nonce, json.dumps(data, sort_keys=True).encode(), header)
        )
        write_secret(self.path, blob)
        write_secret(generation_path(self.key_path), f"{generation}\n".encode())
        self.generation = generation


def generation_path(key_path: Path) -> Path:
    """Where the store's generation is recorded: beside its key (``psk.generation``)."""
    return key_path.with_name(key_path.stem + ".generation")


def read_generation(key_path: Path) -> int | None:
    """The recorded generation, or None if no generation file exists (a v1-era store)."""
    path = generation_path(key_path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot read the PSK store generation: {exc}") from None
    if not text.isdigit() or len(text) > 20:
        raise ConfigError(
            path,
            "",
            f"not a generation number: {text[:40]!r}",
            fix="it holds one decimal number, the generation of the newest psk.store; "
            "restore it from the key's backup",
        )
    return int(text)


def _rolled_back(path: Path, key_path: Path, generation: int, recorded: int) -> ConfigError:
    return ConfigError(
        path,
        "generation",
        f"PSK store generation {generation} is older than generation {recorded} recorded in "
        f"{generation_path(key_path)}: an older copy of the store was put back (it could "
        "re-activate revoked devices or old PSKs)",
        fix="put the newest psk.store back; if it is lost, re-enroll or re-key the devices "
        "('pacegate pki rekey-device DEVICE_ID --dir DIR') after revoking those that must stay "
        "revoked",
    )


def _read_key(key_path: Path) -> bytes:
    key = read_secret(
        key_path, "PSK store key file", missing_fix="run 'pacegate pki init --dir DIR'"
    )
    if len(key) != STORE_KEY_SIZE:
        raise ConfigError(
            key_path,
            "",
            f"PSK store key must be {STORE_KEY_SIZE} bytes, found {len(key)}",
            fix="restore the key file from backup (without it the store cannot be read)",
        )
    return key

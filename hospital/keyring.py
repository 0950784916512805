"""The hospital's at-rest keyring: versioned Fernet keys plus one integrity key, in a JSON
file kept outside the database (mode 0600).

File format (``keyring.json``)::

    {"format": "pacegate-keyring", "format_version": 1,
     "mac_key": "<base64 32 bytes>",
     "fernet_keys": [{"version": 1, "key": "<Fernet key>", "created": "<ISO 8601>"}, ...]}

* The **newest** Fernet key (highest ``version``) encrypts; every listed key decrypts
  (:class:`~cryptography.fernet.MultiFernet`). ``pacegate hospital rotate-key`` appends a key,
  re-encrypts every row, then retires the older keys.
* ``mac_key`` never rotates with the Fernet keys: the row keys (HMAC of device id and
  counter, the idempotence key) and the hash chain are computed under keys derived from it,
  so re-encrypting rows leaves both unchanged and the chain verifiable across rotations.

A running service calls :meth:`Keyring.refresh` before it encrypts: when the file changed
(``rotate-key`` replaced it), it is reloaded, so rotation never needs ingest to stop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from pacegate.errors import ConfigError
from pacegate.layout import write_secret

FORMAT = "pacegate-keyring"
FORMAT_VERSION = 1
MAC_KEY_SIZE = 32
# Fernet tokens carry their creation time in clear. Every token is made "at" this fixed
# time, so a token does not reveal when a reading was stored (TTL is never used).
TOKEN_TIME = 0
# A keyring is a few hundred bytes per key; anything this large is not one.
MAX_KEYRING_BYTES = 1 << 20

_ROW_KEY_LABEL = b"pacegate/hospital/row-key/v1"
_CHAIN_KEY_LABEL = b"pacegate/hospital/chain/v1"

__all__ = ["InvalidToken", "KeyVersion", "Keyring"]


@dataclass(frozen=True)
class KeyVersion:
    version: int
    key: bytes = field(repr=False)  # the url-safe base64 Fernet key
    created: str


class Keyring:
    """Versioned Fernet keys and the integrity key, loaded from ``path``."""

    def __init__(self, path: Path, mac_key: bytes, keys: list[KeyVersion]) -> None:
        if len(mac_key) != MAC_KEY_SIZE:
            raise ValueError(f"mac_key must be {MAC_KEY_SIZE} bytes")
        if not keys:
            raise ValueError("a keyring needs at least one Fernet key")
        self.path = path
        self._mac_key = mac_key
        self._keys = sorted(keys, key=lambda k: k.version)
        self._stamp: tuple[int, int, int] | None = None
        self._rebuild()

    def _rebuild(self) -> None:
        newest_first = [Fernet(k.key) for k in reversed(self._keys)]
        self._multi = MultiFernet(newest_first)
        self._newest = newest_first[0]
        self._row_key = hmac.digest(self._mac_key, _ROW_KEY_LABEL, "sha256")
        self._chain_key = hmac.digest(self._mac_key, _CHAIN_KEY_LABEL, "sha256")

    # -- files ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path) -> Keyring:
        """A new keyring with one Fernet key and a fresh integrity key; refuses to overwrite."""
        if path.exists():
            raise ConfigError(
                path,
                "",
                "a keyring already exists here",
                fix="load it; never replace a keyring that still decrypts a database",
            )
        ring = cls(path, os.urandom(MAC_KEY_SIZE), [_new_key(1)])
        ring.save()
        return ring

    @classmethod
    def load(cls, path: Path) -> Keyring:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(
                path,
                "",
                "keyring file not found",
                fix="start 'pacegate hospital' once on an empty database to create it, "
                "or restore the keyring from its backup",
            ) from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                path,
                "",
                f"keyring is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o})",
                fix=f"chmod 600 {path}",
            )
        if st.st_size > MAX_KEYRING_BYTES:
            raise ConfigError(path, "", f"keyring is larger than {MAX_KEYRING_BYTES} bytes")
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(path, "", f"keyring is not valid JSON: {exc}") from None
        ring = cls(path, *_parse(path, data))
        ring._stamp = _stamp(st)
        return ring

    def save(self) -> None:
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mac_key": base64.b64encode(self._mac_key).decode(),
            "fernet_keys": [
                {"version": k.version, "key": k.key.decode(), "created": k.created}
                for k in self._keys
            ],
        }
        write_secret(self.path, json.dumps(data, indent=2).encode() + b"\n")
        self._stamp = _stamp(self.path.stat())

    def refresh(self) -> bool:
        """Reload the file if it changed since it was read; True when it did."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False  # mid-replace or removed: keep the keys we hold
        if _stamp(st) == self._stamp:
            return False
        fresh = Keyring.load(self.path)
        if fresh._mac_key != self._mac_key:
            raise ConfigError(
                self.path,
                "mac_key",
                "changed while the store is open: row keys and the hash chain depend on it",
                fix="restore the previous keyring; mac_key must never change",
            )
        self._keys = fresh._keys
        self._stamp = fresh._stamp
        self._rebuild()
        return True

    # -- keys ----------------------------------------------------------------------------
    @property
    def versions(self) -> list[int]:
        return [k.version for k in self._keys]

    @property
    def current_version(self) -> int:
        return self._keys[-1].version

    def add_key(self) -> int:
        """Append a new newest key (in memory; call :meth:`save`). Returns its version."""
        version = self.current_version + 1
        self._keys.append(_new_key(version))
        self._rebuild()
        return version

    def retire_older_than(self, version: int) -> list[int]:
        """Drop every key older than ``version`` (in memory; call :meth:`save`)."""
        retired = [k.version for k in self._keys if k.version < version]
        self._keys = [k for k in self._keys if k.version >= version]
        if not self._keys:
            raise ValueError("cannot retire every key")
        self._rebuild()
        return retired

    # -- the recipes the store uses -------------------------------------------------------
    def encrypt(self, plaintext: bytes) -> bytes:
        """A Fernet token under the newest key, stamped with :data:`TOKEN_TIME`."""
        return self._multi.encrypt_at_time(plaintext, TOKEN_TIME)

    def decrypt(self, token: bytes) -> bytes:
        """Plaintext of a token under any key held; raises :class:`InvalidToken`."""
        return self._multi.decrypt(token)

    def decrypts_under_newest(self, token: bytes) -> bool:
        """True when the newest key alone decrypts ``token`` (what rotation checks before it
        retires the older keys; a wrong key fails at the HMAC, before any decryption)."""
        try:
            self._newest.decrypt(token)
        except InvalidToken:
            return False
        return True

    def reencrypt(self, token: bytes) -> bytes:
        """The same plaintext under the newest key (raises :class:`InvalidToken`)."""
        return self._multi.rotate(token)

    def row_key(self, device_id: str, counter: int) -> bytes:
        """The idempotence key of a reading: unlinkable across devices without ``mac_key``."""
        return hmac.digest(
            self._row_key, device_id.encode() + b"\x00" + counter.to_bytes(8, "big"), "sha256"
        )

    def chain_link(self, prev: bytes, seq: int, row_key: bytes, plaintext: bytes) -> bytes:
        """``HMAC(chain_key, prev || seq || row_key || SHA-256(plaintext))``."""
        digest = hashlib.sha256(plaintext).digest()
        return hmac.digest(
            self._chain_key, prev + seq.to_bytes(8, "big") + row_key + digest, "sha256"
        )

    def head_mac(self, seq: int, chain: bytes) -> bytes:
        """Seals the chain head, so truncating the last rows cannot go unnoticed."""
        return hmac.digest(self._chain_key, b"head" + seq.to_bytes(8, "big") + chain, "sha256")

    def fingerprint(self) -> bytes:
        """Names the integrity key without revealing it: a database records the fingerprint
        of its keyring, so a store never opens (and writes) under somebody else's keyring."""
        return hmac.digest(self._chain_key, b"fingerprint", "sha256")[:16]


def _new_key(version: int) -> KeyVersion:
    return KeyVersion(
        version, Fernet.generate_key(), datetime.now(UTC).isoformat(timespec="seconds")
    )


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _parse(path: Path, data: Any) -> tuple[bytes, list[KeyVersion]]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(path, "format", f"is not a {FORMAT} file")
    if data.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            path,
            "format_version",
            f"{data.get('format_version')!r} is not supported",
            fix=f"use a keyring written by this pacegate (format_version {FORMAT_VERSION})",
        )
    try:
        mac_key = base64.b64decode(str(data.get("mac_key", "")), validate=True)
    except (binascii.Error, ValueError):
        mac_key = b""
    if len(mac_key) != MAC_KEY_SIZE:
        raise ConfigError(
            path, "mac_key", f"must be {MAC_KEY_SIZE} bytes of base64", fix="restore the keyring"
        )
    raw_keys = data.get("fernet_keys")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise ConfigError(path, "fernet_keys", "must be a non-empty list", fix="restore it")
    keys: list[KeyVersion] = []
    for i, entry in enumerate(raw_keys):
        where = f"fernet_keys[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(path, where, "must be an object")
        version = entry.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(path, f"{where}.version", "must be a positive integer")
        key = str(entry.get("key", "")).encode()
        try:
            Fernet(key)
        except ValueError:
            raise ConfigError(
                path, f"{where}.key", "is not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from None
        keys.append(KeyVersion(version, key, str(entry.get("created", ""))))
    if len({k.version for k in keys}) != len(keys):
        raise ConfigError(path, "fernet_keys", "two keys share a version", fix="restore it")
    return mac_key, keys

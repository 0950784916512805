"""The hospital's at-rest keyring: versioned Fernet keys plus versioned integrity keys, in
a JSON file kept outside the database (mode 0600).

File format (``keyring.json``, format_version 2)::

    {"format": "pacegate-keyring", "format_version": 2,
     "mac_keys": [{"version": 1, "key": "<base64 32 bytes>", "created": "<ISO 8601>"}, ...],
     "fernet_keys": [{"version": 1, "key": "<Fernet key>", "created": "<ISO 8601>"}, ...]}

A format_version 1 file (one unversioned ``mac_key``) is read as integrity key version 1
and written back in format 2 at the next save.

* The **newest** Fernet key (highest ``version``) encrypts; every listed key decrypts
  (:class:`~cryptography.fernet.MultiFernet`). ``pacegate hospital rotate-key`` appends a key,
  re-encrypts every row, then retires the older keys.
* An **integrity key** (``mac_keys``) derives the row keys (HMAC of device id and counter,
  the idempotence key) and the hash chain (:class:`ChainKeys`). Which version a database
  is under is written in its chain head; ``rotate-key --integrity`` re-keys every row under
  a new version in one transaction and then retires the older ones. Re-encrypting rows
  (Fernet rotation alone) leaves row keys and chain unchanged.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from pacegate.errors import ConfigError
from pacegate.filewatch import FileWatch
from pacegate.layout import write_secret
from pacegate.secretfile import read_secret_and_stat

FORMAT = "pacegate-keyring"
FORMAT_VERSION = 2
# format 1: a single unversioned "mac_key" (read as integrity key version 1)
READABLE_FORMAT_VERSIONS = (1, 2)
MAC_KEY_SIZE = 32
# Fernet tokens carry their creation time in clear. Every token is made "at" this fixed
# time, so a token does not reveal when a reading was stored (TTL is never used).
TOKEN_TIME = 0
# A keyring is a few hundred bytes per key; anything this large is not one.
MAX_KEYRING_BYTES = 1 << 20

_ROW_KEY_LABEL = b"pacegate/hospital/row-key/v1"
_CHAIN_KEY_LABEL = b"pacegate/hospital/chain/v1"

__all__ = ["ChainKeys", "InvalidToken", "KeyVersion", "Keyring"]


@dataclass(frozen=True)
class KeyVersion:
    version: int
    key: bytes = field(repr=False)  # the url-safe base64 Fernet key
    created: str


class ChainKeys:
    """What one integrity-key version derives: the row key (idempotence), the chain links,
    the MACs of the chain head (in the database) and of its anchor (outside it)."""

    __slots__ = ("_chain_key", "_row_key", "version")

    def __init__(self, version: int, mac_key: bytes) -> None:
        self.version = version
        self._row_key = hmac.digest(mac_key, _ROW_KEY_LABEL, "sha256")
        self._chain_key = hmac.digest(mac_key, _CHAIN_KEY_LABEL, "sha256")

    def row_key(self, device_id: str, counter: int) -> bytes:
        """The idempotence key of a reading: unlinkable across devices without the key."""
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
        """Seals the chain head, so truncating the last rows cannot go unnoticed. (The
        version is bound by the key itself: a head relabelled to another version fails.)"""
        return hmac.digest(self._chain_key, b"head" + seq.to_bytes(8, "big") + chain, "sha256")

    def anchor_mac(self, seq: int, chain: bytes) -> bytes:
        """Seals one record of the head anchor kept outside the database."""
        return hmac.digest(self._chain_key, b"anchor" + seq.to_bytes(8, "big") + chain, "sha256")

    def fingerprint(self) -> bytes:
        """Names the integrity key without revealing it: a database records the fingerprint
        of its integrity key, so a store never opens (and writes) under somebody else's
        keyring."""
        return hmac.digest(self._chain_key, b"fingerprint", "sha256")[:16]


class Keyring:
    """Versioned Fernet keys and versioned integrity keys, loaded from ``path``."""

    def __init__(self, path: Path, mac_keys: list[KeyVersion], keys: list[KeyVersion]) -> None:
        if not mac_keys:
            raise ValueError("a keyring needs at least one integrity key")
        if any(len(k.key) != MAC_KEY_SIZE for k in mac_keys):
            raise ValueError(f"an integrity key must be {MAC_KEY_SIZE} bytes")
        if not keys:
            raise ValueError("a keyring needs at least one Fernet key")
        self.path = path
        self._mac_keys = sorted(mac_keys, key=lambda k: k.version)
        self._keys = sorted(keys, key=lambda k: k.version)
        self._watch: FileWatch | None = None  # set once the file has been read or written
        self._rebuild()

    def _rebuild(self) -> None:
        newest_first = [Fernet(k.key) for k in reversed(self._keys)]
        self._multi = MultiFernet(newest_first)
        self._newest = newest_first[0]
        self._chain_keys = {k.version: ChainKeys(k.version, k.key) for k in self._mac_keys}

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
        ring = cls(path, [_new_mac_key(1)], [_new_key(1)])
        ring.save()
        return ring

    @classmethod
    def load(cls, path: Path) -> Keyring:
        # looked at before the file is read: a write in between is seen by the next refresh
        watch = FileWatch(path)
        raw, _st = read_secret_and_stat(
            path,
            "keyring file",
            missing_fix="start 'pacegate hospital' once on an empty database to create it, "
            "or restore the keyring from its backup",
            max_bytes=MAX_KEYRING_BYTES,
        )
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(path, "", f"keyring is not valid JSON: {exc}") from None
        ring = cls(path, *_parse(path, data))
        ring._watch = watch
        return ring

    def save(self) -> None:
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mac_keys": [
                {
                    "version": k.version,
                    "key": base64.b64encode(k.key).decode(),
                    "created": k.created,
                }
                for k in self._mac_keys
            ],
            "fernet_keys": [
                {"version": k.version, "key": k.key.decode(), "created": k.created}
                for k in self._keys
            ],
        }
        write_secret(self.path, json.dumps(data, indent=2).encode() + b"\n")
        if self._watch is None:
            self._watch = FileWatch(self.path)
        else:
            self._watch.reset()  # our own write is not a change to reload

    def refresh(self) -> bool:
        """Reload the file if it changed since it was read; True when it did."""
        if self._watch is None:  # built in memory, never read nor written: any file is new
            self._watch = FileWatch(self.path)
            if self._watch.stamp is None:
                return False
        elif not self._watch.changed():  # mid-replace or removed: keep the keys we hold
            return False
        try:
            fresh = Keyring.load(self.path)
            held = {k.version: k.key for k in self._mac_keys}
            for k in fresh._mac_keys:
                if held.get(k.version, k.key) != k.key:
                    raise ConfigError(
                        self.path,
                        f"mac_keys (version {k.version})",
                        "changed while the store is open: row keys and the hash chain depend on it",
                        fix="restore the previous keyring; an integrity key version never "
                        "changes (rotate with 'pacegate hospital rotate-key --integrity')",
                    )
        except ConfigError:
            self._watch.retry()  # refused again at every refresh until the file is fixed
            raise
        self._mac_keys = fresh._mac_keys
        self._keys = fresh._keys
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

    # -- integrity keys ------------------------------------------------------------------
    @property
    def mac_versions(self) -> list[int]:
        return [k.version for k in self._mac_keys]

    @property
    def current_mac_version(self) -> int:
        """The newest integrity key: what ``rotate-key --integrity`` re-keys a store under."""
        return self._mac_keys[-1].version

    def has_mac_version(self, version: int) -> bool:
        return version in self._chain_keys

    def integrity(self, version: int) -> ChainKeys:
        """The keys of integrity-key ``version``; a :class:`ConfigError` when not held."""
        keys = self._chain_keys.get(version)
        if keys is None:
            raise ConfigError(
                self.path,
                "mac_keys",
                f"holds no integrity key version {version} (it holds {self.mac_versions})",
                fix="use the keyring of this database; a database restored from before an "
                "integrity-key rotation needs the keyring of that time",
            )
        return keys

    def mac_version_of(self, fingerprint: bytes) -> int | None:
        """The integrity-key version whose fingerprint this is, if held."""
        for version, keys in self._chain_keys.items():
            if hmac.compare_digest(keys.fingerprint(), fingerprint):
                return version
        return None

    def add_mac_key(self) -> int:
        """Append a new newest integrity key (in memory; call :meth:`save`)."""
        version = self.current_mac_version + 1
        self._mac_keys.append(_new_mac_key(version))
        self._rebuild()
        return version

    def retire_mac_older_than(self, version: int) -> list[int]:
        """Drop every integrity key older than ``version`` (in memory; call :meth:`save`)."""
        retired = [k.version for k in self._mac_keys if k.version < version]
        kept = [k for k in self._mac_keys if k.version >= version]
        if not kept:
            raise ValueError("cannot retire every integrity key")
        self._mac_keys = kept
        self._rebuild()
        return retired


def _new_key(version: int) -> KeyVersion:
    return KeyVersion(
        version, Fernet.generate_key(), datetime.now(UTC).isoformat(timespec="seconds")
    )


def _new_mac_key(version: int) -> KeyVersion:
    return KeyVersion(
        version, os.urandom(MAC_KEY_SIZE), datetime.now(UTC).isoformat(timespec="seconds")
    )


def _parse(path: Path, data: Any) -> tuple[list[KeyVersion], list[KeyVersion]]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(path, "format", f"is not a {FORMAT} file")
    fmt = data.get("format_version")
    if fmt not in READABLE_FORMAT_VERSIONS:
        raise ConfigError(
            path,
            "format_version",
            f"{fmt!r} is not supported",
            fix=f"use a keyring written by this pacegate (format_version {FORMAT_VERSION})",
        )
    if fmt == 1:
        mac_keys = [KeyVersion(1, _mac_bytes(path, "mac_key", data.get("mac_key")), "")]
    else:
        mac_keys = _key_list(path, data, "mac_keys", lambda where, v: _mac_bytes(path, where, v))
    keys = _key_list(path, data, "fernet_keys", lambda where, v: _fernet_bytes(path, where, v))
    return mac_keys, keys


def _mac_bytes(path: Path, where: str, value: Any) -> bytes:
    try:
        key = base64.b64decode(str(value or ""), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != MAC_KEY_SIZE:
        raise ConfigError(
            path, where, f"must be {MAC_KEY_SIZE} bytes of base64", fix="restore the keyring"
        )
    return key


def _fernet_bytes(path: Path, where: str, value: Any) -> bytes:
    key = str(value or "").encode()
    try:
        Fernet(key)
    except ValueError:
        raise ConfigError(
            path, where, "is not a Fernet key (32 url-safe base64-encoded bytes)"
        ) from None
    return key


def _key_list(
    path: Path, data: dict[str, Any], name: str, parse_key: Callable[[str, Any], bytes]
) -> list[KeyVersion]:
    raw_keys = data.get(name)
    if not isinstance(raw_keys, list) or not raw_keys:
        raise ConfigError(path, name, "must be a non-empty list", fix="restore it")
    keys: list[KeyVersion] = []
    for i, entry in enumerate(raw_keys):
        where = f"{name}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(path, where, "must be an object")
        version = entry.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(path, f"{where}.version", "must be a positive integer")
        key = parse_key(f"{where}.key", entry.get("key"))
        keys.append(KeyVersion(version, key, str(entry.get("created", ""))))
    if len({k.version for k in keys}) != len(keys):
        raise ConfigError(path, name, "two keys share a version", fix="restore it")
    return keys

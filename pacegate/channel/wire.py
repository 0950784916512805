"""The channel's byte layouts (big-endian). This module owns them; nothing else parses them.

Frame (everything on the socket)::

    type (1) | length (4) | body (length)          length <= MAX_FRAME_BODY

    type 0x01 ClientHello (clear)   0x02 ServerHello (clear)   0x15 Alert (clear)
         0x17 Record (AES-256-GCM)

Alert body: reason (1), AlertReason; the server's answer to a ClientHello it refuses.

ClientHello body (signed by the client's pinned ML-DSA-65 key, so that a server can refuse
a hello that no pinned client wrote before it keeps state or spends a KEM)::

    n_versions (1) | version (2) * n | n_suites (1) | suite (2) * n | client_random (32)
    | time_ms (8) | client_name_len (1) | client_name | server_name_len (1) | server_name
    | x25519_len (2) | x25519_public | kem_len (2) | mlkem768_encapsulation_key
    | sig_len (2) | ML-DSA-65 signature over every byte before sig_len

ServerHello body::

    version (2) | suite (2) | server_random (32) | x25519_len (2) | x25519_public
    | kem_len (2) | mlkem768_ciphertext

Record body: AES-256-GCM(inner, aad = the 5-byte frame header); inner plaintext::

    content_type (1) | payload

    0x10 ClientAuth   name_len (1) | name | sig_len (2) | ML-DSA-65 signature
    0x11 ServerAuth   same layout
    0x20 AppFragment  data (more fragments of the same message follow)
    0x21 AppFinal     data (last fragment of a message)
    0x30 KeyUpdate    x25519_len (2) | x25519_public | kem_len (2) | encapsulation key
    0x31 KeyUpdateResponse  x25519_len (2) | x25519_public | kem_len (2) | ciphertext
    0x32 KeyUpdateDone (empty)
    0x33 KeyUpdateRequest (empty; the server asks the client to start a key update)
    0x40 Close        reason (1)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from pacegate.channel.errors import ChannelError

FRAME_HEADER = struct.Struct(">BI")
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 5
# A record carries at most 64 KiB of application data: big enough that per-record Python
# overhead vanishes next to AES-GCM for bulk data, small enough that a peer cannot make us
# buffer much before we can authenticate it. The signed ClientHello is ~4.6 KB, the
# ServerHello ~1.2 KB.
MAX_FRAGMENT_SIZE = 65536
MAX_FRAME_BODY = 1 + MAX_FRAGMENT_SIZE + 16
RANDOM_SIZE = 32
MAX_OFFERED = 8  # versions or suites a ClientHello may list


class FrameType(enum.IntEnum):
    CLIENT_HELLO = 0x01
    SERVER_HELLO = 0x02
    ALERT = 0x15
    RECORD = 0x17


class ContentType(enum.IntEnum):
    CLIENT_AUTH = 0x10
    SERVER_AUTH = 0x11
    APP_FRAGMENT = 0x20
    APP_FINAL = 0x21
    KEY_UPDATE = 0x30
    KEY_UPDATE_RESPONSE = 0x31
    KEY_UPDATE_DONE = 0x32
    KEY_UPDATE_REQUEST = 0x33
    CLOSE = 0x40


class AlertReason(enum.IntEnum):
    """Why a server refused a ClientHello (sent in clear, in place of the ServerHello)."""

    UNAUTHORIZED = 1  # unknown client, bad signature, or the hello names another server
    STALE_HELLO = 2  # the hello's time is too far from the server's clock, or a replay
    BUSY = 3  # this client started too many handshakes recently
    UNSUPPORTED = 4  # no common version or suite


class CloseReason(enum.IntEnum):
    NORMAL = 0
    UNAUTHORIZED = 1  # the server does not accept this client (unknown name, bad signature)
    PROTOCOL_ERROR = 2
    # the session reached a limit (maximum lifetime, or the client did not rekey when the
    # server asked); the client re-authenticates with a full handshake
    EXPIRED = 3


def frame(ftype: int, body: bytes) -> bytes:
    return FRAME_HEADER.pack(ftype, len(body)) + body


class Reader:
    """Cursor over a peer's bytes: every short or malformed read is a ChannelError."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise ChannelError(f"{self._what}: truncated", reason="malformed")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec8(self) -> bytes:
        return self.take(self.u8())

    def vec16(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self._pos != len(self._data):
            raise ChannelError(f"{self._what}: trailing bytes", reason="malformed")


def _vec16(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


@dataclass(frozen=True, slots=True)
class ClientHello:
    versions: tuple[int, ...]
    suites: tuple[int, ...]
    random: bytes
    time_ms: int  # the client's wall clock (Unix ms): a replay is refused once stale
    client_name: str
    server_name: str  # the server the client means: a relay to another server is refused
    x25519_public: bytes
    kem_public: bytes
    signature: bytes = b""

    def signed_part(self) -> bytes:
        """Every byte of the body before the signature: what the client signs."""
        return (
            bytes([len(self.versions)])
            + b"".join(struct.pack(">H", v) for v in self.versions)
            + bytes([len(self.suites)])
            + b"".join(struct.pack(">H", s) for s in self.suites)
            + self.random
            + struct.pack(">Q", self.time_ms)
            + PeerAuth.name_bytes(self.client_name)
            + PeerAuth.name_bytes(self.server_name)
            + _vec16(self.x25519_public)
            + _vec16(self.kem_public)
        )

    def encode(self) -> bytes:
        return self.signed_part() + _vec16(self.signature)

    @classmethod
    def decode(cls, body: bytes) -> ClientHello:
        r = Reader(body, "ClientHello")
        nv = r.u8()
        if not 1 <= nv <= MAX_OFFERED:
            raise ChannelError("ClientHello: bad version count", reason="malformed")
        versions = tuple(r.u16() for _ in range(nv))
        ns = r.u8()
        if not 1 <= ns <= MAX_OFFERED:
            raise ChannelError("ClientHello: bad suite count", reason="malformed")
        suites = tuple(r.u16() for _ in range(ns))
        random = r.take(RANDOM_SIZE)
        time_ms = int.from_bytes(r.take(8), "big")
        client_name = _ascii(r.vec8(), "ClientHello client name")
        server_name = _ascii(r.vec8(), "ClientHello server name")
        x = r.vec16()
        k = r.vec16()
        sig = r.vec16()
        r.end()
        return cls(versions, suites, random, time_ms, client_name, server_name, x, k, sig)


def _ascii(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise ChannelError(f"{what} is not ASCII", reason="malformed") from None


@dataclass(frozen=True, slots=True)
class ServerHello:
    version: int
    suite: int
    random: bytes
    x25519_public: bytes
    kem_ciphertext: bytes

    def encode(self) -> bytes:
        return (
            struct.pack(">HH", self.version, self.suite)
            + self.random
            + _vec16(self.x25519_public)
            + _vec16(self.kem_ciphertext)
        )

    @classmethod
    def decode(cls, body: bytes) -> ServerHello:
        r = Reader(body, "ServerHello")
        version, suite = r.u16(), r.u16()
        random = r.take(RANDOM_SIZE)
        x = r.vec16()
        ct = r.vec16()
        r.end()
        return cls(version, suite, random, x, ct)


@dataclass(frozen=True, slots=True)
class PeerAuth:
    """ClientAuth / ServerAuth payload. ``signed_prefix`` is what enters the transcript
    before the signature is computed (the name), so the signature covers the name."""

    name: str
    signature: bytes

    @staticmethod
    def name_bytes(name: str) -> bytes:
        raw = name.encode("ascii")
        return bytes([len(raw)]) + raw

    def encode(self) -> bytes:
        return self.name_bytes(self.name) + _vec16(self.signature)

    @classmethod
    def decode(cls, payload: bytes, what: str) -> PeerAuth:
        r = Reader(payload, what)
        name = _ascii(r.vec8(), f"{what} name")
        sig = r.vec16()
        r.end()
        return cls(name, sig)


@dataclass(frozen=True, slots=True)
class KeyShare:
    """KeyUpdate (public keys) and KeyUpdateResponse (public key + ciphertext)."""

    x25519: bytes
    kem: bytes

    def encode(self) -> bytes:
        return _vec16(self.x25519) + _vec16(self.kem)

    @classmethod
    def decode(cls, payload: bytes, what: str) -> KeyShare:
        r = Reader(payload, what)
        x = r.vec16()
        k = r.vec16()
        r.end()
        return cls(x, k)

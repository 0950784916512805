"""The channel's crypto recipes: hybrid KEM, HKDF key schedule, record protection, ML-DSA
transcript signatures. The session (``session.py``) calls these and never touches hazmat.

Key schedule (docs/channel.md has the full picture)::

    ss          = ss_mlkem (32) || ss_x25519 (32)
    th_hello    = SHA-256(ClientHello frame || ServerHello frame)       # versions, suite,
                                                                       # randoms, both X25519
                                                                       # keys, ek, ct
    hs_secret   = HKDF-Extract(salt = "pacegate-channel v2", ikm = ss || th_hello)
    c_hs, s_hs  = Expand(hs_secret, "c hs" / "s hs", th_hello)        # key 32 + iv 12
    master      = Expand(hs_secret, "master", th_full)                 # th_full adds both auths
    c_ap, s_ap  = Expand(master, "c ap" / "s ap", epoch)
    rekey:  master' = HKDF-Extract(salt = Expand(master, "rekey", th_ku), ikm = ss' || th_ku)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from pacegate.channel.errors import ChannelError
from pacegate.channel.kem import KemProvider

# The label names the protocol version, so keys of one version never serve another.
PROTOCOL_LABEL = b"pacegate-channel v2"
HASH_SIZE = 32
KEY_SIZE = 32  # AES-256
IV_SIZE = 12
TAG_SIZE = 16
X25519_KEY_SIZE = 32
# Records one AES-GCM key may protect. The nonce counter could go to 2^64, but AES-GCM's
# confidentiality bound degrades with the number of blocks encrypted: about (q * l)^2 / 2^128
# for q records of l 16-byte blocks. TLS 1.3 (RFC 8446 sec. 5.5) stops at 2^24.5 records
# of 16 KiB (2^10 blocks), keeping the advantage near 2^-57; our records are up to 64 KiB
# (2^12 blocks), four times bigger, so the same margin allows 2^22.5 records: 2^23 keeps
# the advantage below about 2^-58 (q * l = 2^35). The old 2^32 gave only about 2^-40.
# A session rekeys long before (every 65,536 records by default); this is the hard stop.
MAX_RECORDS_PER_KEY = 2**23

HELLO_SIGNATURE_CONTEXT = b"pacegate-channel v2 client hello"
CLIENT_SIGNATURE_CONTEXT = b"pacegate-channel v2 client auth"
SERVER_SIGNATURE_CONTEXT = b"pacegate-channel v2 server auth"


class Entropy:
    """Every random choice of a handshake or key update: randoms, X25519 private keys and
    ML-DSA signing (hedged, so randomised). Production uses this class as it is; a test
    vector passes a subclass with fixed values (the ML-KEM side goes through the
    :class:`~pacegate.channel.kem.KemProvider`, which is injectable too). There is no switch
    that makes production deterministic: the seam is a parameter, not a mode."""

    def random(self, n: int) -> bytes:
        return os.urandom(n)

    def x25519_private_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.generate()

    def sign(self, key: MLDSA65PrivateKey, context: bytes, message: bytes) -> bytes:
        return key.sign(message, context)


SYSTEM_ENTROPY = Entropy()


def transcript_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def expand(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """HKDF-Expand-Label: info = PROTOCOL_LABEL || " " || label || len(context) || context."""
    info = PROTOCOL_LABEL + b" " + label + struct.pack(">H", len(context)) + context
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


@dataclass(frozen=True, slots=True)
class TrafficKeys:
    key: bytes
    iv: bytes

    def __repr__(self) -> str:  # never print key material
        return "TrafficKeys(<redacted>)"


def traffic_keys(secret: bytes, label: bytes, context: bytes) -> TrafficKeys:
    return TrafficKeys(
        expand(secret, label + b" key", context, KEY_SIZE),
        expand(secret, label + b" iv", context, IV_SIZE),
    )


def handshake_secret(shared: bytes, th_hello: bytes) -> bytes:
    return hkdf_extract(PROTOCOL_LABEL, shared + th_hello)


def master_secret(hs_secret: bytes, th_full: bytes) -> bytes:
    return expand(hs_secret, b"master", th_full, HASH_SIZE)


def next_master_secret(master: bytes, shared: bytes, th_ku: bytes) -> bytes:
    """Both the old master (continuity, authentication) and the fresh hybrid secret
    (forward secrecy: the new keys do not follow from the old ones alone)."""
    return hkdf_extract(expand(master, b"rekey", th_ku, HASH_SIZE), shared + th_ku)


def application_keys(master: bytes, epoch: int) -> tuple[TrafficKeys, TrafficKeys]:
    ctx = struct.pack(">I", epoch)
    return traffic_keys(master, b"c ap", ctx), traffic_keys(master, b"s ap", ctx)


def handshake_keys(hs_secret: bytes, th_hello: bytes) -> tuple[TrafficKeys, TrafficKeys]:
    return traffic_keys(hs_secret, b"c hs", th_hello), traffic_keys(hs_secret, b"s hs", th_hello)


class RecordProtection:
    """One direction of AES-256-GCM with nonce = iv XOR sequence number (TLS 1.3 style).

    The sequence number is implicit: a replayed, dropped or reordered record is opened with
    the wrong nonce and fails authentication."""

    __slots__ = ("_aead", "_iv", "seq")

    def __init__(self, keys: TrafficKeys) -> None:
        self._aead = AESGCM(keys.key)
        self._iv = int.from_bytes(keys.iv, "big")
        self.seq = 0

    def _nonce(self) -> bytes:
        if self.seq >= MAX_RECORDS_PER_KEY:
            raise ChannelError("record limit for one key reached", reason="key_exhausted")
        return (self._iv ^ self.seq).to_bytes(IV_SIZE, "big")

    def seal(self, header: bytes, plaintext: bytes) -> bytes:
        out = self._aead.encrypt(self._nonce(), plaintext, header)
        self.seq += 1
        return out

    def open(self, header: bytes, ciphertext: bytes) -> bytes:
        try:
            out = self._aead.decrypt(self._nonce(), ciphertext, header)
        except InvalidTag:
            raise ChannelError(
                "record failed authentication (tampered, replayed, reordered or wrong key)",
                reason="bad_record",
            ) from None
        self.seq += 1
        return out


class HybridInitiator:
    """The side that sends public keys (client hello, key-update request)."""

    def __init__(self, kem: KemProvider, entropy: Entropy = SYSTEM_ENTROPY) -> None:
        self._kem = kem
        self._x = entropy.x25519_private_key()
        self._kem_sk, self.kem_public = kem.generate()
        self.x25519_public = self._x.public_key().public_bytes_raw()

    def finish(self, x25519_peer: bytes, kem_ciphertext: bytes) -> bytes:
        try:
            ss_kem = self._kem.decapsulate(self._kem_sk, kem_ciphertext)
            ss_x = _x25519(self._x, x25519_peer)
        except (ValueError, TypeError) as exc:
            raise ChannelError(f"bad key share: {exc}", reason="bad_key_share") from None
        finally:
            self._kem_sk = None
            self._x = None  # type: ignore[assignment]  # used once, then dropped
        return ss_kem + ss_x


def hybrid_respond(
    kem: KemProvider, x25519_peer: bytes, kem_public: bytes, entropy: Entropy = SYSTEM_ENTROPY
) -> tuple[bytes, bytes, bytes]:
    """(shared secret, our X25519 public key, ML-KEM ciphertext) for the initiator's keys."""
    try:
        ss_kem, ct = kem.encapsulate(kem_public)
        x = entropy.x25519_private_key()
        ss_x = _x25519(x, x25519_peer)
    except (ValueError, TypeError) as exc:
        raise ChannelError(f"bad key share: {exc}", reason="bad_key_share") from None
    return ss_kem + ss_x, x.public_key().public_bytes_raw(), ct


def _x25519(ours: X25519PrivateKey, peer: bytes) -> bytes:
    if len(peer) != X25519_KEY_SIZE:
        raise ValueError("X25519 public key must be 32 bytes")
    # cryptography refuses low-order points (all-zero shared secret) with ValueError
    return ours.exchange(X25519PublicKey.from_public_bytes(peer))


def sign_transcript(
    key: MLDSA65PrivateKey, context: bytes, th: bytes, entropy: Entropy = SYSTEM_ENTROPY
) -> bytes:
    return entropy.sign(key, context, th)


def verify_transcript(key: MLDSA65PublicKey, context: bytes, th: bytes, signature: bytes) -> bool:
    try:
        key.verify(signature, th, context)
    except (InvalidSignature, ValueError):
        return False
    return True


def public_key_fingerprint(key: Any) -> str:
    """Short SHA-256 fingerprint of an ML-DSA public key, for logs."""
    raw: bytes = key.public_bytes_raw()
    return hashlib.sha256(raw).hexdigest()[:16]

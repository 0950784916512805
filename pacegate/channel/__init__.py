"""The post-quantum channel between pacegate services (gateway -> hospital, hospital ->
cloud): hybrid ML-KEM-768 + X25519 key exchange, ML-DSA-65 mutual authentication with
pinned keys, AES-256-GCM records, rekeying by a fresh KEM exchange. Specification:
docs/channel.md. The protocol is a sans-IO core (:mod:`pacegate.channel.session`) with thin
asyncio adapters (:mod:`pacegate.channel.aio`).
"""

from pacegate.channel.aio import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_PENDING_HANDSHAKES,
    DEFAULT_MAX_PENDING_PER_SOURCE,
    DEFAULT_MAX_UNVERIFIED_CONNECTIONS,
    FIRST_FRAME_TIMEOUT,
    ChannelServerStats,
    ChannelStream,
    connect,
    serve,
)
from pacegate.channel.errors import ChannelClosed, ChannelError
from pacegate.channel.identity import (
    ChannelIdentity,
    ChannelPublicKey,
    load_identity,
    load_public_key,
    write_identity,
)
from pacegate.channel.session import (
    DEFAULT_REKEY_AFTER_RECORDS,
    DEFAULT_REKEY_AFTER_SECONDS,
    MAX_MESSAGE_SIZE,
    ChannelSession,
    SessionStats,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_PENDING_HANDSHAKES",
    "DEFAULT_MAX_PENDING_PER_SOURCE",
    "DEFAULT_MAX_UNVERIFIED_CONNECTIONS",
    "DEFAULT_REKEY_AFTER_RECORDS",
    "DEFAULT_REKEY_AFTER_SECONDS",
    "FIRST_FRAME_TIMEOUT",
    "MAX_MESSAGE_SIZE",
    "ChannelClosed",
    "ChannelError",
    "ChannelIdentity",
    "ChannelPublicKey",
    "ChannelServerStats",
    "ChannelSession",
    "ChannelStream",
    "SessionStats",
    "connect",
    "load_identity",
    "load_public_key",
    "serve",
    "write_identity",
]

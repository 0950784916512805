"""ML-DSA-65 identities of channel peers, and the loaders for the PKI's files.

``pacegate pki init`` writes ``PKI/channel/<name>.mldsa.key`` (PEM PKCS#8, mode 0600) and
``<name>.mldsa.pub`` (PEM SubjectPublicKeyInfo) for ``hospital``, ``gateway`` and ``cloud``
(:meth:`pacegate.layout.PkiLayout.channel_key` / ``channel_pub``). A server pins the public
keys of the clients it accepts; a client pins the name and key of the server it expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey

from pacegate.errors import ConfigError, LocalProtocolError
from pacegate.identity import IDENTITY_NAME_MAX_LEN, validate_identity_name
from pacegate.layout import write_public, write_secret
from pacegate.secretfile import read_secret

ChannelPublicKey = MLDSA65PublicKey
ChannelPrivateKey = MLDSA65PrivateKey

# Peer names travel in the handshake (1-byte length) and end up in logs and metrics labels:
# the identity-name rule of pacegate.identity, as for every other identity.
MAX_NAME_SIZE = IDENTITY_NAME_MAX_LEN


def validate_peer_name(name: str) -> str:
    try:
        return validate_identity_name(name, "channel peer name")
    except ValueError as exc:
        raise LocalProtocolError(str(exc)) from None


@dataclass(frozen=True)
class ChannelIdentity:
    """A peer's name and ML-DSA-65 signing key (the key never appears in repr or logs)."""

    name: str
    private_key: MLDSA65PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        validate_peer_name(self.name)
        if not isinstance(self.private_key, MLDSA65PrivateKey):
            raise LocalProtocolError(
                f"channel identity {self.name!r}: private_key must be an ML-DSA-65 private key"
            )

    @property
    def public_key(self) -> MLDSA65PublicKey:
        return self.private_key.public_key()

    @classmethod
    def generate(cls, name: str) -> ChannelIdentity:
        """A fresh identity (tests, and the PKI when it does not write files itself)."""
        return cls(name, MLDSA65PrivateKey.generate())

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        return public_key_pem(self.public_key)


def public_key_pem(key: MLDSA65PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_identity(identity: ChannelIdentity, key_path: Path, pub_path: Path) -> None:
    """Write ``identity`` as the PKI does: key PEM PKCS#8 mode 0600, public key PEM SPKI."""
    write_secret(key_path, identity.private_pem())
    write_public(pub_path, identity.public_pem())


_FIX_PKI = "run `pacegate pki init --dir DIR` to create the channel identities"


def _read(path: Path, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, key, "file not found", fix=_FIX_PKI) from None
    except OSError as exc:
        raise ConfigError(path, key, f"cannot read: {exc.strerror}", fix="check the path") from exc


def load_identity(key_path: str | Path, name: str) -> ChannelIdentity:
    """Load ``<name>.mldsa.key`` (PEM PKCS#8, unencrypted, not readable by group/others)."""
    path = Path(key_path)
    validate_peer_name(name)
    data = read_secret(path, "channel private key", key="channel private key", missing_fix=_FIX_PKI)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            path, "channel private key", f"not a PEM PKCS#8 private key ({exc})", fix=_FIX_PKI
        ) from None
    if not isinstance(key, MLDSA65PrivateKey):
        raise ConfigError(
            path,
            "channel private key",
            f"is a {type(key).__name__}, not an ML-DSA-65 key",
            fix=_FIX_PKI,
        )
    return ChannelIdentity(name, key)


def load_public_key(path: str | Path) -> MLDSA65PublicKey:
    """Load ``<name>.mldsa.pub`` (PEM SubjectPublicKeyInfo) to pin a peer."""
    p = Path(path)
    data = _read(p, "channel public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            p, "channel public key", f"not a PEM public key ({exc})", fix=_FIX_PKI
        ) from None
    if not isinstance(key, MLDSA65PublicKey):
        raise ConfigError(
            p, "channel public key", f"is a {type(key).__name__}, not ML-DSA-65", fix=_FIX_PKI
        )
    return key

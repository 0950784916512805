"""ML-KEM-768 providers: pyca ``cryptography`` (OpenSSL) by default, liboqs optionally.

Why the care with ``oqs``: liboqs-python (import name ``oqs``) tries to git-clone and build
liboqs when it cannot load the shared library *at import time*. pacegate therefore never
imports it unless :func:`liboqs_library` found the library first, in the places
liboqs-python itself searches (``$OQS_INSTALL_PATH/lib{,64}``, ``~/_oqs/lib{,64}``, then
the system loader via :func:`ctypes.util.find_library`).
"""

from __future__ import annotations

import abc
import ctypes.util
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey

from pacegate.errors import ConfigError

ML_KEM_768 = "ML-KEM-768"  # the FIPS 203 name; round-3 "Kyber768" does not interoperate
MLKEM768_PUBLIC_KEY_SIZE = 1184
MLKEM768_CIPHERTEXT_SIZE = 1088
MLKEM768_SHARED_SECRET_SIZE = 32

DEFAULT_PROVIDER = "cryptography"


class KemProvider(abc.ABC):
    """ML-KEM-768 as three calls. Bad peer input raises ``ValueError`` (the session turns it
    into a :class:`~pacegate.channel.errors.ChannelError`)."""

    name: str

    @abc.abstractmethod
    def generate(self) -> tuple[Any, bytes]:
        """A fresh key pair: (private key handle, encapsulation key bytes)."""

    @abc.abstractmethod
    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """(shared secret, ciphertext) for the peer's encapsulation key."""

    @abc.abstractmethod
    def decapsulate(self, private_key: Any, ciphertext: bytes) -> bytes:
        """The shared secret (FIPS 203 implicit rejection: a bad ciphertext gives a
        pseudo-random secret, which then fails the key confirmation)."""


class CryptographyKem(KemProvider):
    name = "cryptography"

    def generate(self) -> tuple[MLKEM768PrivateKey, bytes]:
        sk = MLKEM768PrivateKey.generate()
        return sk, sk.public_key().public_bytes_raw()

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        if len(public_key) != MLKEM768_PUBLIC_KEY_SIZE:
            raise ValueError(f"ML-KEM-768 public key must be {MLKEM768_PUBLIC_KEY_SIZE} bytes")
        shared, ct = MLKEM768PublicKey.from_public_bytes(public_key).encapsulate()
        return shared, ct

    def decapsulate(self, private_key: Any, ciphertext: bytes) -> bytes:
        if len(ciphertext) != MLKEM768_CIPHERTEXT_SIZE:
            raise ValueError(f"ML-KEM-768 ciphertext must be {MLKEM768_CIPHERTEXT_SIZE} bytes")
        if not isinstance(private_key, MLKEM768PrivateKey):
            raise TypeError("not a cryptography ML-KEM-768 private key")
        return private_key.decapsulate(ciphertext)


class OqsKem(KemProvider):
    """liboqs through liboqs-python; constructed only after :func:`liboqs_library` said yes."""

    name = "oqs"

    def __init__(self) -> None:
        import oqs

        self._oqs = oqs

    def generate(self) -> tuple[Any, bytes]:
        kem = self._oqs.KeyEncapsulation(ML_KEM_768)
        public = bytes(kem.generate_keypair())
        return kem, public

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        if len(public_key) != MLKEM768_PUBLIC_KEY_SIZE:
            raise ValueError(f"ML-KEM-768 public key must be {MLKEM768_PUBLIC_KEY_SIZE} bytes")
        with self._oqs.KeyEncapsulation(ML_KEM_768) as kem:
            ct, shared = kem.encap_secret(public_key)
        return bytes(shared), bytes(ct)

    def decapsulate(self, private_key: Any, ciphertext: bytes) -> bytes:
        if len(ciphertext) != MLKEM768_CIPHERTEXT_SIZE:
            raise ValueError(f"ML-KEM-768 ciphertext must be {MLKEM768_CIPHERTEXT_SIZE} bytes")
        try:
            return bytes(private_key.decap_secret(ciphertext))
        finally:
            private_key.free()


def liboqs_library() -> str | None:
    """Where liboqs-python would load liboqs from, or ``None``; never imports ``oqs``."""
    home = os.environ.get("OQS_INSTALL_PATH") or str(Path.home() / "_oqs")
    for sub in ("lib", "lib64"):
        d = Path(home) / sub
        if d.is_dir():
            for cand in sorted(d.glob("liboqs.so*")) + sorted(d.glob("liboqs*.dylib")):
                return str(cand)
    return ctypes.util.find_library("oqs")


def oqs_available() -> bool:
    """liboqs-python installed (the real binding, not the unrelated PyPI ``oqs``) and a
    liboqs shared library present: only then is ``import oqs`` safe."""
    if importlib.util.find_spec("oqs") is None:
        return False
    try:
        importlib.metadata.distribution("liboqs-python")
    except importlib.metadata.PackageNotFoundError:
        return False
    return liboqs_library() is not None


def select_kem_provider(name: str | KemProvider | None = None) -> KemProvider:
    """``None``/``"cryptography"``: OpenSSL through pyca; ``"oqs"``: liboqs, if present."""
    if isinstance(name, KemProvider):
        return name
    if name in (None, "cryptography"):
        return CryptographyKem()
    if name == "oqs":
        if not oqs_available():
            raise ConfigError(
                None,
                "kem_provider",
                "'oqs' needs liboqs-python and a liboqs shared library; none was found "
                "(pacegate never lets liboqs-python build one at import)",
                fix="install liboqs (set OQS_INSTALL_PATH) and `pip install pacegate[oqs]`, "
                "or use kem_provider 'cryptography'",
            )
        return OqsKem()
    raise ConfigError(
        None, "kem_provider", f"unknown provider {name!r}", fix="use 'cryptography' or 'oqs'"
    )

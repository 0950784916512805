"""A third implementation of the channel's post-quantum primitives: pqcrypto (a compiled
extension mirroring the Rust ``pqcrypto`` crates, which package PQClean's C code) must
interoperate with pyca's ML-KEM-768 and ML-DSA-65 (OpenSSL) in both directions, beside the
pure-Python kyber-py (tests/test_channel_kem.py) and dilithium-py (the handshake vector)."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey
from pqcrypto import InvalidSignatureError
from pqcrypto.kem import ml_kem_768
from pqcrypto.sign import ml_dsa_65

from pacegate.channel import keyschedule as ks
from pacegate.channel.kem import (
    MLKEM768_CIPHERTEXT_SIZE,
    MLKEM768_PUBLIC_KEY_SIZE,
    CryptographyKem,
)

MESSAGE = b"SHA-256 of a channel transcript, in the real protocol"


def test_pqcrypto_sizes_are_ml_kem_768_and_ml_dsa_65() -> None:
    assert ml_kem_768.PUBLIC_KEY_SIZE == MLKEM768_PUBLIC_KEY_SIZE
    assert ml_kem_768.CIPHERTEXT_SIZE == MLKEM768_CIPHERTEXT_SIZE
    assert ml_dsa_65.SIGNATURE_SIZE == 3309


def test_cryptography_encapsulates_and_pqcrypto_decapsulates() -> None:
    ek, dk = ml_kem_768.keygen()
    shared, ct = CryptographyKem().encapsulate(bytes(ek))
    assert bytes(ml_kem_768.decaps(dk, ct)) == shared


def test_pqcrypto_encapsulates_and_cryptography_decapsulates() -> None:
    kem = CryptographyKem()
    sk, ek = kem.generate()
    ct, shared = ml_kem_768.encaps(ek)
    assert kem.decapsulate(sk, bytes(ct)) == bytes(shared)


def test_a_tampered_ciphertext_decapsulates_to_another_secret_in_both() -> None:
    ek, dk = ml_kem_768.keygen()
    shared, ct = MLKEM768PublicKey.from_public_bytes(bytes(ek)).encapsulate()
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    assert bytes(ml_kem_768.decaps(dk, bad)) != shared  # FIPS 203 implicit rejection


def test_cryptography_signs_with_a_context_and_pqcrypto_verifies() -> None:
    key = MLDSA65PrivateKey.generate()
    context = ks.CLIENT_SIGNATURE_CONTEXT
    sig = ks.sign_transcript(key, context, MESSAGE)
    pk = key.public_key().public_bytes_raw()
    ml_dsa_65.verify(pk, MESSAGE, sig, context=context)  # raises if it does not verify
    with pytest.raises(InvalidSignatureError):
        ml_dsa_65.verify(pk, MESSAGE, sig, context=ks.SERVER_SIGNATURE_CONTEXT)
    with pytest.raises(InvalidSignatureError):
        ml_dsa_65.verify(pk, MESSAGE + b"!", sig, context=context)


def test_pqcrypto_signs_with_a_context_and_cryptography_verifies() -> None:
    pk, sk = ml_dsa_65.keygen()
    context = ks.HELLO_SIGNATURE_CONTEXT
    sig = bytes(ml_dsa_65.sign(sk, MESSAGE, context=context))
    public = MLDSA65PublicKey.from_public_bytes(bytes(pk))
    assert ks.verify_transcript(public, context, MESSAGE, sig)
    assert not ks.verify_transcript(public, ks.CLIENT_SIGNATURE_CONTEXT, MESSAGE, sig)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not ks.verify_transcript(public, context, MESSAGE, flipped)
    with pytest.raises(InvalidSignature):
        public.verify(flipped, MESSAGE, context)

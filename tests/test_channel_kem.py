"""ML-KEM-768: the default provider (pyca/OpenSSL) against an independent implementation
(kyber-py, pure Python) and against C2SP's published known-answer hash; the optional liboqs
provider is never imported unless a liboqs library is present."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from kyber_py.ml_kem import ML_KEM_768

from pacegate.channel.kem import (
    MLKEM768_CIPHERTEXT_SIZE,
    CryptographyKem,
    liboqs_library,
    oqs_available,
    select_kem_provider,
)
from pacegate.errors import ConfigError

# C2SP CCTV "accumulated" ML-KEM vectors (c2sp.org/CCTV/ML-KEM, final FIPS 203: k appended
# to d): 10,000 deterministic keygen/encaps/decaps runs, inputs drawn from SHAKE-128(""),
# outputs absorbed by a second SHAKE-128. Published hash for ML-KEM-768:
CCTV_768_10K = "f959d18d3d1180121433bf0e05f11e7908cf9d03edc150b2b07cb90bef5bc1c1"
# The same procedure stopped after 100 runs (kyber-py ~12 ms per run makes 10,000 too slow for
# the default suite). Derived with this file's code; trustworthy because the code, unchanged,
# reproduces CCTV_768_10K (run PACEGATE_FULL_KAT=1 pytest -k accumulated to re-check).
CCTV_768_100 = "8d65b902f28edc683cebee2872962fd165a4d197c9e24ec74caa4470270df0b7"


def accumulated_ml_kem_768(iterations: int) -> str:
    """C2SP's accumulated test; OpenSSL derives ek from the seed and does both decapsulations
    (honest and implicit rejection), kyber-py supplies the expanded dk and the deterministic
    encapsulation that pyca does not expose."""
    rng = hashlib.shake_128(b"")
    stream = rng.digest(iterations * (32 + 32 + 32 + MLKEM768_CIPHERTEXT_SIZE))
    acc = hashlib.shake_128()
    pos = 0

    def draw(n: int) -> bytes:
        nonlocal pos
        out = stream[pos : pos + n]
        pos += n
        return out

    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

    for _ in range(iterations):
        d, z, m, bad_ct = draw(32), draw(32), draw(32), draw(MLKEM768_CIPHERTEXT_SIZE)
        ek, dk = ML_KEM_768.key_derive(d + z)
        ossl = MLKEM768PrivateKey.from_seed_bytes(d + z)
        assert ossl.public_key().public_bytes_raw() == ek
        k, ct = ML_KEM_768._encaps_internal(ek, m)
        assert ossl.decapsulate(ct) == k
        k_reject = ossl.decapsulate(bad_ct)
        for value in (ek, dk, ct, k, k_reject):
            acc.update(value)
    return acc.hexdigest(32)


def test_accumulated_known_answer_first_100_runs() -> None:
    assert accumulated_ml_kem_768(100) == CCTV_768_100


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PACEGATE_FULL_KAT") != "1", reason="2-3 minutes; set PACEGATE_FULL_KAT=1"
)
def test_accumulated_known_answer_matches_c2sp_published_10000_runs() -> None:
    assert accumulated_ml_kem_768(10_000) == CCTV_768_10K


def test_cryptography_encapsulates_and_kyber_py_decapsulates() -> None:
    ek, dk = ML_KEM_768.keygen()
    shared, ct = CryptographyKem().encapsulate(ek)
    assert ML_KEM_768.decaps(dk, ct) == shared


def test_kyber_py_encapsulates_and_cryptography_decapsulates() -> None:
    kem = CryptographyKem()
    sk, ek = kem.generate()
    shared, ct = ML_KEM_768.encaps(ek)
    assert kem.decapsulate(sk, ct) == shared


def test_seeded_key_generation_agrees_between_implementations() -> None:
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

    seed = bytes(range(64))  # d || z
    ek, _ = ML_KEM_768.key_derive(seed)
    assert MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw() == ek


def test_tampered_ciphertext_gives_a_different_secret_implicit_rejection() -> None:
    kem = CryptographyKem()
    sk, ek = kem.generate()
    shared, ct = kem.encapsulate(ek)
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    assert kem.decapsulate(sk, bad) != shared


def test_malformed_public_key_or_ciphertext_is_a_value_error() -> None:
    kem = CryptographyKem()
    sk, _ = kem.generate()
    with pytest.raises(ValueError, match="public key must be 1184 bytes"):
        kem.encapsulate(bytes(100))
    # coefficients not reduced mod q (FIPS 203 check; the library words it as a length)
    with pytest.raises(ValueError, match="ML-KEM-768 public key"):
        kem.encapsulate(b"\xff" * 1184)
    with pytest.raises(ValueError, match="ciphertext must be 1088 bytes"):
        kem.decapsulate(sk, bytes(10))


def test_default_provider_is_cryptography() -> None:
    assert select_kem_provider(None).name == "cryptography"
    with pytest.raises(ConfigError, match="kem_provider"):
        select_kem_provider("kyber768")


@pytest.mark.skipif(oqs_available(), reason="liboqs is installed here")
def test_oqs_provider_without_liboqs_is_refused_without_importing_oqs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path / "nowhere"))
    sys.modules.pop("oqs", None)
    with pytest.raises(ConfigError) as info:
        select_kem_provider("oqs")
    assert "fix:" in str(info.value)
    assert "oqs" not in sys.modules  # its import would try to git-clone liboqs


def test_liboqs_is_found_where_liboqs_python_looks_without_importing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lib = tmp_path / "lib" / "liboqs.so.0.12.0"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path))
    assert liboqs_library() == str(lib)
    assert "oqs" not in sys.modules


@pytest.mark.skipif(not oqs_available(), reason="liboqs-python and liboqs not installed")
def test_oqs_provider_agrees_with_cryptography() -> None:
    oqs_kem, ossl = select_kem_provider("oqs"), CryptographyKem()
    sk, ek = oqs_kem.generate()
    shared, ct = ossl.encapsulate(ek)
    assert oqs_kem.decapsulate(sk, ct) == shared
    sk2, ek2 = ossl.generate()
    shared2, ct2 = oqs_kem.encapsulate(ek2)
    assert ossl.decapsulate(sk2, ct2) == shared2

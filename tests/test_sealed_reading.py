"""The sealed-reading formats v1 and v2: what a forger, a replayer or a broker can and cannot do."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from pacegate.errors import LocalProtocolError
from pacegate.reading import Reading
from pacegate.sealed import (
    SEALED_SIZE_V1,
    SEALED_SIZE_V2,
    SealedReadingError,
    epoch_key,
    new_epoch,
    open_reading,
    parse_header,
    seal_reading,
)

PSK = bytes(range(32))
READING = Reading(
    age=40,
    heart_rate_bpm=82,
    sensor_id=42,
    timestamp=datetime(2025, 10, 13, 12, 50, 39, 430262, tzinfo=UTC),
)


def test_sealed_reading_opens_with_the_devices_key() -> None:
    payload = seal_reading(PSK, "pm-0001", 7, READING)
    assert len(payload) == SEALED_SIZE_V1
    assert open_reading(PSK, "pm-0001", payload) == (7, READING)


def test_payload_does_not_contain_the_reading_in_clear() -> None:
    payload = seal_reading(PSK, "pm-0001", 7, READING)
    assert READING.to_bytes() not in payload


def test_payload_moved_to_another_devices_topic_fails_authentication() -> None:
    payload = seal_reading(PSK, "pm-0001", 7, READING)
    with pytest.raises(SealedReadingError) as err:
        open_reading(PSK, "pm-0002", payload)
    assert err.value.reason == "bad_tag"


def test_edited_counter_fails_authentication() -> None:
    payload = bytearray(seal_reading(PSK, "pm-0001", 7, READING))
    payload[8] ^= 1
    with pytest.raises(SealedReadingError) as err:
        open_reading(PSK, "pm-0001", bytes(payload))
    assert err.value.reason == "bad_tag"


@pytest.mark.parametrize("position", range(SEALED_SIZE_V1))
def test_any_bit_flip_is_refused(position: int) -> None:
    payload = bytearray(seal_reading(PSK, "pm-0001", 7, READING))
    payload[position] ^= 0x80
    with pytest.raises(SealedReadingError):
        open_reading(PSK, "pm-0001", bytes(payload))


def test_wrong_key_is_refused() -> None:
    payload = seal_reading(PSK, "pm-0001", 7, READING)
    with pytest.raises(SealedReadingError):
        open_reading(os.urandom(32), "pm-0001", payload)


def test_truncated_payload_is_malformed() -> None:
    payload = seal_reading(PSK, "pm-0001", 7, READING)
    with pytest.raises(SealedReadingError) as err:
        open_reading(PSK, "pm-0001", payload[:-1])
    assert err.value.reason == "malformed"


def test_unknown_version_is_refused_before_crypto() -> None:
    payload = b"\x03" + seal_reading(PSK, "pm-0001", 7, READING)[1:]
    with pytest.raises(SealedReadingError) as err:
        parse_header(payload)
    assert err.value.reason == "unsupported_version"


def test_oversized_payload_is_refused() -> None:
    with pytest.raises(SealedReadingError) as err:
        parse_header(b"\x01" * 10_000)
    assert err.value.reason == "oversized"


def _opens_or_refuses_as_sealed_reading_error(payload: bytes) -> None:
    """Peer garbage either opens or raises SealedReadingError, never another error."""
    with contextlib.suppress(SealedReadingError):
        open_reading(PSK, "pm-0001", payload)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_open_or_raise_the_one_remote_error(data: bytes) -> None:
    with contextlib.suppress(SealedReadingError):
        open_reading(PSK, "pm-0001", data)


@given(st.binary(min_size=1, max_size=60))
def test_arbitrary_bytes_fed_byte_by_byte_prefixes_never_raise_anything_else(data: bytes) -> None:
    for end in range(len(data) + 1):
        _opens_or_refuses_as_sealed_reading_error(data[:end])


@given(
    st.integers(min_value=1, max_value=2**64 - 1),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
)
def test_any_valid_reading_round_trips(counter: int, age: int, hr: int, sensor: int) -> None:
    r = Reading(age, hr, sensor, datetime(2026, 1, 1, tzinfo=UTC))
    assert open_reading(PSK, "dev", seal_reading(PSK, "dev", counter, r)) == (counter, r)


VECTORS = json.loads((Path(__file__).parent / "vectors" / "sealed_v1.json").read_text())


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["device_id"])
def test_sealing_matches_the_published_test_vectors(vector: dict[str, Any]) -> None:
    reading = Reading.from_json(vector["reading"])
    psk = bytes.fromhex(vector["psk"])
    assert reading.to_bytes().hex() == vector["reading_bytes"]
    sealed = seal_reading(psk, vector["device_id"], vector["counter"], reading)
    assert sealed.hex() == vector["sealed"]
    assert open_reading(psk, vector["device_id"], sealed) == (vector["counter"], reading)


# -- v2: the key is derived per boot epoch -------------------------------------------------
VECTORS_V2 = json.loads((Path(__file__).parent / "vectors" / "sealed_v2.json").read_text())
EPOCH = bytes.fromhex("0001020304050607")


def _hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with hmac, independent of the module under test."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


@pytest.mark.parametrize("vector", VECTORS_V2["vectors"], ids=lambda v: v["device_id"])
def test_v2_sealing_matches_the_published_vectors_and_an_independent_derivation(
    vector: dict[str, Any],
) -> None:
    reading = Reading.from_json(vector["reading"])
    psk, epoch = bytes.fromhex(vector["psk"]), bytes.fromhex(vector["epoch"])
    did = vector["device_id"].encode()
    key = _hkdf_sha256(b"pacegate/reading v2", psk, bytes([len(did)]) + did + epoch, 32)
    assert key.hex() == vector["key"]
    counter = vector["counter"].to_bytes(8, "big")
    nonce = b"\x02\x00\x00\x00" + counter
    aad = b"pacegate/reading\x02" + bytes([len(did)]) + did + epoch + counter
    assert (nonce.hex(), aad.hex()) == (vector["nonce"], vector["aad"])
    body = ChaCha20Poly1305(key).encrypt(nonce, reading.to_bytes(), aad)
    assert (b"\x02" + epoch + counter + body).hex() == vector["sealed"]
    sealed = seal_reading(psk, vector["device_id"], vector["counter"], reading, epoch=epoch)
    assert sealed.hex() == vector["sealed"]
    assert len(sealed) == SEALED_SIZE_V2
    assert open_reading(psk, vector["device_id"], sealed) == (vector["counter"], reading)


def test_v2_header_carries_the_epoch_and_the_counter() -> None:
    header = parse_header(seal_reading(PSK, "pm-0001", 9, READING, epoch=EPOCH))
    assert (header.version, header.epoch, header.counter) == (2, EPOCH, 9)


def test_v2_same_counter_in_two_epochs_is_sealed_under_two_keys() -> None:
    # what a rolled-back counter file produces: the nonce repeats, the key does not
    other = bytes.fromhex("0706050403020100")
    a = seal_reading(PSK, "pm-0001", 9, READING, epoch=EPOCH)
    b = seal_reading(PSK, "pm-0001", 9, READING, epoch=other)
    assert epoch_key(PSK, "pm-0001", EPOCH) != epoch_key(PSK, "pm-0001", other)
    assert a[17:] != b[17:]  # same plaintext, same nonce, different key: unrelated bytes
    assert open_reading(PSK, "pm-0001", a) == open_reading(PSK, "pm-0001", b) == (9, READING)


def test_v2_epoch_edited_in_transit_fails_authentication() -> None:
    payload = bytearray(seal_reading(PSK, "pm-0001", 9, READING, epoch=EPOCH))
    payload[3] ^= 0x01
    with pytest.raises(SealedReadingError) as err:
        open_reading(PSK, "pm-0001", bytes(payload))
    assert err.value.reason == "bad_tag"


def test_v2_key_is_bound_to_the_device_id() -> None:
    payload = seal_reading(PSK, "pm-0001", 9, READING, epoch=EPOCH)
    with pytest.raises(SealedReadingError) as err:
        open_reading(PSK, "pm-0002", payload)
    assert err.value.reason == "bad_tag"


def test_v2_wrong_epoch_size_is_refused_when_sealing() -> None:
    with pytest.raises(LocalProtocolError):
        seal_reading(PSK, "pm-0001", 9, READING, epoch=b"short")


def test_new_epochs_differ() -> None:
    assert len({new_epoch() for _ in range(64)}) == 64


@given(st.binary(min_size=0, max_size=60))
def test_arbitrary_v2_payloads_open_or_raise_the_one_remote_error(data: bytes) -> None:
    for payload in (b"\x02" + data, b"\x02" + bytes(16) + data[:31].ljust(31, b"\x00")):
        _opens_or_refuses_as_sealed_reading_error(payload)

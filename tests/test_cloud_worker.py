"""The cloud worker holds the public context only, computes blind, and refuses what it
must: a context with a secret key, a wrong context, tampered or incompatible ciphertexts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.worker import CloudSession, SessionState, WorkerStats
from pacegate import analytics_wire as wire
from pacegate import ckks
from tests.support import examples


@pytest.fixture(scope="module")
def context() -> ts.Context:
    return ckks.create_context()


@pytest.fixture(scope="module")
def public_bytes(context: ts.Context) -> bytes:
    return ckks.public_context_bytes(context)


def open_session(public_bytes: bytes, bands: int = 1) -> CloudSession:
    session = CloudSession()
    reply = wire.decode(session.handle(wire.encode(wire.Open(bands, public_bytes))))
    assert isinstance(reply, wire.Ready)
    return session


def refusal(reply: bytes) -> wire.Error:
    msg = wire.decode(reply)
    assert isinstance(msg, wire.Error), msg
    return msg


def test_worker_context_is_public_and_cannot_decrypt(
    context: ts.Context, public_bytes: bytes
) -> None:
    session = open_session(public_bytes)
    assert session.context is not None
    assert not session.context.is_private()
    assert not session.context.has_secret_key()
    vec = ckks.load_ciphertext(session.context, ckks.encrypt_vector(context, [72.0, 80.0]))
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    with pytest.raises(ValueError, match="private context"):
        ckks.decrypt_vector(session.context, vec.serialize())


def test_public_context_ships_no_galois_or_relin_keys(public_bytes: bytes) -> None:
    loaded = ts.context_from(public_bytes)
    assert not loaded.has_galois_keys()
    assert not loaded.has_relin_keys()
    assert len(public_bytes) < 1_000_000  # one channel record


def test_context_holding_a_secret_key_is_refused(context: ts.Context) -> None:
    stats = WorkerStats()
    session = CloudSession(stats=stats)
    secret = context.serialize(save_secret_key=True)
    err = refusal(session.handle(wire.encode(wire.Open(1, secret))))
    assert err.code == "secret_key_in_context"
    assert "secret key" in err.message
    assert session.context is None
    assert session.state is SessionState.FAILED
    assert stats.refused["secret_key_in_context"] == 1


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (
            lambda: ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60]),
            "wrong_parameters",
        ),
        (
            lambda: ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40]),
            "wrong_parameters",
        ),
        (lambda: ts.context(ts.SCHEME_TYPE.BFV, 8192, plain_modulus=1032193), "wrong_parameters"),
    ],
    ids=["other-moduli", "smaller-degree", "bfv"],
)
def test_wrong_context_is_refused(make: Callable[[], ts.Context], code: str) -> None:
    data = make().serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    err = refusal(CloudSession().handle(wire.encode(wire.Open(1, data))))
    assert err.code in {code, "bad_context"}
    assert "context" in err.message


def test_garbage_context_is_refused() -> None:
    err = refusal(CloudSession().handle(wire.encode(wire.Open(1, b"\x00" * 1000))))
    assert err.code == "bad_context"


def test_tampered_ciphertext_is_refused_by_its_digest(
    context: ts.Context, public_bytes: bytes
) -> None:
    session = open_session(public_bytes)
    msg = bytearray(wire.encode(wire.Ciphertext(0, 0, ckks.encrypt_vector(context, [70.0]))))
    msg[len(msg) // 2] ^= 0x01
    err = refusal(session.handle(bytes(msg)))
    assert err.code == "digest_mismatch"
    assert "tampered" in err.message
    assert session.state is SessionState.FAILED


def test_rehashed_garbage_ciphertext_is_refused_by_seal(
    context: ts.Context, public_bytes: bytes
) -> None:
    session = open_session(public_bytes)
    data = bytearray(ckks.encrypt_vector(context, [70.0]))
    data[10:60] = b"\xff" * 50  # header mangled, digest recomputed by the attacker
    err = refusal(session.handle(wire.encode(wire.Ciphertext(0, 0, bytes(data)))))
    assert err.code == "bad_ciphertext"


def test_ciphertext_under_other_parameters_is_refused(public_bytes: bytes) -> None:
    other = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    other.global_scale = 2**40
    data = ts.ckks_vector(other, [1.0] * 10).serialize()
    session = open_session(public_bytes)
    err = refusal(session.handle(wire.encode(wire.Ciphertext(0, 0, data))))
    assert err.code == "bad_ciphertext"


def test_product_ciphertext_is_refused_as_batch_input(
    context: ts.Context, public_bytes: bytes
) -> None:
    vec = ts.ckks_vector(context, np.arange(ckks.SLOTS, dtype=float))
    square = (vec * vec).serialize()  # size 3, scale 2**80: not a fresh input
    err = refusal(open_session(public_bytes).handle(wire.encode(wire.Ciphertext(0, 0, square))))
    assert err.code == "bad_ciphertext"


def test_out_of_order_lane_is_refused(context: ts.Context, public_bytes: bytes) -> None:
    session = open_session(public_bytes)
    data = ckks.encrypt_vector(context, [70.0])
    err = refusal(session.handle(wire.encode(wire.Ciphertext(0, 1, data))))
    assert err.code == "out_of_order"


def test_fetch_with_wrong_batch_count_is_refused(context: ts.Context, public_bytes: bytes) -> None:
    session = open_session(public_bytes, bands=1)
    for lane in range(wire.lanes(1)):
        ack = wire.decode(
            session.handle(
                wire.encode(wire.Ciphertext(0, lane, ckks.encrypt_vector(context, [1.0])))
            )
        )
        assert ack == wire.Ack(0, lane)
    err = refusal(session.handle(wire.encode(wire.Fetch(2, "hr"))))
    assert err.code == "batch_count_mismatch"


def test_worker_sums_blind_and_the_hospital_decrypts(
    context: ts.Context, public_bytes: bytes
) -> None:
    session = open_session(public_bytes, bands=1)
    rng = np.random.default_rng(1)
    hr = [rng.integers(40, 180, ckks.SLOTS).astype(float) for _ in range(2)]
    age = [rng.integers(18, 90, ckks.SLOTS).astype(float) for _ in range(2)]
    for b in range(2):
        lanes = [hr[b], age[b], np.zeros(ckks.SLOTS), np.ones(ckks.SLOTS)]
        for lane, values in enumerate(lanes):
            reply = session.handle(
                wire.encode(wire.Ciphertext(b, lane, ckks.encrypt_vector(context, values)))
            )
            assert wire.decode(reply) == wire.Ack(b, lane)
    result = wire.decode(session.handle(wire.encode(wire.Fetch(2, "age_hr"))))
    assert isinstance(result, wire.Result)
    assert result.batches == 2
    got = ckks.decrypt_vector(context, result.data, degree=2)
    want = hr[0] * age[0] + hr[1] * age[1]
    assert np.max(np.abs(got - want)) < 1e-2


def test_refused_session_does_not_stop_the_next_one(
    context: ts.Context, public_bytes: bytes
) -> None:
    stats = WorkerStats()
    bad = CloudSession(stats=stats)
    refusal(bad.handle(b"\x99garbage"))
    refusal(bad.handle(wire.encode(wire.Open(1, public_bytes))))  # stays failed
    good = CloudSession(stats=stats)
    assert isinstance(wire.decode(good.handle(wire.encode(wire.Open(1, public_bytes)))), wire.Ready)
    assert stats.refused["malformed"] == 1
    assert stats.sessions == 1


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=200))
def test_decode_parses_or_raises_analytics_protocol_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except wire.AnalyticsProtocolError:
        pass


@settings(max_examples=examples(200), deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=64), st.data())
def test_ciphertext_message_round_trips_and_truncation_is_refused(
    batch: int, lane: int, body: bytes, data: st.DataObject
) -> None:
    encoded = wire.encode(wire.Ciphertext(batch, lane, body))
    assert wire.decode(encoded) == wire.Ciphertext(batch, lane, body)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(wire.AnalyticsProtocolError):
        wire.decode(encoded[:cut])


def test_error_message_round_trips() -> None:
    msg = wire.Error("bad_context", "CKKS context contains a secret key")
    assert wire.decode(wire.encode(msg)) == msg


def test_a_result_asked_of_an_accumulator_the_plan_does_not_hold_is_a_protocol_error() -> None:
    from cloud.aggregator import serialized_accumulator

    ctx = ckks.create_context()
    held = {"sum_heart_rate": ts.ckks_vector(ctx, [1.0, 2.0])}
    assert serialized_accumulator(held, "sum_heart_rate")  # the control: a held name
    with pytest.raises(wire.AnalyticsProtocolError) as err:
        serialized_accumulator(held, "sum_of_something_else")
    assert err.value.reason == "unknown_accumulator"
    assert "sum_of_something_else" in str(err.value)

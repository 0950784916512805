"""The gateway's per-message decision: every attack on the payload is refused with its reason."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import Route, RouteLimits
from gateway.pipeline import Accepted, PipelineState, Rejected, process
from gateway.replay_store import ReplayStore
from pacegate.ingest import FLAG_IMPLAUSIBLE
from pacegate.keystore import ACTIVE, REVOKED, DeviceKey
from pacegate.reading import Reading
from pacegate.sealed import seal_reading
from tests.support import examples

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
PSK_A = bytes(range(32))
PSK_B = bytes(range(1, 33))


class Keys(dict[str, DeviceKey]):
    """Pure-logic stand-in for the PSK store's ``get`` (the store itself is tested with PKI)."""


def _route(**limits: float) -> Route:
    lim = RouteLimits(
        max_payload_bytes=int(limits.get("max_payload_bytes", 80)),
        max_rate_per_device=float(limits.get("rate", 0.0)),
        burst=int(limits.get("burst", 2)),
        max_clock_skew_s=86400.0,
    )
    topic = "pacemakers/+/telemetry"
    return Route("telemetry", topic, 1, "sealed-reading", 1, "hospital", 1, lim)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReplayStore]:
    s = ReplayStore(tmp_path / "replay.db")
    yield s
    s.close()


def _state(store: ReplayStore, route: Route | None = None) -> PipelineState:
    keys = Keys(
        {
            "pm-a": DeviceKey("pm-a", PSK_A, ACTIVE, "2026-01-01"),
            "pm-b": DeviceKey("pm-b", PSK_B, ACTIVE, "2026-01-01"),
            "pm-old": DeviceKey("pm-old", PSK_B, REVOKED, "2026-01-01", "2026-02-01"),
        }
    )
    return PipelineState(routes=[route or _route()], keys=keys, windows=store)


def _reading(hr: int = 72, ts: datetime = NOW) -> Reading:
    return Reading(age=70, heart_rate_bpm=hr, sensor_id=4242, timestamp=ts)


def _run(state: PipelineState, topic: str, payload: bytes, now: float = 0.0) -> Accepted | Rejected:
    return process(topic, payload, state, now=now, wall=NOW)


T_A = "pacemakers/pm-a/telemetry"


def test_sealed_reading_is_opened_and_ready_to_forward(store: ReplayStore) -> None:
    r = _run(_state(store), T_A, seal_reading(PSK_A, "pm-a", 1, _reading()))
    assert isinstance(r, Accepted)
    assert (r.item.device_id, r.item.counter, r.item.reading, r.item.flags) == (
        "pm-a",
        1,
        _reading(),
        0,
    )


def test_implausible_heart_rate_is_flagged_not_dropped(store: ReplayStore) -> None:
    r = _run(_state(store), T_A, seal_reading(PSK_A, "pm-a", 1, _reading(hr=400)))
    assert isinstance(r, Accepted)
    assert r.flagged
    assert r.item.flags == FLAG_IMPLAUSIBLE


def test_bit_flipped_payload_is_rejected_as_bad_tag(store: ReplayStore) -> None:
    sealed = bytearray(seal_reading(PSK_A, "pm-a", 1, _reading()))
    sealed[20] ^= 0x01
    r = _run(_state(store), T_A, bytes(sealed))
    assert isinstance(r, Rejected)
    assert r.reason == "bad_tag"


def test_flipped_counter_is_rejected_and_does_not_advance_the_window(store: ReplayStore) -> None:
    state = _state(store)
    sealed = bytearray(seal_reading(PSK_A, "pm-a", 5, _reading()))
    sealed[8] ^= 0x40  # counter 5 -> 69: tag fails, window must stay put
    r = _run(state, T_A, bytes(sealed))
    assert isinstance(r, Rejected)
    assert r.reason == "bad_tag"
    assert isinstance(_run(state, T_A, seal_reading(PSK_A, "pm-a", 5, _reading())), Accepted)


def test_truncated_payload_is_rejected_as_malformed(store: ReplayStore) -> None:
    sealed = seal_reading(PSK_A, "pm-a", 1, _reading())
    r = _run(_state(store), T_A, sealed[:-3])
    assert isinstance(r, Rejected)
    assert r.reason == "malformed"


def test_replayed_reading_is_dropped_as_replay(store: ReplayStore) -> None:
    state = _state(store)
    sealed = seal_reading(PSK_A, "pm-a", 7, _reading())
    assert isinstance(_run(state, T_A, sealed), Accepted)
    r = _run(state, T_A, sealed)
    assert isinstance(r, Rejected)
    assert r.reason == "replay"


def test_counter_behind_the_window_is_too_old(store: ReplayStore) -> None:
    state = _state(store)
    assert isinstance(_run(state, T_A, seal_reading(PSK_A, "pm-a", 1000, _reading())), Accepted)
    r = _run(state, T_A, seal_reading(PSK_A, "pm-a", 10, _reading()))
    assert isinstance(r, Rejected)
    assert r.reason == "too_old"


def test_payload_moved_to_another_devices_topic_is_rejected(store: ReplayStore) -> None:
    # even if both devices shared a key, the AAD binds the device id
    sealed = seal_reading(PSK_B, "pm-a", 1, _reading())
    r = _run(_state(store), "pacemakers/pm-b/telemetry", sealed)
    assert isinstance(r, Rejected)
    assert r.reason == "bad_tag"


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("pacemakers/pm-zz/telemetry", "unknown_device"),
        ("pacemakers/PM..A/telemetry", "unknown_device"),
        ("pacemakers/pm-old/telemetry", "revoked_device"),
        ("elsewhere/pm-a/telemetry", "no_route"),
        ("pacemakers/pm-a/telemetry/extra", "no_route"),
    ],
)
def test_unroutable_unknown_and_revoked_are_refused(
    store: ReplayStore, topic: str, reason: str
) -> None:
    r = _run(_state(store), topic, seal_reading(PSK_A, "pm-a", 1, _reading()))
    assert isinstance(r, Rejected)
    assert r.reason == reason


def test_oversized_payload_is_refused_before_parsing(store: ReplayStore) -> None:
    r = _run(_state(store, _route(max_payload_bytes=40)), T_A, b"\x01" * 41)
    assert isinstance(r, Rejected)
    assert r.reason == "oversized"


def test_version_other_than_the_routes_is_unsupported(store: ReplayStore) -> None:
    # a genuine v2 seal on a route for v1: refused before any crypto or window change
    sealed = seal_reading(PSK_A, "pm-a", 1, _reading(), epoch=bytes(8))
    r = _run(_state(store), T_A, sealed)
    assert isinstance(r, Rejected)
    assert r.reason == "unsupported_version"


def test_timestamp_far_in_the_future_is_out_of_range(store: ReplayStore) -> None:
    sealed = seal_reading(PSK_A, "pm-a", 1, _reading(ts=NOW + timedelta(days=30)))
    r = _run(_state(store), T_A, sealed)
    assert isinstance(r, Rejected)
    assert r.reason == "out_of_range"


def test_rate_limit_refuses_a_burst_beyond_the_bucket(store: ReplayStore) -> None:
    state = _state(store, _route(rate=1.0, burst=2))
    results = [
        _run(state, T_A, seal_reading(PSK_A, "pm-a", c, _reading()), now=0.0) for c in (1, 2, 3)
    ]
    assert [type(r).__name__ for r in results] == ["Accepted", "Accepted", "Rejected"]
    assert isinstance(results[2], Rejected)
    assert results[2].reason == "rate_limited"
    later = _run(state, T_A, seal_reading(PSK_A, "pm-a", 3, _reading()), now=1.0)
    assert isinstance(later, Accepted)


def test_forged_payloads_on_a_devices_topic_do_not_spend_its_rate_budget(
    store: ReplayStore,
) -> None:
    state = _state(store, _route(rate=1.0, burst=2))
    first = seal_reading(PSK_A, "pm-a", 1, _reading())
    assert isinstance(_run(state, T_A, first), Accepted)
    # at the same instant: forgeries under another key, bit flips, replays of the genuine one
    flipped = bytearray(seal_reading(PSK_A, "pm-a", 2, _reading()))
    flipped[-1] ^= 1
    attacks = [seal_reading(PSK_B, "pm-a", c, _reading()) for c in range(2, 40)]
    attacks += [bytes(flipped), first, first]
    refused = [_run(state, T_A, p) for p in attacks]
    assert {r.reason for r in refused if isinstance(r, Rejected)} == {"bad_tag", "replay"}
    assert not any(isinstance(r, Accepted) for r in refused)
    # the bucket (burst 2) still holds the token for the device's next genuine reading
    assert isinstance(_run(state, T_A, seal_reading(PSK_A, "pm-a", 2, _reading())), Accepted)
    over = _run(state, T_A, seal_reading(PSK_A, "pm-a", 3, _reading()))
    assert isinstance(over, Rejected)
    assert over.reason == "rate_limited"


def test_replay_state_survives_a_restart_once_durable(tmp_path: Path) -> None:
    s1 = ReplayStore(tmp_path / "replay.db")
    sealed = [seal_reading(PSK_A, "pm-a", c, _reading()) for c in (1, 2, 3)]
    state = _state(s1)
    for p in sealed:
        assert isinstance(_run(state, T_A, p), Accepted)
    s1.mark_durable([("pm-a", 1), ("pm-a", 2)])  # 3 was never handed on
    s1.close()
    s2 = ReplayStore(tmp_path / "replay.db")
    state2 = _state(s2)
    assert [getattr(_run(state2, T_A, p), "reason", "accepted") for p in sealed] == [
        "replay",
        "replay",
        "accepted",  # redelivered by the broker after the crash: must not be lost
    ]
    s2.close()


def test_replay_store_keeps_counters_above_two_to_the_63(tmp_path: Path) -> None:
    s1 = ReplayStore(tmp_path / "replay.db")
    big = 2**64 - 2
    s1.mark_durable([("pm-a", big), ("pm-a", big - 63)])
    s1.close()
    s2 = ReplayStore(tmp_path / "replay.db")
    w = s2.durable("pm-a")
    assert w is not None
    assert w.to_state() == (big, 1 | 1 << 63)
    s2.close()


@settings(max_examples=examples(300), deadline=None)
@given(payload=st.binary(max_size=120), topic_device=st.sampled_from(["pm-a", "pm-b", "x"]))
def test_arbitrary_bytes_are_accepted_only_if_sealed_and_never_raise(
    tmp_path_factory: pytest.TempPathFactory, payload: bytes, topic_device: str
) -> None:
    store = ReplayStore(tmp_path_factory.mktemp("h") / "replay.db")
    try:
        r = _run(_state(store), f"pacemakers/{topic_device}/telemetry", payload)
        assert isinstance(r, Rejected)
    finally:
        store.close()


def test_random_keys_never_open_a_reading(store: ReplayStore) -> None:
    state = _state(store)
    for c in range(1, 50):
        sealed = seal_reading(os.urandom(32), "pm-a", c, _reading())
        r = _run(state, T_A, sealed)
        assert isinstance(r, Rejected)
        assert r.reason == "bad_tag"

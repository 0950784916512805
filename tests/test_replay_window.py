"""RFC 8613-style replay window: duplicates and too-old counters are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacegate.replay import ReplayRejected, ReplayWindow


def test_replayed_counter_is_rejected() -> None:
    w = ReplayWindow()
    w.accept(5)
    with pytest.raises(ReplayRejected) as err:
        w.check(5)
    assert err.value.reason == "replay"


def test_reordered_counter_inside_window_is_accepted_once() -> None:
    w = ReplayWindow(size=8)
    w.accept(10)
    w.accept(7)
    with pytest.raises(ReplayRejected):
        w.accept(7)


def test_counter_older_than_window_is_rejected_as_too_old() -> None:
    w = ReplayWindow(size=8)
    w.accept(100)
    with pytest.raises(ReplayRejected) as err:
        w.check(92)
    assert err.value.reason == "too_old"
    w.check(93)


def test_state_round_trip_preserves_seen_counters() -> None:
    w = ReplayWindow()
    for c in (1, 2, 5, 9):
        w.accept(c)
    w2 = ReplayWindow.from_state(*w.to_state())
    for c in (1, 2, 5, 9):
        with pytest.raises(ReplayRejected):
            w2.check(c)
    w2.check(3)


@given(st.lists(st.integers(1, 200), max_size=100))
def test_no_counter_is_ever_accepted_twice(counters: list[int]) -> None:
    w = ReplayWindow(size=16)
    accepted: set[int] = set()
    for c in counters:
        try:
            w.accept(c)
        except ReplayRejected:
            continue
        assert c not in accepted
        accepted.add(c)

"""The one admission policy of the channel and the broker (pacegate.admission), pure logic."""

from __future__ import annotations

import pytest

from pacegate.admission import (
    AdmissionPolicy,
    Admitted,
    Limit,
    Refused,
    Ticket,
    WhenFull,
    source_key,
)

EVICT, REFUSE = WhenFull.EVICT_OLDEST, WhenFull.REFUSE


def _admit(policy: AdmissionPolicy[str], source: str, item: str) -> Admitted[str]:
    decision = policy.admit(source, item)
    if not isinstance(decision, Admitted):
        raise AssertionError(f"{item} refused at {decision.limit.reason}")
    return decision


def test_a_full_source_loses_its_own_oldest_pending_connection_not_anothers() -> None:
    policy: AdmissionPolicy[str] = AdmissionPolicy(per_source=Limit(2, EVICT, "per_source"))
    _admit(policy, "10.0.0.9", "other")
    first = _admit(policy, "10.0.0.1", "a1").ticket
    _admit(policy, "10.0.0.1", "a2")
    third = _admit(policy, "10.0.0.1", "a3")
    assert [e.ticket.item for e in third.evicted] == ["a1"]
    assert third.evicted[0].limit.reason == "per_source"
    assert first.evicted
    assert first.released
    assert policy.pending_by_source() == {"10.0.0.9": 1, "10.0.0.1": 2}


def test_a_full_listener_evicts_the_oldest_pending_of_anyone_and_spares_settled_ones() -> None:
    policy: AdmissionPolicy[str] = AdmissionPolicy(total=Limit(3, EVICT, "total"))
    settled = _admit(policy, "10.0.0.1", "session").ticket
    policy.settle(settled)
    _admit(policy, "10.0.0.2", "old")
    _admit(policy, "10.0.0.3", "young")
    newcomer = _admit(policy, "10.0.0.4", "new")
    assert [e.ticket.item for e in newcomer.evicted] == ["old"]
    assert len(policy) == 3
    assert policy.pending == 2
    assert not settled.released


def test_a_listener_full_of_settled_connections_refuses_the_newcomer() -> None:
    policy: AdmissionPolicy[str] = AdmissionPolicy(total=Limit(2, EVICT, "max_connections"))
    for item in ("s1", "s2"):
        policy.settle(_admit(policy, "10.0.0.1", item).ticket)
    decision = policy.admit("10.0.0.2", "new")
    assert isinstance(decision, Refused)
    assert decision.limit.reason == "max_connections"
    assert len(policy) == 2


def test_refusing_limits_refuse_the_newcomer_and_keep_the_waiting_ones() -> None:
    policy: AdmissionPolicy[str] = AdmissionPolicy(
        per_source=Limit(1, REFUSE, "source_limit"), total=Limit(2, REFUSE, "limit")
    )
    _admit(policy, "10.0.0.1", "a")
    by_source = policy.admit("10.0.0.1", "a2")
    assert isinstance(by_source, Refused)
    assert by_source.limit.reason == "source_limit"
    _admit(policy, "10.0.0.2", "b")
    overall = policy.admit("10.0.0.3", "c")
    assert isinstance(overall, Refused)
    assert overall.limit.reason == "limit"
    assert policy.pending_by_source() == {"10.0.0.1": 1, "10.0.0.2": 1}


def test_a_per_source_eviction_frees_the_slot_the_newcomer_takes_in_the_total() -> None:
    policy: AdmissionPolicy[str] = AdmissionPolicy(
        per_source=Limit(2, EVICT, "per_source"), total=Limit(2, EVICT, "total")
    )
    _admit(policy, "10.0.0.1", "a1")
    _admit(policy, "10.0.0.1", "a2")
    third = _admit(policy, "10.0.0.1", "a3")
    assert [(e.ticket.item, e.limit.reason) for e in third.evicted] == [("a1", "per_source")]
    assert len(policy) == 2


def test_release_is_idempotent_and_an_evicted_ticket_is_already_released() -> None:
    policy: AdmissionPolicy[str] = AdmissionPolicy(total=Limit(1, EVICT, "total"))
    old = _admit(policy, "10.0.0.1", "old").ticket
    new = _admit(policy, "10.0.0.1", "new").ticket
    policy.release(old)  # its task's cleanup runs after the eviction: no double count
    policy.release(new)
    policy.release(new)
    policy.settle(new)
    assert len(policy) == 0
    assert policy.pending == 0
    assert policy.pending_by_source() == {}


def test_a_settled_connection_no_longer_counts_against_its_source() -> None:
    policy: AdmissionPolicy[str] = AdmissionPolicy(per_source=Limit(1, EVICT, "per_source"))
    ticket: Ticket[str] = _admit(policy, "10.0.0.1", "session").ticket
    policy.settle(ticket)
    assert not _admit(policy, "10.0.0.1", "next").evicted
    assert len(policy) == 2
    assert policy.pending_from("10.0.0.1") == 1


def test_a_limit_below_one_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        Limit(0, EVICT, "max_connections")


def test_an_ipv6_64_is_one_source_and_a_mapped_ipv4_is_its_address() -> None:
    policy: AdmissionPolicy[str] = AdmissionPolicy(per_source=Limit(1, REFUSE, "per_source"))
    _admit(policy, source_key("2001:db8:1:2:aaaa::1"), "a")
    assert isinstance(policy.admit(source_key("2001:db8:1:2:bbbb::9%eth0"), "b"), Refused)
    _admit(policy, source_key("2001:db8:1:3::1"), "c")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("not-an-ip") == "not-an-ip"


class _Writer:
    """Stands in for a StreamWriter in the pure bookkeeping below: records close()."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_channel_pools_evict_unverified_refuse_verified_and_mirror_the_stats() -> None:
    from typing import Any, cast

    from pacegate.channel.aio import ChannelServerStats, _Pending, _PendingHandshakes

    stats = ChannelServerStats()
    pools = _PendingHandshakes(
        stats,
        unverified=Limit(2, EVICT, "handshake_evicted"),
        verified_per_source=Limit(1, REFUSE, "handshake_source_limit"),
        verified=Limit(2, REFUSE, "handshake_limit"),
    )
    writers = [_Writer() for _ in range(4)]
    conns = [_Pending(f"10.0.0.1:{1000 + i}", cast(Any, w)) for i, w in enumerate(writers)]
    assert pools.add("10.0.0.1", conns[0]) == []
    assert pools.add("10.0.0.1", conns[1]) == []
    assert pools.add("10.0.0.2", conns[2]) == [conns[0]]  # the oldest unverified, closed
    assert writers[0].closed
    assert conns[0].evicted
    # a hello verified on the connection just evicted spends no KEM
    assert pools.verify(conns[0]) == "handshake_evicted"
    assert pools.verify(conns[1]) is None
    assert stats.unverified_connections == 1
    assert stats.pending_handshakes == 2
    assert pools.add("10.0.0.1", conns[3]) == []  # verified ones are not in the evicting pool
    assert pools.verify(conns[3]) == "handshake_source_limit"  # one per source past the hello
    assert stats.pending_by_source == {"10.0.0.1": 2, "10.0.0.2": 1}
    for conn in conns:
        pools.remove(conn)
    assert (stats.pending_handshakes, stats.unverified_connections) == (0, 0)
    assert stats.pending_by_source == {}

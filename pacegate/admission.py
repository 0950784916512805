"""How many unauthenticated connections a listener lets wait, per source and in all, and
whom it evicts to make room: one sans-IO policy, used by the post-quantum channel's
``serve()`` and by the embedded MQTT broker, each with its own limits.

Why one policy: both listeners accept TCP connections from anyone, and a connection that
has not yet proved who it is costs a socket, buffers and (for the channel past a verified
hello) a KEM. An attacker who can open sockets faster than the handshakes finish must not be
able to hold every slot (a flood) nor let one host starve the others (a per-source cap), and
when a slot must be freed the victim is the *oldest* waiting connection: a genuine client
finishes its handshake a moment after its accept, so a flood has to outpace that moment to
evict it (issue 9).

The policy holds :class:`Ticket` objects, oldest first. A ticket is *pending* from
:meth:`AdmissionPolicy.admit` until :meth:`AdmissionPolicy.settle` (the connection proved
itself: it still counts against the total, but is no longer evictable nor counted against
its source) or :meth:`AdmissionPolicy.release` (the connection is gone). The caller does the
I/O: it closes the connections of the tickets it is told were evicted, and logs and counts
every eviction and refusal under its own reason names.

A *source* is an IPv4 address, or an IPv6 /64 (:func:`source_key`).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def source_key(host: str) -> str:
    """The unit of a per-source cap for a peer address (zone ids ignored).

    One host usually holds a whole IPv6 /64, so counting single IPv6 addresses would cap
    nothing; an IPv4-mapped IPv6 address is its IPv4 address. A host that is not an IP
    address (a test double, a Unix socket) is its own source."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class WhenFull(enum.Enum):
    """What a newcomer gets when a limit is reached."""

    # close the oldest pending connection (of that source, or of anyone) to admit it:
    # the right answer when a pending connection has cost nothing but a socket
    EVICT_OLDEST = "evict_oldest"
    # refuse the newcomer: the right answer when the waiting ones hold costly state that
    # only a pinned client could make the server spend (evicting would let it churn)
    REFUSE = "refuse"


@dataclass(frozen=True)
class Limit:
    """One cap: how many, what happens at it, and the reason name logged and counted."""

    count: int
    when_full: WhenFull
    reason: str

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(
                f"admission limit {self.reason!r} must be at least 1, got {self.count!r}"
            )


class Ticket(Generic[T]):
    """One admitted connection; ``item`` is the caller's handle on it (to close it)."""

    __slots__ = ("evicted", "item", "pending", "released", "source")

    def __init__(self, source: str, item: T) -> None:
        self.source = source
        self.item = item
        self.pending = True  # not yet settled: evictable, counted against its source
        self.released = False  # released or evicted: no longer counted at all
        self.evicted = False  # released by the policy to make room for a newer connection


@dataclass(frozen=True)
class Eviction(Generic[T]):
    """A ticket released to make room: the caller closes ``ticket.item`` and logs it."""

    ticket: Ticket[T]
    limit: Limit


@dataclass(frozen=True)
class Admitted(Generic[T]):
    ticket: Ticket[T]
    evicted: tuple[Eviction[T], ...] = ()


@dataclass(frozen=True)
class Refused:
    """The newcomer is refused at ``limit`` (nothing was evicted for it)."""

    limit: Limit


class AdmissionPolicy(Generic[T]):
    """Tickets oldest first, overall and by source.

    ``total`` caps every ticket not yet released (pending or settled); ``per_source`` caps
    the pending tickets of one source. The per-source cap is applied first: evicting there
    also frees a slot of the total, so a newcomer is never charged twice."""

    def __init__(self, *, total: Limit | None = None, per_source: Limit | None = None) -> None:
        self.total = total
        self.per_source = per_source
        self._all: dict[Ticket[T], None] = {}  # insertion-ordered: oldest first
        self._pending: dict[Ticket[T], None] = {}
        self._pending_by_source: dict[str, dict[Ticket[T], None]] = {}

    def __len__(self) -> int:
        """Tickets not yet released (pending or settled)."""
        return len(self._all)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_from(self, source: str) -> int:
        return len(self._pending_by_source.get(source, ()))

    def pending_by_source(self) -> dict[str, int]:
        """Pending tickets by source; sources with none are absent."""
        return {source: len(group) for source, group in self._pending_by_source.items()}

    def admit(self, source: str, item: T) -> Admitted[T] | Refused:
        """Admit a newcomer from ``source``, evicting for it where a limit says so."""
        evicted: list[Eviction[T]] = []
        cap = self.per_source
        if cap is not None and self.pending_from(source) >= cap.count:
            if cap.when_full is WhenFull.REFUSE:
                return Refused(cap)
            victim = next(iter(self._pending_by_source[source]))
            evicted.append(self._evict(victim, cap))
        cap = self.total
        if cap is not None and len(self._all) >= cap.count:
            victim_or_none = next(iter(self._pending), None)
            if cap.when_full is WhenFull.REFUSE or victim_or_none is None:
                # only reachable without a per-source eviction: that one freed a slot
                return Refused(cap)
            evicted.append(self._evict(victim_or_none, cap))
        ticket = Ticket(source, item)
        self._all[ticket] = None
        self._pending[ticket] = None
        self._pending_by_source.setdefault(source, {})[ticket] = None
        return Admitted(ticket, tuple(evicted))

    def settle(self, ticket: Ticket[T]) -> None:
        """The connection proved itself: still counted in the total, never evicted."""
        if ticket.released or not ticket.pending:
            return
        ticket.pending = False
        self._unpend(ticket)

    def release(self, ticket: Ticket[T]) -> None:
        """The connection is gone (idempotent: an evicted ticket is already released)."""
        if ticket.released:
            return
        ticket.released = True
        del self._all[ticket]
        if ticket.pending:
            self._unpend(ticket)

    def _evict(self, ticket: Ticket[T], limit: Limit) -> Eviction[T]:
        self.release(ticket)
        ticket.evicted = True
        return Eviction(ticket, limit)

    def _unpend(self, ticket: Ticket[T]) -> None:
        del self._pending[ticket]
        group = self._pending_by_source[ticket.source]
        del group[ticket]
        if not group:
            del self._pending_by_source[ticket.source]

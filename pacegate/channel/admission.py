"""Which signed ClientHellos a server admits: fresh, never seen before, not too many per
client. Pure logic with the time passed in; one :class:`HelloReplayCache` is shared by all
the sessions of one server (``serve()`` makes it).

Why this exists: the ClientHello is signed by the client's pinned ML-DSA key, so a server
refuses a hello that no pinned client wrote *before* it spends a KEM or keeps any state
(docs/channel.md, "Admission"). But a hello travels in clear: an eavesdropper could replay a
genuine one to hold a handshake slot until the timeout. The hello carries the client's
wall-clock time, so it is only accepted within ``max_skew`` of the server's clock, and the
cache remembers every admitted hello until it is stale; a replay is refused at once.
"""

from __future__ import annotations

from typing import Final

# How far a hello's timestamp may be from the server's wall clock, either way. pacegate's
# hosts run NTP and agree to well under a second; a minute tolerates a badly kept clock
# while bounding how long a hello could be replayed (and so how long the cache holds it).
HELLO_MAX_SKEW_SECONDS: Final = 60.0
# Admitted hellos one pinned client may have in the cache (that is, handshakes it started
# within the last 2 * HELLO_MAX_SKEW_SECONDS at most). pacegate's clients open one session
# at a time and reconnect with backoff; over a thousand in two minutes is a loop or a
# stolen key. The cap bounds the cache at this many entries per pinned client, and a
# client over it is refused (``hello_rate_limit``) without disturbing the others.
MAX_HELLOS_PER_CLIENT: Final = 1024

STALE = "stale_hello"
REPLAYED = "replayed_hello"
RATE_LIMITED = "hello_rate_limit"


class HelloReplayCache:
    """Admitted hellos by client name, each kept until its timestamp is stale."""

    def __init__(
        self,
        *,
        max_skew: float = HELLO_MAX_SKEW_SECONDS,
        max_per_client: int = MAX_HELLOS_PER_CLIENT,
    ) -> None:
        if not max_skew > 0:
            raise ValueError(f"max_skew must be > 0 seconds, got {max_skew!r}")
        if max_per_client < 1:
            raise ValueError(f"max_per_client must be at least 1, got {max_per_client!r}")
        self.max_skew = max_skew
        self.max_per_client = max_per_client
        # client -> {hello random: when it becomes stale (server wall clock, seconds)}
        self._seen: dict[str, dict[bytes, float]] = {}

    def refusal(self, client: str, random: bytes, hello_time: float, now: float) -> str | None:
        """Why this hello must be refused (``stale_hello``, ``replayed_hello``,
        ``hello_rate_limit``), or None. Records nothing: call :meth:`admit` once the
        signature has been verified, so that forged hellos never fill the cache."""
        if abs(now - hello_time) > self.max_skew:
            return STALE
        seen = self._prune(client, now)
        if random in seen:
            return REPLAYED
        if len(seen) >= self.max_per_client:
            return RATE_LIMITED
        return None

    def admit(self, client: str, random: bytes, hello_time: float) -> None:
        self._seen.setdefault(client, {})[random] = hello_time + self.max_skew

    def __len__(self) -> int:
        return sum(len(v) for v in self._seen.values())

    def _prune(self, client: str, now: float) -> dict[bytes, float]:
        seen = self._seen.get(client)
        if seen is None:
            return {}
        for random in [r for r, stale_at in seen.items() if stale_at < now]:
            del seen[random]
        if not seen:
            del self._seen[client]
        return seen

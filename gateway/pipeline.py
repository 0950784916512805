"""The gateway's per-message decision: (topic, payload, state) -> accepted | rejected.

No I/O: the service feeds it messages and acts on the result (count, log, forward, ack).
Order of checks, cheapest and least revealing first::

    route match -> device id from the topic level -> PSK (unknown / revoked refused)
    -> size limit -> sealed header (version, length) -> replay window check
    -> ChaCha20-Poly1305 open (AAD binds version, device id, counter) -> rate limit
    -> window accept -> timestamp sanity -> plausibility (flagged, never dropped) -> accepted

The replay window is checked *before* the AEAD (a replay costs no crypto) and advanced only
*after* the tag verified (a forger cannot move it). The per-device rate bucket is charged only
for readings that authenticated and passed the window check (a refused one leaves its counter
unspent): anyone who can publish on a device's topic
(a neighbour's will message, a forged payload) cannot spend that device's budget and get its
genuine readings refused. The windows here are the *live* ones;
:mod:`gateway.replay_store` persists a window only once its readings are durably handed on,
so a crash never turns an unacknowledged MQTT message into a "replay".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from gateway.config import Route
from pacegate.identity import is_valid_device_id
from pacegate.ingest import FLAG_IMPLAUSIBLE, IngestItem
from pacegate.keystore import DeviceKey
from pacegate.reading import Reading
from pacegate.replay import ReplayRejected, ReplayWindow
from pacegate.sealed import SealedReadingError, open_reading, parse_header

# Stable rejection reasons (metric label values; docs/gateway.md lists them).
NO_ROUTE = "no_route"
UNKNOWN_DEVICE = "unknown_device"
REVOKED_DEVICE = "revoked_device"
OVERSIZED = "oversized"
RATE_LIMITED = "rate_limited"
MALFORMED = "malformed"
UNSUPPORTED_VERSION = "unsupported_version"
BAD_TAG = "bad_tag"
REPLAY = "replay"
TOO_OLD = "too_old"
OUT_OF_RANGE = "out_of_range"
REASONS = (
    NO_ROUTE,
    UNKNOWN_DEVICE,
    REVOKED_DEVICE,
    OVERSIZED,
    RATE_LIMITED,
    MALFORMED,
    UNSUPPORTED_VERSION,
    BAD_TAG,
    REPLAY,
    TOO_OLD,
    OUT_OF_RANGE,
)
# Readings stamped before this are a device clock that never synchronised.
EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)


class KeyLookup(Protocol):
    def get(self, device_id: str) -> DeviceKey | None: ...


class WindowSource(Protocol):
    def live(self, device_id: str) -> ReplayWindow: ...


# (psk, device_id, sealed payload) -> (counter, reading); raises SealedReadingError
SealOpener = Callable[[bytes, str, bytes], tuple[int, Reading]]


@dataclass(frozen=True, slots=True)
class Accepted:
    route: Route
    item: IngestItem

    @property
    def flagged(self) -> bool:
        return bool(self.item.flags & FLAG_IMPLAUSIBLE)


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    detail: str
    device_id: str | None = None  # only a syntactically valid id, safe to log
    route: Route | None = None


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass(slots=True)
class PipelineState:
    """Everything the decision depends on. ``routes`` may be swapped on reload."""

    routes: Sequence[Route]
    keys: KeyLookup
    windows: WindowSource
    buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)
    # The one cryptographic call of the decision: ChaCha20-Poly1305 under the device's PSK.
    # A seam only so that bench/bench_pipeline.py can measure the same pipeline with the
    # seal as an identity; no production path passes anything else.
    open_sealed: SealOpener = open_reading

    def match(self, topic: str) -> tuple[Route, str] | None:
        for route in self.routes:
            device_id = route.device_id_from(topic)
            if device_id is not None:
                return route, device_id
        return None

    def take_token(self, route: Route, device_id: str, now: float) -> bool:
        rate = route.limits.max_rate_per_device
        if rate <= 0:
            return True
        burst = float(route.limits.burst)
        key = (route.name, device_id)
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = _Bucket(burst, now)
        b.tokens = min(burst, b.tokens + (now - b.stamp) * rate)
        b.stamp = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True


def process(
    topic: str, payload: bytes, state: PipelineState, *, now: float, wall: datetime
) -> Accepted | Rejected:
    """Decide one MQTT message. ``now`` is a monotonic clock (rate limits), ``wall`` UTC."""
    matched = state.match(topic)
    if matched is None:
        return Rejected(NO_ROUTE, "topic matches no route")
    route, device_id = matched
    if not is_valid_device_id(device_id):
        return Rejected(UNKNOWN_DEVICE, "topic level is not a valid device id", route=route)
    key = state.keys.get(device_id)
    if key is None:
        return Rejected(UNKNOWN_DEVICE, "device is not enrolled", device_id, route)
    if key.revoked:
        return Rejected(REVOKED_DEVICE, "device is revoked", device_id, route)
    if len(payload) > route.limits.max_payload_bytes:
        return Rejected(
            OVERSIZED,
            f"{len(payload)} bytes, route limit {route.limits.max_payload_bytes}",
            device_id,
            route,
        )
    try:
        header = parse_header(payload)
        if header.version != route.version:
            return Rejected(
                UNSUPPORTED_VERSION,
                f"version {header.version} on a route for v{route.version}",
                device_id,
                route,
            )
        window = state.windows.live(device_id)
        window.check(header.counter)
        counter, reading = state.open_sealed(key.psk, device_id, payload)
        # charged only now, for an authentic new reading; refused, its counter stays unspent
        if not state.take_token(route, device_id, now):
            return Rejected(RATE_LIMITED, "over the route's per-device rate", device_id, route)
        window.accept(counter)
    except SealedReadingError as exc:
        return Rejected(exc.reason, str(exc), device_id, route)
    except ReplayRejected as exc:
        return Rejected(exc.reason, f"counter {exc.counter}", device_id, route)
    # Authenticated from here on: the counter is spent whatever follows.
    skew = timedelta(seconds=route.limits.max_clock_skew_s)
    if not EARLIEST_TIMESTAMP <= reading.timestamp <= wall + skew:
        return Rejected(OUT_OF_RANGE, "timestamp outside the plausible range", device_id, route)
    flags = 0 if reading.plausible else FLAG_IMPLAUSIBLE
    return Accepted(route, IngestItem(device_id, counter, reading, flags))

"""Logging: human lines by default, JSON lines on request, security events as data.

A security event is one log record on the ``pacegate.security`` logger with a stable
schema (see docs/security-events.md)::

    {"ts": ..., "level": "WARNING", "logger": "pacegate.security", "event": "reading_rejected",
     "component": "gateway", "reason": "bad_tag", "peer": "pm-0001", "detail": "..."}

Secrets never reach a handler: :class:`RedactingFilter` blanks any field whose name says
it is a key, PSK, token or plaintext reading, whatever code put it there.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

SECURITY_LOGGER = "pacegate.security"
_REDACT_NAMES = frozenset(
    {
        "psk",
        "key",
        "secret",
        "password",
        "token",
        "plaintext",
        "reading",
        "private_key",
        "session_key",
        "shared_secret",
    }
)
_REDACT_SUFFIXES = ("_psk", "_key", "_secret", "_password", "_token", "_plaintext")
_REDACTED = "<redacted>"
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


def _is_secret_field(name: str) -> bool:
    lname = name.lower()
    return lname in _REDACT_NAMES or lname.endswith(_REDACT_SUFFIXES)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {
                k: (_REDACTED if _is_secret_field(k) else v) for k, v in fields.items()
            }
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%H:%M:%S")
        base = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else HumanFormatter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # amqtt logs every packet at INFO/DEBUG; its refusals are reported by our plugins
    logging.getLogger("amqtt").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("transitions").setLevel(logging.WARNING)


# Security events are rate-limited per (component, event, reason, source): a peer that
# repeats one fault (400 KB of unknown-id PUBACKs is 100,000 packets) must not be able to
# flood the log. Within each window the first EVENT_BURST events of a key are logged; the
# rest are counted, and one summary line per key (event "security_events_suppressed")
# reports the count once the window is over. 50 per 10 s lets every distinct event of an
# ordinary incident through and bounds a flood to ~5 lines per second per key.
EVENT_BURST = 50
EVENT_WINDOW_S = 10.0
# Keys tracked at once; beyond this, new keys share one overflow key, so a flood from many
# spoofed sources cannot grow the limiter itself without bound.
EVENT_MAX_KEYS = 10_000
_OVERFLOW_SOURCE = "*"
SUPPRESSED_EVENT = "security_events_suppressed"


class EventRateLimiter:
    """Counts events per key in fixed windows; says which to log and what was suppressed.

    Pure logic with an injected clock (no logging here), safe to share between threads."""

    def __init__(
        self,
        *,
        burst: int = EVENT_BURST,
        window: float = EVENT_WINDOW_S,
        max_keys: int = EVENT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or window <= 0 or max_keys < 1:
            raise ValueError("EventRateLimiter needs burst >= 1, window > 0 and max_keys >= 1")
        self.burst, self.window, self.max_keys, self._clock = burst, window, max_keys, clock
        self._lock = threading.Lock()
        # key -> [window start, events in this window]
        self._windows: dict[tuple[str, ...], list[float]] = {}

    def admit(self, key: tuple[str, ...]) -> tuple[bool, list[tuple[tuple[str, ...], int]]]:
        """Record one event of ``key``: (log it?, [(key, suppressed count)] of windows that
        ended, to report now)."""
        now = self._clock()
        with self._lock:
            ended = self._expire(now)
            if key not in self._windows and len(self._windows) >= self.max_keys:
                key = (*key[:-1], _OVERFLOW_SOURCE)
            slot = self._windows.setdefault(key, [now, 0])
            slot[1] += 1
            return slot[1] <= self.burst, ended

    def flush(self) -> list[tuple[tuple[str, ...], int]]:
        """The suppressed counts of windows that have ended (call it periodically)."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> list[tuple[tuple[str, ...], int]]:
        ended = []
        for key, (start, count) in list(self._windows.items()):
            if now - start >= self.window:
                del self._windows[key]
                if count > self.burst:
                    ended.append((key, int(count - self.burst)))
        return ended

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()


_LIMITER = EventRateLimiter()


def event_limiter() -> EventRateLimiter:
    """The process-wide limiter :func:`security_event` uses (tests reset it)."""
    return _LIMITER


def _report_suppressed(ended: list[tuple[tuple[str, ...], int]]) -> None:
    for (component, event, reason, source), count in ended:
        logging.getLogger(SECURITY_LOGGER).warning(
            "%s %s: %s",
            component,
            SUPPRESSED_EVENT,
            reason,
            extra={
                "fields": {
                    "event": SUPPRESSED_EVENT,
                    "component": component,
                    "reason": reason,
                    "suppressed_event": event,
                    "source": source,
                    "suppressed": count,
                    "window_s": _LIMITER.window,
                }
            },
        )


def flush_security_events() -> None:
    """Log the summary line of every rate-limit window that has ended. Services call this
    periodically so that the count of a flood that stopped is still reported."""
    _report_suppressed(_LIMITER.flush())


def security_event(
    event: str,
    *,
    component: str,
    reason: str,
    peer: str | None = None,
    level: int = logging.WARNING,
    source: str | None = None,
    **detail: Any,
) -> None:
    """Log a refusal or other security-relevant fact as structured data (no secrets).

    Rate-limited per (component, event, reason, source); ``source`` (the peer's address,
    say, when ``peer`` is an ``ip:port`` that changes with each connection) defaults to
    ``peer``."""
    fields: dict[str, Any] = {"event": event, "component": component, "reason": reason}
    if peer is not None:
        fields["peer"] = peer
    if source is not None:
        fields["source"] = source
    fields.update(detail)
    key = (component, event, reason, source if source is not None else str(peer))
    logged, ended = _LIMITER.admit(key)
    _report_suppressed(ended)
    if logged:
        logging.getLogger(SECURITY_LOGGER).log(
            level, "%s %s: %s", component, event, reason, extra={"fields": fields}
        )

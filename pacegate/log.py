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
import time
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


def security_event(
    event: str,
    *,
    component: str,
    reason: str,
    peer: str | None = None,
    level: int = logging.WARNING,
    **detail: Any,
) -> None:
    """Log a refusal or other security-relevant fact as structured data (no secrets)."""
    fields: dict[str, Any] = {"event": event, "component": component, "reason": reason}
    if peer is not None:
        fields["peer"] = peer
    fields.update(detail)
    logging.getLogger(SECURITY_LOGGER).log(
        level, "%s %s: %s", component, event, reason, extra={"fields": fields}
    )

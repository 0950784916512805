"""The error families of pacegate.

Two families, as in h11: :class:`RemoteProtocolError` means a *peer* sent something we
refuse (garbage, a bad tag, a replay); :class:`LocalProtocolError` means *we* misused an
API. A service catches the first, counts it, logs a security event and keeps running; the
second is a bug. :class:`ConfigError` is an operator's mistake in a file and always names
the file, the line when known, the key and the fix.
"""

from __future__ import annotations

from pathlib import Path


class PacegateError(Exception):
    """Base class of every error pacegate raises on purpose."""


class InvariantError(PacegateError):
    """A state pacegate's own code must never reach: a bug, reported as one. Raised where an
    ``assert`` would be, since ``python -O`` strips asserts and the check with them."""


class RemoteProtocolError(PacegateError):
    """A peer sent something we refuse. ``reason`` is a short stable code for metrics."""

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class LocalProtocolError(PacegateError):
    """This side misused an API (a bug, not an attack)."""


class ConfigError(PacegateError):
    """A configuration or state file is wrong; the message says where and how to fix it."""

    def __init__(
        self,
        path: str | Path | None,
        key: str,
        problem: str,
        *,
        fix: str | None = None,
        line: int | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.key = key
        self.problem = problem
        self.fix = fix
        self.line = line
        # no file: a flag's error ("--since: ..."), where the flag is the place
        where = f"{self.path}:{line}" if self.path and line is not None else self.path
        parts = [where, key, problem]
        text = ": ".join(p for p in parts if p)
        if fix:
            text = f"{text} (fix: {fix})"
        super().__init__(text)

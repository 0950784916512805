"""The PKI's one error: an operation that cannot be done as asked."""

from __future__ import annotations

from pacegate.errors import PacegateError


class PkiError(PacegateError, ValueError):
    """A PKI operation cannot be done as asked (unknown or duplicate id, missing CA...)."""

"""The analysis's errors."""

from __future__ import annotations

from pacegate.errors import PacegateError


class AnalysisError(PacegateError):
    """The analysis could not run, or the worker refused it (message says why)."""


class ToleranceExceeded(AnalysisError):
    """An encrypted statistic differs from the plaintext one by more than the tolerance."""

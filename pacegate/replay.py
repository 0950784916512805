"""An OSCORE-style anti-replay window (RFC 8613 §7.4), pure logic.

The window remembers the highest counter accepted and a bitmap of the ``size`` counters
below it. A counter is fresh if it is above the highest, or inside the window and not yet
seen. Anything at or below ``highest - size`` is "too old" and refused: we cannot tell it
from a replay. Check first (cheap, before the AEAD), then :meth:`accept` only once the tag
verified, so a forger cannot advance the window.

The state is two integers; :meth:`to_state`/:meth:`from_state` let the gateway persist it
so that it survives a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 8613 asks for at least 32. MQTT QoS 1 redelivery and multi-path reordering stay well
# inside 64 positions at our rates; larger windows only widen what an attacker may replay.
DEFAULT_WINDOW_SIZE = 64


class ReplayRejected(Exception):
    """The counter was seen before (``reason='replay'``) or is too old (``'too_old'``)."""

    def __init__(self, reason: str, counter: int) -> None:
        super().__init__(f"counter {counter}: {reason}")
        self.reason = reason
        self.counter = counter


@dataclass(slots=True)
class ReplayWindow:
    size: int = DEFAULT_WINDOW_SIZE
    highest: int = 0  # 0: nothing accepted yet (counters start at 1)
    bitmap: int = 0  # bit i set: counter ``highest - i`` was accepted

    def check(self, counter: int) -> None:
        """Raise :class:`ReplayRejected` unless ``counter`` is fresh. Does not change state."""
        if counter > self.highest:
            return
        delta = self.highest - counter
        if delta >= self.size:
            raise ReplayRejected("too_old", counter)
        if self.bitmap >> delta & 1:
            raise ReplayRejected("replay", counter)

    def accept(self, counter: int) -> None:
        """Record ``counter`` as used. Call only after the payload authenticated."""
        self.check(counter)
        mask = (1 << self.size) - 1
        if counter > self.highest:
            shift = counter - self.highest
            self.bitmap = ((self.bitmap << shift) | 1) & mask if shift < self.size else 1
            self.highest = counter
        else:
            self.bitmap |= 1 << (self.highest - counter)

    def to_state(self) -> tuple[int, int]:
        return self.highest, self.bitmap

    @classmethod
    def from_state(cls, highest: int, bitmap: int, size: int = DEFAULT_WINDOW_SIZE) -> ReplayWindow:
        return cls(size=size, highest=highest, bitmap=bitmap & ((1 << size) - 1))

"""What an analysis session needs from the channel, and an in-process stand-in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from hospital.analysis.errors import AnalysisError


class Transport(Protocol):
    """What the session needs from the channel (``ChannelStream`` fits)."""

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...


class LocalTransport:
    """Hands messages to an in-process handler (``CloudSession.handle``): for tests and for
    the benchmark's in-process mode. Replies are queued in order, as on a channel."""

    def __init__(self, handle: Callable[[bytes], bytes]) -> None:
        self._handle = handle
        self._replies: list[bytes] = []
        self.sent: list[int] = []

    async def send(self, data: bytes) -> None:
        self._replies.append(self._handle(data))

    async def recv(self) -> bytes:
        if not self._replies:
            raise AnalysisError("no reply pending")
        return self._replies.pop(0)

"""The channel's two exceptions.

:class:`ChannelError` is the one error a peer's bytes can raise (h11's invariant: parse it,
or raise this, never anything else). Its ``reason`` is a short stable code for metrics and
security events (``bad_record``, ``unknown_client``, ``truncated`` ...).

:class:`ChannelClosed` is what the asyncio :class:`~pacegate.channel.aio.ChannelStream`
raises once the session is over, cleanly or not; ``cause`` holds the :class:`ChannelError`
that ended it, or ``None`` for a clean close.
"""

from __future__ import annotations

from pacegate.errors import PacegateError, RemoteProtocolError


class ChannelError(RemoteProtocolError):
    """The peer sent something the channel refuses; the session is over."""


class ChannelClosed(PacegateError):
    """The session is closed (peer closed it, we closed it, or an error ended it)."""

    def __init__(self, message: str = "channel closed", *, cause: ChannelError | None = None):
        super().__init__(message)
        self.cause = cause

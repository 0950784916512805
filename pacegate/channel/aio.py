"""Thin asyncio adapters around :class:`~pacegate.channel.session.ChannelSession`.

``connect()`` and ``serve()`` run the handshake under a timeout, then hand the application a
:class:`ChannelStream`: ``send(bytes)`` / ``recv() -> bytes`` of whole messages. A reader
task feeds the session continuously, so key updates complete even while the application
only sends. Peer errors are translated once, here: a ``ChannelError`` is counted, logged as
a security event and the connection closed; the application sees :class:`ChannelClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pacegate.admission import AdmissionPolicy, Admitted, Limit, Ticket, WhenFull, source_key
from pacegate.channel.admission import HelloReplayCache
from pacegate.channel.errors import ChannelClosed, ChannelError
from pacegate.channel.identity import ChannelIdentity, ChannelPublicKey
from pacegate.channel.kem import KemProvider
from pacegate.channel.session import (
    DEFAULT_MAX_SESSION_LIFETIME,
    DEFAULT_REKEY_AFTER_RECORDS,
    DEFAULT_REKEY_AFTER_SECONDS,
    MAX_MESSAGE_SIZE,
    NEED_DATA,
    ChannelSession,
    HandshakeComplete,
    Message,
    PeerClosed,
    SessionStats,
)
from pacegate.channel.states import State
from pacegate.channel.wire import CloseReason
from pacegate.errors import InvariantError, LocalProtocolError
from pacegate.log import security_event

log = logging.getLogger("pacegate.channel")

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# A genuine client writes its ClientHello in the same breath as it connects (one frame of
# ~1.3 KB), so the server sees it one round trip after the accept. 2 s is far beyond any
# honest RTT, and it bounds what a silent or byte-dribbling connection (slowloris) can hold
# to 2 s instead of the whole handshake_timeout.
FIRST_FRAME_TIMEOUT = 2.0
# Connections that have not yet delivered a ClientHello signed by a pinned client (idle,
# dribbling, or being read). They have cost the server nothing but a socket, so there is no
# per-source cap on them: when there are this many, the oldest is evicted for the newcomer.
# A genuine client's hello is verified a moment after its accept, so a flood would have to
# open this many connections within that moment to evict it (with a cap of 8 per source, a
# flood of 16 to 64 connections at a time from the gateway's own address did, issue 9).
# ~1,024 sockets and their buffers are a few tens of MB at most.
DEFAULT_MAX_UNVERIFIED_CONNECTIONS = 1024
# Handshakes past a verified hello (the server has spent a KEM and holds state until
# ClientAuth or handshake_timeout), in all. Only a pinned client can get here, so these
# limits bound what a stolen key (or a bug) can hold; beyond them its hello is refused
# with Alert(busy) before the KEM.
DEFAULT_MAX_PENDING_HANDSHAKES = 256
# The same from one source address (an IPv6 /64 counts as one). Established sessions do not
# count, only handshakes in flight: a host may hold any number of sessions and only has to
# avoid starting more than 8 at the very same instant (each pacegate client opens one at a
# time). Many gateways behind one NAT reconnecting at once may see a few refusals, which
# they retry like any failed connect (max_pending_per_source raises it).
DEFAULT_MAX_PENDING_PER_SOURCE = 8
_READ_SIZE = 256 * 1024
# Whole messages decoded but not yet taken by recv(): at most this many, and at most this
# many bytes (beyond one message); when full the reader stops reading and TCP pushes back on
# the peer, so a fast sender cannot fill a slow receiver's memory.
_INBOX_SIZE = 64
_INBOX_BYTES = 32 * 1024 * 1024
_CLOSE_FLUSH_TIMEOUT = 2.0
# How often a session applies its time-driven rules without traffic (rekey on time,
# maximum lifetime, rekey grace): a quarter of the shortest period, within these bounds.
_MIN_TIMER, _MAX_TIMER = 0.05, 30.0
# A server checks at least this often that each session's client is still pinned, so that
# removing it from allowed_clients closes its live sessions within about a second.
TRUST_CHECK_INTERVAL = 1.0
# Session ends that are routine (logged at info); every other reason is a security event.
_ROUTINE_ENDS = frozenset({"session_expired"})
# What the peer's Close reason means for this end (None: a clean close).
_PEER_CLOSE_CAUSES = {
    CloseReason.UNAUTHORIZED: ("refused_by_peer", "the peer no longer accepts this session"),
    CloseReason.EXPIRED: ("session_expired", "the peer ended the session at a limit"),
    CloseReason.PROTOCOL_ERROR: ("refused_by_peer", "the peer closed on a protocol error"),
}


class _End:
    """Queued after the last message: why the stream ended."""

    def __init__(self, cause: ChannelError | None) -> None:
        self.cause = cause


class ChannelStream:
    """An established channel session: whole messages in and out."""

    def __init__(
        self,
        session: ChannelSession,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        component: str = "channel",
        rekey_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        if session.peer_name is None:
            raise LocalProtocolError("ChannelStream needs an established session")
        self.peer_name: str = session.peer_name
        self._session = session
        self._reader = reader
        self._writer = writer
        self._component = component
        peer = writer.get_extra_info("peername")
        self.peer_address: str = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self._inbox: asyncio.Queue[bytes | _End] = asyncio.Queue(_INBOX_SIZE)
        self._inbox_bytes = 0
        self._inbox_drained = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self._rekeyed = asyncio.Condition()  # notified when an epoch ends or the reader stops
        self._rekey_timeout = rekey_timeout
        self._closed = False
        self._end: _End | None = None
        self._failure: ChannelError | None = None  # set by the reader the moment it fails
        self._local_end: ChannelError | None = None  # a limit of ours ended the session
        loop = asyncio.get_running_loop()
        self._reader_task = loop.create_task(
            self._read_loop(), name=f"channel-reader-{self.peer_name}"
        )
        # Both ends apply the time rules to an idle session too: the client rekeys on time
        # (a key never outlives rekey_after_seconds in memory), the server asks for a rekey,
        # checks that the client is still pinned, and either ends the session at its
        # maximum lifetime.
        self._timer_task: asyncio.Task[None] | None = loop.create_task(
            self._session_timer(), name=f"channel-timer-{self.peer_name}"
        )

    @property
    def stats(self) -> SessionStats:
        """Records sent/received, messages, application and wire bytes, rekeys."""
        return self._session.stats

    @property
    def epoch(self) -> int:
        """How many key updates this session has completed."""
        return self._session.epoch

    @property
    def closed(self) -> bool:
        return self._closed or self._end is not None or self._reader_task.done()

    @property
    def failure(self) -> ChannelError | None:
        """The peer error that ended this session, if any."""
        return self._failure

    async def send(self, message: bytes) -> None:
        """Send one application message (at most ``max_message_size`` bytes)."""
        if self.closed or self._failure is not None:
            raise ChannelClosed("channel closed", cause=self._failure)
        if self._session.rekey_overdue():
            await self._wait_for_rekey()
        try:
            data = self._session.send(bytes(message))
        except LocalProtocolError as exc:
            if not self._session.established:
                raise ChannelClosed(f"channel closed: {exc}") from None
            raise
        except ChannelError as exc:  # a limit of ours ended the session
            await self._end_locally(exc)
            raise ChannelClosed(str(exc), cause=exc) from None
        await self._write(data)

    async def _wait_for_rekey(self) -> None:
        try:
            async with asyncio.timeout(self._rekey_timeout), self._rekeyed:
                await self._rekeyed.wait_for(
                    lambda: self.closed or not self._session.rekey_overdue()
                )
        except TimeoutError:
            exc = ChannelError(
                f"{self.peer_name} did not answer a key update within {self._rekey_timeout}s",
                reason="rekey_timeout",
            )
            self._failure = exc
            security_event(
                "channel_session_error",
                component=self._component,
                reason=exc.reason,
                peer=self.peer_name,
                address=self.peer_address,
            )
            await self.close()
            raise ChannelClosed(str(exc), cause=exc) from None
        if self.closed:
            raise ChannelClosed("channel closed", cause=self._failure)

    async def recv(self) -> bytes:
        """The next whole message; :class:`ChannelClosed` at EOF, after an error or close."""
        if self._end is not None and self._inbox.empty():
            raise ChannelClosed("channel closed", cause=self._end.cause)
        if self._local_end is not None and self._inbox.empty():
            raise ChannelClosed(str(self._local_end), cause=self._local_end)
        if self._closed:
            raise ChannelClosed("channel closed by us")
        item = await self._inbox.get()
        if isinstance(item, _End):
            self._end = item
            with contextlib.suppress(asyncio.QueueFull):
                self._inbox.put_nowait(item)  # later recv() calls end too
            raise ChannelClosed(
                "channel closed by peer" if item.cause is None else f"channel failed: {item.cause}",
                cause=item.cause,
            )
        self._inbox_bytes -= len(item)
        if self._inbox_bytes <= _INBOX_BYTES:
            self._inbox_drained.set()
        return item

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while True:
            try:
                yield await self.recv()
            except ChannelClosed:
                return

    async def close(self) -> None:
        """Send a Close record (so the peer can tell it from a truncation), then close."""
        if self._closed:
            return
        self._closed = True
        data = self._session.close()
        try:
            if data and not self._writer.is_closing():
                self._writer.write(data)
                async with asyncio.timeout(_CLOSE_FLUSH_TIMEOUT):
                    await self._writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            self._writer.close()
            self._reader_task.cancel()
            if self._timer_task is not None:
                self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, TimeoutError):
                async with asyncio.timeout(_CLOSE_FLUSH_TIMEOUT):
                    await self._writer.wait_closed()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            with contextlib.suppress(asyncio.QueueFull):
                self._inbox.put_nowait(_End(None))  # wake a recv() waiting in another task

    async def __aenter__(self) -> ChannelStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        if self._writer.is_closing():
            raise ChannelClosed("connection lost", cause=self._failure)
        self._writer.write(data)
        try:
            async with self._drain_lock:
                await self._writer.drain()
        except OSError as exc:
            raise ChannelClosed(f"connection lost: {exc}", cause=self._failure) from None

    async def _session_timer(self) -> None:
        session = self._session
        periods = [session.rekey_after_seconds, session.max_session_lifetime, session.rekey_grace]
        if session.role == "server":
            periods.append(4 * TRUST_CHECK_INTERVAL)
        interval = min(max(min(periods) / 4, _MIN_TIMER), _MAX_TIMER)
        while not self.closed:
            await asyncio.sleep(interval)
            if self._writer.is_closing():
                return
            try:
                data = session.poll()
            except ChannelError as exc:
                await self._end_locally(exc)
                return
            if data:
                self._writer.write(data)

    async def _end_locally(self, exc: ChannelError) -> None:
        """A limit of ours (lifetime, trust, rekey, key exhaustion) ended the session: tell
        the peer (the session queued a Close record), log once, stop the reader and wake
        anyone waiting in recv()."""
        if self._local_end is not None or self._closed:
            return
        self._local_end = self._failure = exc
        _log_session_end(self._component, exc, self.peer_name, self.peer_address)
        data = self._session.data_to_send()
        try:
            if data and not self._writer.is_closing():
                self._writer.write(data)
                async with asyncio.timeout(_CLOSE_FLUSH_TIMEOUT):
                    await self._writer.drain()
        except (OSError, TimeoutError):
            pass
        self._writer.close()
        if asyncio.current_task() is not self._reader_task:
            self._reader_task.cancel()
        if self._timer_task is not None and asyncio.current_task() is not self._timer_task:
            self._timer_task.cancel()
        async with self._rekeyed:
            self._rekeyed.notify_all()
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(_End(exc))

    async def _read_loop(self) -> None:
        cause: ChannelError | None = None
        phase = (self._session.epoch, self._session.state)
        try:
            while True:
                event = self._session.next_event()
                if (self._session.epoch, self._session.state) != phase:
                    phase = (self._session.epoch, self._session.state)
                    async with self._rekeyed:  # a sender may wait for a key update
                        self._rekeyed.notify_all()
                pending = self._session.data_to_send()  # key-update answers
                if pending and not self._writer.is_closing():
                    self._writer.write(pending)
                if isinstance(event, Message):
                    await self._inbox.put(event.data)
                    self._inbox_bytes += len(event.data)
                    while self._inbox_bytes > _INBOX_BYTES:
                        self._inbox_drained.clear()
                        await self._inbox_drained.wait()
                elif isinstance(event, PeerClosed):
                    meaning = _PEER_CLOSE_CAUSES.get(event.reason)  # type: ignore[call-overload]
                    if meaning is not None:
                        cause = self._failure = ChannelError(meaning[1], reason=meaning[0])
                        _log_session_end(self._component, cause, self.peer_name, self.peer_address)
                    break
                elif event is NEED_DATA:
                    try:
                        data = await self._reader.read(_READ_SIZE)
                    except OSError:
                        data = b""
                    self._session.receive_data(data)
        except ChannelError as exc:
            cause = self._failure = exc
            if not self._closed:
                _log_session_end(self._component, exc, self.peer_name, self.peer_address)
            pending = self._session.data_to_send()  # a Close record when a limit ended it
            if pending and not self._writer.is_closing():
                self._writer.write(pending)
            self._writer.close()
        except Exception as exc:  # a bug here must not leave recv() waiting forever
            log.exception("channel reader for %s failed", self.peer_name)
            cause = self._failure = ChannelError(f"internal error: {exc!r}", reason="internal")
            self._writer.close()
        async with self._rekeyed:
            self._rekeyed.notify_all()
        await self._inbox.put(_End(cause))


async def _handshake(
    session: ChannelSession,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    on_progress: Callable[[], None] | None = None,
) -> str:
    """Drive the handshake to completion; returns the authenticated peer name.
    ``on_progress`` is called after each step of the session (the server watches for the
    end of WAIT_CLIENT_HELLO)."""
    while True:
        try:
            event = session.next_event()
            if on_progress is not None:
                on_progress()
        finally:
            out = session.data_to_send()
            if out:
                writer.write(out)
                with contextlib.suppress(OSError):
                    await writer.drain()
        if isinstance(event, HandshakeComplete):
            return event.peer_name
        if event is NEED_DATA:
            try:
                data = await reader.read(_READ_SIZE)
            except OSError:
                data = b""
            session.receive_data(data)
        else:  # a Message cannot come before HandshakeComplete; keep the invariant explicit
            raise ChannelError("data before the handshake completed", reason="unexpected_message")


def _log_session_end(component: str, exc: ChannelError, peer: str, address: str) -> None:
    if exc.reason in _ROUTINE_ENDS:
        log.info("channel session with %s (%s) ended: %s", peer, address, exc)
        return
    security_event(
        "channel_session_error",
        component=component,
        reason=exc.reason,
        peer=peer,
        address=address,
        detail=str(exc),
    )


def _session_options(
    kem_provider: KemProvider | str | None,
    rekey_after_records: int,
    rekey_after_seconds: float,
    max_message_size: int,
    max_session_lifetime: float,
    clock: Callable[[], float],
    wall_clock: Callable[[], float],
) -> dict[str, Any]:
    return {
        "kem": kem_provider,
        "rekey_after_records": rekey_after_records,
        "rekey_after_seconds": rekey_after_seconds,
        "max_message_size": max_message_size,
        "max_session_lifetime": max_session_lifetime,
        "clock": clock,
        "wall_clock": wall_clock,
    }


async def connect(
    host: str,
    port: int,
    *,
    identity: ChannelIdentity,
    server_name: str,
    server_key: ChannelPublicKey,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    rekey_after_records: int = DEFAULT_REKEY_AFTER_RECORDS,
    rekey_after_seconds: float = DEFAULT_REKEY_AFTER_SECONDS,
    max_message_size: int = MAX_MESSAGE_SIZE,
    max_session_lifetime: float = DEFAULT_MAX_SESSION_LIFETIME,
    kem_provider: KemProvider | str | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    component: str = "channel",
) -> ChannelStream:
    """Open a session to ``server_name`` at host:port, which must prove it holds
    ``server_key``. Raises ``OSError`` if unreachable, :class:`ChannelError` if the
    handshake fails (impostor, refused, timeout)."""
    session = ChannelSession.client(
        identity,
        server_name=server_name,
        server_key=server_key,
        **_session_options(
            kem_provider,
            rekey_after_records,
            rekey_after_seconds,
            max_message_size,
            max_session_lifetime,
            clock,
            wall_clock,
        ),
    )
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(handshake_timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(session.initiate())
            await _handshake(session, reader, writer)
    except TimeoutError:
        if writer is not None:
            writer.close()
        exc = ChannelError(
            f"handshake with {server_name} at {host}:{port} timed out after {handshake_timeout}s",
            reason="handshake_timeout",
        )
        _log_refusal(component, exc, server_name, f"{host}:{port}")
        raise exc from None
    except ChannelError as exc:
        if writer is None:
            raise InvariantError("writer unset here") from exc
        writer.close()
        _log_refusal(component, exc, server_name, f"{host}:{port}")
        raise
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    return ChannelStream(
        session, reader, writer, component=component, rekey_timeout=handshake_timeout
    )


def _log_refusal(component: str, exc: ChannelError, peer: str | None, address: str) -> None:
    security_event(
        "channel_handshake_failed",
        component=component,
        reason=exc.reason,
        peer=peer,
        address=address,
        detail=str(exc),
    )


@dataclass
class ChannelServerStats:
    """What a server saw, for metrics (pass one to :func:`serve` to read it)."""

    connections: int = 0
    sessions: int = 0
    active_sessions: int = 0
    pending_handshakes: int = 0  # in flight: with or without a verified hello
    unverified_connections: int = 0  # of those, without a verified hello yet
    # handshakes in flight by source (address, or IPv6 /64); sources with none are absent
    pending_by_source: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # by reason
    session_errors: int = 0

    def count_refusal(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


async def serve(
    host: str,
    port: int,
    *,
    identity: ChannelIdentity,
    allowed_clients: Mapping[str, ChannelPublicKey],
    on_session: Callable[[ChannelStream], Awaitable[None]],
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    first_frame_timeout: float = FIRST_FRAME_TIMEOUT,
    max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES,
    max_pending_per_source: int = DEFAULT_MAX_PENDING_PER_SOURCE,
    max_unverified_connections: int = DEFAULT_MAX_UNVERIFIED_CONNECTIONS,
    rekey_after_records: int = DEFAULT_REKEY_AFTER_RECORDS,
    rekey_after_seconds: float = DEFAULT_REKEY_AFTER_SECONDS,
    max_message_size: int = MAX_MESSAGE_SIZE,
    max_session_lifetime: float = DEFAULT_MAX_SESSION_LIFETIME,
    kem_provider: KemProvider | str | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    stats: ChannelServerStats | None = None,
    component: str = "channel",
) -> asyncio.Server:
    """Accept sessions from the pinned ``allowed_clients``; run ``on_session(stream)`` for
    each, then close it. Garbage, timeouts and refusals close that connection only.
    ``allowed_clients`` is read at every handshake (not copied), so updating the mapping
    enrols or removes a client for new sessions without a restart.

    A connection must deliver its whole ClientHello within ``first_frame_timeout`` and
    finish the handshake within ``handshake_timeout``. Of the connections without a verified
    hello, at most ``max_unverified_connections`` are kept (the oldest is evicted for a
    newcomer). Past a verified hello, at most ``max_pending_handshakes`` handshakes run at
    once, at most ``max_pending_per_source`` from one address; beyond that the hello is
    refused (Alert busy) before the server spends a KEM."""
    for name, value in (
        ("handshake_timeout", handshake_timeout),
        ("first_frame_timeout", first_frame_timeout),
    ):
        if not value > 0:
            raise ValueError(f"serve(): {name} must be > 0 seconds, got {value!r}")
    for name, count in (
        ("max_pending_handshakes", max_pending_handshakes),
        ("max_pending_per_source", max_pending_per_source),
        ("max_unverified_connections", max_unverified_connections),
    ):
        if count < 1:
            raise ValueError(f"serve(): {name} must be at least 1, got {count!r}")
    allowed = allowed_clients  # consulted at each handshake: callers may enrol/revoke live
    counters = stats if stats is not None else ChannelServerStats()
    pending = _PendingHandshakes(
        counters,
        unverified=Limit(max_unverified_connections, WhenFull.EVICT_OLDEST, "handshake_evicted"),
        verified_per_source=Limit(
            max_pending_per_source, WhenFull.REFUSE, "handshake_source_limit"
        ),
        verified=Limit(max_pending_handshakes, WhenFull.REFUSE, "handshake_limit"),
    )
    options = _session_options(
        kem_provider,
        rekey_after_records,
        rekey_after_seconds,
        max_message_size,
        max_session_lifetime,
        clock,
        wall_clock,
    )
    # one replay cache for every session of this server: a hello admitted on one
    # connection is refused on any other
    options["replay_cache"] = HelloReplayCache()
    ChannelSession.server(identity, allowed_clients=allowed, **options)  # validate options now

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle_connection(reader, writer)
        except asyncio.CancelledError:
            # the loop is shutting down: this connection's task ends here, quietly (asyncio's
            # start_server would otherwise log the cancellation as an error)
            writer.close()

    def admit(me: _Pending, client: str) -> str | None:
        """Called by the session once ``client``'s hello is verified, before its KEM."""
        return pending.verify(me)

    async def handle_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counters.connections += 1
        peer = writer.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        source = source_key(str(peer[0])) if isinstance(peer, tuple) else "?"
        me = _Pending(address, writer)
        # add() makes room by evicting the oldest connection without a verified hello: it has
        # cost nothing but a socket, and a newcomer is never refused for it
        for victim in pending.add(source, me):
            _refuse(
                counters,
                component,
                "handshake_evicted",
                victim.address,
                f"{max_unverified_connections} connections without a verified hello: "
                "closed to admit a newer connection",
            )
        session = ChannelSession.server(
            identity,
            allowed_clients=allowed,
            admit=lambda client: admit(me, client),
            **options,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        # the first frame has its own, shorter deadline; it is not a separate limit if the
        # whole handshake's deadline comes first
        first_frame_limited = first_frame_timeout < handshake_timeout
        try:
            async with asyncio.timeout(min(first_frame_timeout, handshake_timeout)) as deadline:

                def on_progress() -> None:
                    if not me.rescheduled and session.state != State.WAIT_CLIENT_HELLO:
                        me.rescheduled = True
                        deadline.reschedule(started + handshake_timeout)

                await _handshake(session, reader, writer, on_progress)
        except TimeoutError:
            if first_frame_limited and not me.verified:
                reason, limit = "first_frame_timeout", first_frame_timeout
            else:
                reason, limit = "handshake_timeout", handshake_timeout
            _refuse(counters, component, reason, address, f"{limit}s")
            writer.close()
            return
        except (ChannelError, OSError) as exc:
            if me.evicted:
                pass  # counted and logged when it was evicted
            elif isinstance(exc, ChannelError):
                _refuse(counters, component, exc.reason, address, str(exc))
            else:
                _refuse(counters, component, "connection_lost", address, str(exc))
            writer.close()
            return
        finally:
            pending.remove(me)
        stream = ChannelStream(
            session, reader, writer, component=component, rekey_timeout=handshake_timeout
        )
        counters.sessions += 1
        counters.active_sessions += 1
        log.info("channel session from %s (%s) established", stream.peer_name, address)
        try:
            await on_session(stream)
        except ChannelClosed as exc:
            if exc.cause is not None:
                counters.session_errors += 1
        except Exception:
            counters.session_errors += 1
            log.exception("on_session for %s failed; closing that session", stream.peer_name)
        finally:
            counters.active_sessions -= 1
            await stream.close()

    return await asyncio.start_server(handle, host, port)


class _Pending:
    """One connection whose handshake is in flight."""

    __slots__ = ("address", "evicted", "rescheduled", "ticket", "verified", "writer")

    def __init__(self, address: str, writer: asyncio.StreamWriter) -> None:
        self.address = address
        self.writer = writer
        self.ticket: Ticket[_Pending] | None = None  # in the pool it is counted in now
        self.verified = False  # its hello is signed by a pinned client (it now holds state)
        self.rescheduled = False  # its deadline moved from the first frame to the handshake
        self.evicted = False  # closed by us to make room (already counted and logged)


class _PendingHandshakes:
    """The handshakes in flight, in two pools of one :class:`AdmissionPolicy` each: those
    without a verified hello (evicted oldest first for a newcomer: they cost a socket) and
    those past it (refused beyond their caps, before the KEM: they hold state). Mirrors its
    counts into the server's stats."""

    def __init__(
        self,
        counters: ChannelServerStats,
        *,
        unverified: Limit,
        verified_per_source: Limit,
        verified: Limit,
    ) -> None:
        self._counters = counters
        self._unverified: AdmissionPolicy[_Pending] = AdmissionPolicy(total=unverified)
        self._verified: AdmissionPolicy[_Pending] = AdmissionPolicy(
            total=verified, per_source=verified_per_source
        )

    def add(self, source: str, entry: _Pending) -> list[_Pending]:
        """Count a new connection; close and return those evicted for it."""
        decision = self._unverified.admit(source, entry)
        victims: list[_Pending] = []
        if isinstance(decision, Admitted):  # always: this pool evicts, it never refuses
            entry.ticket = decision.ticket
            for eviction in decision.evicted:
                victim = eviction.ticket.item
                victim.evicted = True
                victim.writer.close()  # its read sees EOF and its handshake task ends quietly
                victims.append(victim)
                self._sync(eviction.ticket.source)
        self._sync(source)
        return victims

    def verify(self, entry: _Pending) -> str | None:
        """Move a connection whose hello is verified to the verified pool; the reason it
        is refused instead (it stays where it was until it closes), or None."""
        ticket = entry.ticket
        if entry.verified or ticket is None:
            return None
        if ticket.released:
            return "handshake_evicted"  # closed a moment ago to make room: spend no KEM
        decision = self._verified.admit(ticket.source, entry)
        if not isinstance(decision, Admitted):
            return decision.limit.reason
        self._unverified.release(ticket)
        entry.ticket = decision.ticket
        entry.verified = True
        self._sync(ticket.source)
        return None

    def remove(self, entry: _Pending) -> None:
        ticket = entry.ticket
        if ticket is not None:
            (self._verified if entry.verified else self._unverified).release(ticket)
            self._sync(ticket.source)

    def _sync(self, source: str) -> None:
        unverified, verified = self._unverified, self._verified
        self._counters.pending_handshakes = len(unverified) + len(verified)
        self._counters.unverified_connections = len(unverified)
        n = unverified.pending_from(source) + verified.pending_from(source)
        if n:
            self._counters.pending_by_source[source] = n
        else:
            self._counters.pending_by_source.pop(source, None)


def _refuse(
    counters: ChannelServerStats, component: str, reason: str, address: str, detail: str
) -> None:
    counters.count_refusal(reason)
    security_event(
        "channel_handshake_refused",
        component=component,
        reason=reason,
        address=address,
        detail=detail,
    )

"""The channel as a sans-IO state machine (h11 style): bytes in, events out; calls in,
bytes out. No sockets, no asyncio, no clock reads except through the injected ``clock``.

    client = ChannelSession.client(identity, server_name="hospital", server_key=pub)
    server = ChannelSession.server(identity, allowed_clients={"gateway": pub})
    wire = client.initiate()                    # ClientHello
    server.receive_data(wire); server.next_event()   # -> NEED_DATA, ServerHello queued
    client.receive_data(server.data_to_send()) ...

Handshake (2 round trips). The ClientHello is signed by the client's pinned key and names
the server it is meant for, so a server refuses a hello no pinned client wrote (or a replay,
or one meant for another server) with one ML-DSA verification, before it spends a KEM or
keeps any state; it signs only for a client that proved itself::

    C -> S  ClientHello     versions, suites, random, time, client name, server name,
                            X25519 pub, ML-KEM-768 ek, ML-DSA-65 sig over all that  (clear)
    S -> C  ServerHello     version, suite, random, X25519 pub, ML-KEM-768 ct     (clear)
            or Alert(reason) when the hello is refused                         (clear)
    C -> S  ClientAuth      name, ML-DSA-65 sig over transcript     (record, client hs key)
    S -> C  ServerAuth      name, ML-DSA-65 sig over transcript     (record, server hs key)

Every outcome a peer can cause is an event or one :class:`ChannelError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from pacegate.channel import keyschedule as ks
from pacegate.channel.admission import HelloReplayCache
from pacegate.channel.errors import ChannelError
from pacegate.channel.identity import ChannelIdentity, ChannelPublicKey, validate_peer_name
from pacegate.channel.kem import KemProvider, select_kem_provider
from pacegate.channel.states import (
    CLIENT_TRANSITIONS,
    OPEN_STATES,
    SERVER_TRANSITIONS,
    Event,
    State,
)
from pacegate.channel.wire import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    MAX_FRAGMENT_SIZE,
    MAX_FRAME_BODY,
    RANDOM_SIZE,
    AlertReason,
    ClientHello,
    CloseReason,
    ContentType,
    FrameType,
    KeyShare,
    PeerAuth,
    ServerHello,
    frame,
)
from pacegate.errors import InvariantError, LocalProtocolError

# Version 2: the ClientHello is signed and names the server (admission before any state,
# relay protection), the server can ask for a key update, sessions have a maximum lifetime.
# Version 1 (unsigned hello) is no longer spoken: its hellos are refused as unsupported.
VERSION_1: Final = 0x0001
VERSION_2: Final = 0x0002
PROTOCOL_VERSION: Final = VERSION_2
# X25519 + ML-KEM-768 hybrid, HKDF-SHA256, AES-256-GCM records, ML-DSA-65 authentication.
SUITE_HYBRID_V1: Final = 0x0001
SUPPORTED_VERSIONS: Final = (VERSION_2,)
SUPPORTED_SUITES: Final = (SUITE_HYBRID_V1,)

# Rekey defaults: a fresh hybrid KEM exchange every 2^16 records per direction or 15
# minutes, whichever comes first, so a key compromised from memory exposes a bounded window
# and an old key cannot decrypt later traffic. The hard cap per key is
# keyschedule.MAX_RECORDS_PER_KEY (2^23).
DEFAULT_REKEY_AFTER_RECORDS: Final = 65536
DEFAULT_REKEY_AFTER_SECONDS: Final = 900.0
# A session ends after this long and the client makes a full handshake again: the pinned
# keys are checked afresh (a trust change that the live check could not see, such as a key
# replaced on disk, applies within the hour) and no session outlives a day of rekeys.
DEFAULT_MAX_SESSION_LIFETIME: Final = 3600.0
# How long the server waits, after asking for a key update (its own rekey limit reached),
# before it closes a session whose client did not start one. A client answers at once; the
# grace absorbs a slow link, and bounds how long a non-conforming client keeps one key.
DEFAULT_REKEY_GRACE: Final = 30.0
# One application message: a CKKS ciphertext is ~330 KB and a public CKKS context without
# Galois keys ~1.9 MB; 16 MiB leaves room and still bounds what a peer makes us buffer.
MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
MIN_MESSAGE_SIZE_LIMIT: Final = 1024 * 1024
_HANDSHAKE_FRAMES = frozenset({FrameType.CLIENT_HELLO, FrameType.SERVER_HELLO})
# The signed ClientHello is ~4.6 KB, the ServerHello ~1.2 KB; refuse a bigger announced
# length before buffering it.
MAX_HELLO_BODY: Final = 8192
MAX_ALERT_BODY: Final = 1


class Role:
    CLIENT: Final = "client"
    SERVER: Final = "server"


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    peer_name: str


@dataclass(frozen=True, slots=True)
class Message:
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer closed the session cleanly (Close record, then EOF)."""

    reason: int = CloseReason.NORMAL


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
ChannelEvent = HandshakeComplete | Message | PeerClosed | _NeedData


@dataclass
class SessionStats:
    records_sent: int = 0
    records_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0  # application bytes
    bytes_received: int = 0
    wire_bytes_sent: int = 0  # everything written to the socket, handshake included
    wire_bytes_received: int = 0
    rekeys: int = 0


_CONTENT_EVENTS: Final = {
    ContentType.CLIENT_AUTH: Event.RECV_CLIENT_AUTH,
    ContentType.SERVER_AUTH: Event.RECV_SERVER_AUTH,
    ContentType.APP_FRAGMENT: Event.RECV_APP,
    ContentType.APP_FINAL: Event.RECV_APP,
    ContentType.KEY_UPDATE: Event.RECV_KEY_UPDATE,
    ContentType.KEY_UPDATE_RESPONSE: Event.RECV_KEY_UPDATE_RESPONSE,
    ContentType.KEY_UPDATE_DONE: Event.RECV_KEY_UPDATE_DONE,
    ContentType.KEY_UPDATE_REQUEST: Event.RECV_KEY_UPDATE_REQUEST,
    ContentType.CLOSE: Event.RECV_CLOSE,
}
# What a refused hello tells the client (in clear: the server has no keys yet). An attacker
# on the path could forge one, but it could as well cut the connection.
_ALERTS: Final = {
    "unknown_client": AlertReason.UNAUTHORIZED,
    "bad_signature": AlertReason.UNAUTHORIZED,
    "wrong_server": AlertReason.UNAUTHORIZED,
    "stale_hello": AlertReason.STALE_HELLO,
    "replayed_hello": AlertReason.STALE_HELLO,
    "hello_rate_limit": AlertReason.BUSY,
    "handshake_source_limit": AlertReason.BUSY,
    "handshake_limit": AlertReason.BUSY,
    "unsupported_version": AlertReason.UNSUPPORTED,
    "unsupported_suite": AlertReason.UNSUPPORTED,
}
_ALERT_TEXT: Final = {
    AlertReason.UNAUTHORIZED: "this client is not pinned there (unknown name, key, or another "
    "server name)",
    AlertReason.STALE_HELLO: "its clock and ours differ by more than a minute, or the hello "
    "was replayed (check NTP on both hosts)",
    AlertReason.BUSY: "too many handshakes from this client; retry later",
    AlertReason.UNSUPPORTED: "no common protocol version or suite",
}


class ChannelSession:
    """One end of one channel session. Not thread-safe; the asyncio adapter owns it."""

    def __init__(
        self,
        role: str,
        identity: ChannelIdentity,
        *,
        server_name: str | None = None,
        server_key: ChannelPublicKey | None = None,
        allowed_clients: Mapping[str, ChannelPublicKey] | None = None,
        kem: KemProvider | str | None = None,
        rekey_after_records: int = DEFAULT_REKEY_AFTER_RECORDS,
        rekey_after_seconds: float = DEFAULT_REKEY_AFTER_SECONDS,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_session_lifetime: float = DEFAULT_MAX_SESSION_LIFETIME,
        rekey_grace: float = DEFAULT_REKEY_GRACE,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        entropy: ks.Entropy = ks.SYSTEM_ENTROPY,
        replay_cache: HelloReplayCache | None = None,
        admit: Callable[[str], str | None] | None = None,
        offer_versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        offer_suites: tuple[int, ...] = SUPPORTED_SUITES,
    ) -> None:
        if role not in (Role.CLIENT, Role.SERVER):
            raise LocalProtocolError(f"role must be 'client' or 'server', not {role!r}")
        if not isinstance(identity, ChannelIdentity):
            raise LocalProtocolError("identity must be a ChannelIdentity (see load_identity)")
        if role == Role.CLIENT:
            if server_name is None or server_key is None:
                raise LocalProtocolError("a client pins server_name and server_key")
            validate_peer_name(server_name)
        elif allowed_clients is None:
            raise LocalProtocolError("a server needs allowed_clients {name: public key}")
        if not 1 <= rekey_after_records <= ks.MAX_RECORDS_PER_KEY // 4:
            raise LocalProtocolError(
                f"rekey_after_records must be 1..{ks.MAX_RECORDS_PER_KEY // 4}, "
                f"got {rekey_after_records}"
            )
        for name, value in (
            ("max_session_lifetime", max_session_lifetime),
            ("rekey_grace", rekey_grace),
        ):
            if not value > 0:
                raise LocalProtocolError(f"{name} must be > 0 seconds, got {value}")
        if not rekey_after_seconds > 0:
            raise LocalProtocolError(f"rekey_after_seconds must be > 0, got {rekey_after_seconds}")
        if max_message_size < MIN_MESSAGE_SIZE_LIMIT:
            raise LocalProtocolError(
                f"max_message_size must be >= {MIN_MESSAGE_SIZE_LIMIT}, got {max_message_size}"
            )
        self.role = role
        self.identity = identity
        self.server_name = server_name
        self._server_key = server_key
        self._allowed: Mapping[str, ChannelPublicKey] = (
            allowed_clients if allowed_clients is not None else {}
        )
        self._kem = select_kem_provider(kem)
        self.rekey_after_records = rekey_after_records
        self.rekey_after_seconds = rekey_after_seconds
        self.max_message_size = max_message_size
        self.max_session_lifetime = max_session_lifetime
        self.rekey_grace = rekey_grace
        # The most records one epoch may carry in one direction: the rekey point, twice
        # over (the sender waits there for the update), plus one message that was already
        # being sealed. Beyond it the peer is not rekeying and the session ends.
        self._epoch_record_limit = 2 * rekey_after_records + (
            math.ceil(max_message_size / MAX_FRAGMENT_SIZE) + 1
        )
        self._clock = clock
        self._wall_clock = wall_clock
        self._entropy = entropy
        self._replay_cache = replay_cache if replay_cache is not None else HelloReplayCache()
        # server: the adapter's last word on a verified hello (its connection limits),
        # asked before the KEM; returns a refusal reason or None
        self._admit = admit
        self._offer_versions = offer_versions
        self._offer_suites = offer_suites
        self._table = CLIENT_TRANSITIONS if role == Role.CLIENT else SERVER_TRANSITIONS
        self.state = State.START if role == Role.CLIENT else State.WAIT_CLIENT_HELLO
        self.peer_name: str | None = None
        self.version: int | None = None
        self.suite: int | None = None
        self.epoch = 0
        self.stats = SessionStats()
        self._in = bytearray()
        self._eof = False
        self._out = bytearray()
        self._events: deque[ChannelEvent] = deque()
        self._error: ChannelError | None = None
        self._transcript = hashlib.sha256()
        # public transcript hashes (not secrets), for diagnostics and the test vectors
        self.th_hello: bytes | None = None
        self.th_full: bytes | None = None
        self._hello_client: str | None = None  # server: who signed the ClientHello
        self._pinned_key: bytes | None = None  # server: the client's key when it proved it
        self._pinned_obj: object = None  # the mapping's key object then (fast path)
        self._established_at = 0.0
        self._ku_requested_at: float | None = None  # server: when it asked for a key update
        self._initiator: ks.HybridInitiator | None = None
        self._hs_secret: bytes | None = None
        self._master: bytes | None = None
        self._send: ks.RecordProtection | None = None
        self._recv: ks.RecordProtection | None = None
        self._pending_recv: ks.RecordProtection | None = None
        self._ku_request: bytes | None = None
        self._epoch_started = 0.0
        self._epoch_sent = 0
        self._epoch_received = 0
        # one message being reassembled: a bytearray, so that many tiny fragments cost
        # their bytes and nothing per fragment
        self._partial = bytearray()

    @classmethod
    def client(
        cls,
        identity: ChannelIdentity,
        *,
        server_name: str,
        server_key: ChannelPublicKey,
        **options: object,
    ) -> ChannelSession:
        return cls(
            Role.CLIENT,
            identity,
            server_name=server_name,
            server_key=server_key,
            **options,  # type: ignore[arg-type]
        )

    @classmethod
    def server(
        cls,
        identity: ChannelIdentity,
        *,
        allowed_clients: Mapping[str, ChannelPublicKey],
        **options: object,
    ) -> ChannelSession:
        return cls(Role.SERVER, identity, allowed_clients=allowed_clients, **options)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- public API

    @property
    def established(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def error(self) -> ChannelError | None:
        return self._error

    def initiate(self) -> bytes:
        """Client: the ClientHello to write first."""
        if self.role != Role.CLIENT:
            raise LocalProtocolError("only a client initiates")
        nxt = self._local(Event.SEND_CLIENT_HELLO)
        self._initiator = ks.HybridInitiator(self._kem, self._entropy)
        if self.server_name is None:
            raise InvariantError("self.server_name unset here")
        unsigned = ClientHello(
            self._offer_versions,
            self._offer_suites,
            self._entropy.random(RANDOM_SIZE),
            int(self._wall_clock() * 1000),
            self.identity.name,
            self.server_name,
            self._initiator.x25519_public,
            self._initiator.kem_public,
        )
        sig = self._entropy.sign(
            self.identity.private_key, ks.HELLO_SIGNATURE_CONTEXT, unsigned.signed_part()
        )
        hello = dataclasses.replace(unsigned, signature=sig)
        raw = frame(FrameType.CLIENT_HELLO, hello.encode())
        self._transcript.update(raw)
        self._out += raw
        self.state = nxt
        return self.data_to_send()

    def send(self, message: bytes) -> bytes:
        """Encrypt one application message (fragmented into records); returns the bytes to
        write (with anything else pending, e.g. a key update)."""
        if len(message) > self.max_message_size:
            raise LocalProtocolError(
                f"message of {len(message)} bytes exceeds max_message_size {self.max_message_size}"
            )
        self._local(Event.SEND_APP)
        view = memoryview(message)
        n = len(message)
        pos = 0
        try:
            self._check_limits(sending=True)
            self._maybe_rekey()
            while True:
                chunk = view[pos : pos + MAX_FRAGMENT_SIZE]
                pos += len(chunk)
                last = pos >= n
                ctype = ContentType.APP_FINAL if last else ContentType.APP_FRAGMENT
                self._seal(bytes([ctype]) + chunk)
                if last:
                    break
            if self.role == Role.SERVER:
                self._maybe_rekey()  # ask at once if this message reached the limit
        except ChannelError as exc:  # a limit of ours (lifetime, key exhausted, trust)
            self._fail(exc)
            raise
        self.stats.messages_sent += 1
        self.stats.bytes_sent += n
        return self.data_to_send()

    def close(self, reason: int = CloseReason.NORMAL) -> bytes:
        """Close cleanly (a Close record, so the peer can tell it from a truncation)."""
        if self.state in OPEN_STATES:
            self.state = self._local(Event.SEND_CLOSE)
            try:
                self._seal(bytes([ContentType.CLOSE, reason]))
            except ChannelError as exc:  # this key is used up: no Close record is possible
                self._fail(exc)
                return b""
        elif self.state not in (State.ERROR, State.CLOSED):
            self.state = State.CLOSED
        return self.data_to_send()

    def poll(self) -> bytes:
        """Apply the time-driven rules without traffic (the asyncio adapter calls it on a
        timer): rekey on time (client: KeyUpdate; server: ask for one), end the session at
        its maximum lifetime, when its client is no longer pinned, or when a client did not
        rekey when asked. Returns the bytes to write; raises :class:`ChannelError` (a Close
        record for the peer is then in :meth:`data_to_send`) when the session must end."""
        if self.state not in OPEN_STATES:
            return b""
        try:
            self._check_limits(sending=False)
            self._maybe_rekey()
        except ChannelError as exc:
            self._fail(exc)
            raise
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        self.stats.wire_bytes_sent += len(out)
        return out

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket; ``b""`` means EOF."""
        if self.state in (State.CLOSED, State.ERROR):
            return
        if data:
            self._in += data
            self.stats.wire_bytes_received += len(data)
        else:
            self._eof = True

    def next_event(self) -> ChannelEvent:
        """The next event, ``NEED_DATA`` if more bytes are needed, or :class:`ChannelError`."""
        if self._error is not None:
            raise ChannelError(f"session already failed: {self._error}", reason=self._error.reason)
        try:
            while not self._events:
                if self.state == State.CLOSED:
                    return PeerClosed()
                if not self._process_one_frame():
                    if self._eof:
                        self._on_eof()
                        continue
                    return NEED_DATA
            return self._events.popleft()
        except ChannelError as exc:
            self._fail(exc)
            raise

    # ---------------------------------------------------------------- state table

    def _local(self, event: Event) -> State:
        nxt = self._table.get((self.state, event))
        if nxt is None:
            raise LocalProtocolError(f"cannot {event.value} in state {self.state.value}")
        return nxt

    def _remote(self, event: Event) -> State:
        nxt = self._table.get((self.state, event))
        if nxt is None:
            raise ChannelError(
                f"unexpected {event.value} in state {self.state.value}",
                reason="unexpected_message",
            )
        return nxt

    def _fail(self, exc: ChannelError) -> None:
        """The one way into ERROR: every key and secret of this session is dropped (Python
        cannot zeroise them, but nothing refers to them any more)."""
        self._error = exc
        self.state = State.ERROR
        self._in.clear()
        self._partial.clear()
        self._initiator = None
        self._master = self._hs_secret = None
        self._send = self._recv = self._pending_recv = None
        self._ku_request = None

    # ---------------------------------------------------------------- framing

    def _process_one_frame(self) -> bool:
        buf = self._in
        if len(buf) < FRAME_HEADER_SIZE:
            return False
        ftype, length = FRAME_HEADER.unpack_from(buf, 0)
        if ftype in _HANDSHAKE_FRAMES:
            if length > MAX_HELLO_BODY:
                raise ChannelError(f"hello of {length} bytes", reason="frame_too_large")
            expected = (
                Event.RECV_CLIENT_HELLO
                if ftype == FrameType.CLIENT_HELLO
                else Event.RECV_SERVER_HELLO
            )
            self._remote(expected)
        elif ftype == FrameType.ALERT:
            if self.role != Role.CLIENT or self.state is not State.WAIT_SERVER_HELLO:
                raise ChannelError(
                    f"alert in state {self.state.value}", reason="unexpected_message"
                )
            if length != MAX_ALERT_BODY:
                raise ChannelError(f"alert of {length} bytes", reason="malformed")
        elif ftype == FrameType.RECORD:
            if self._recv is None:
                raise ChannelError(
                    f"record in state {self.state.value}", reason="unexpected_message"
                )
            if length > MAX_FRAME_BODY:
                raise ChannelError(f"record of {length} bytes", reason="frame_too_large")
        else:
            raise ChannelError(f"unknown frame type 0x{ftype:02x}", reason="malformed")
        end = FRAME_HEADER_SIZE + length
        if len(buf) < end:
            return False
        raw = bytes(buf[:end])
        del buf[:end]
        if ftype == FrameType.CLIENT_HELLO:
            self._on_client_hello(raw)
        elif ftype == FrameType.ALERT:
            self._on_alert(raw[FRAME_HEADER_SIZE])
        elif ftype == FrameType.SERVER_HELLO:
            self._on_server_hello(raw)
        else:
            self._on_record(raw)
        return True

    def _on_eof(self) -> None:
        if self._in:
            raise ChannelError("connection closed inside a frame", reason="truncated")
        if self.state in OPEN_STATES:
            raise ChannelError("connection closed without a Close record", reason="truncated")
        raise ChannelError(
            f"connection closed during the handshake ({self.state.value})",
            reason="handshake_eof",
        )

    def _seal(self, inner: bytes) -> None:
        if self._send is None:
            raise InvariantError("self._send unset here")
        header = FRAME_HEADER.pack(FrameType.RECORD, len(inner) + ks.TAG_SIZE)
        self._out += header
        self._out += self._send.seal(header, inner)
        self.stats.records_sent += 1
        self._epoch_sent += 1

    def _on_record(self, raw: bytes) -> None:
        if self._recv is None:
            raise InvariantError("self._recv unset here")
        inner = self._recv.open(raw[:FRAME_HEADER_SIZE], raw[FRAME_HEADER_SIZE:])
        self.stats.records_received += 1
        self._epoch_received += 1
        if not inner:
            raise ChannelError("empty record", reason="malformed")
        try:
            ctype = ContentType(inner[0])
        except ValueError:
            raise ChannelError(
                f"unknown content type 0x{inner[0]:02x}", reason="malformed"
            ) from None
        payload = inner[1:]
        event = _CONTENT_EVENTS[ctype]
        if event is Event.RECV_CLOSE and self.state not in OPEN_STATES:
            if self.role == Role.CLIENT:
                raise ChannelError(
                    "the server refused this client (unknown name or key not pinned there)",
                    reason="refused_by_peer",
                )
            raise ChannelError("the client gave up during the handshake", reason="handshake_eof")
        nxt = self._remote(event)
        if ctype is ContentType.CLIENT_AUTH:
            self._on_client_auth(inner, payload)
        elif ctype is ContentType.SERVER_AUTH:
            self._on_server_auth(inner, payload)
        elif ctype is ContentType.APP_FRAGMENT or ctype is ContentType.APP_FINAL:
            self._on_app(ctype, payload)
        elif ctype is ContentType.KEY_UPDATE:
            self._on_key_update(inner, payload)
        elif ctype is ContentType.KEY_UPDATE_RESPONSE:
            self._on_key_update_response(inner, payload)
        elif ctype is ContentType.KEY_UPDATE_DONE:
            if payload:
                raise ChannelError("KeyUpdateDone with a payload", reason="malformed")
            self._recv, self._pending_recv = self._pending_recv, None
            self._epoch_received = 0  # the receive key changes here, the send key did before
        elif ctype is ContentType.KEY_UPDATE_REQUEST:
            if payload:
                raise ChannelError("KeyUpdateRequest with a payload", reason="malformed")
            if self.state is State.ESTABLISHED:  # in REKEYING one is already under way
                self._start_rekey()
        elif ctype is ContentType.CLOSE:
            self._events.append(PeerClosed(payload[0] if payload else CloseReason.NORMAL))
        self.state = nxt
        if self.state in OPEN_STATES:
            self._check_limits(sending=False)
            self._maybe_rekey()

    # ---------------------------------------------------------------- handshake

    def _on_client_hello(self, raw: bytes) -> None:
        nxt = self._remote(Event.RECV_CLIENT_HELLO)
        try:
            hello, version, suite = self._admit_client_hello(raw)
        except ChannelError as exc:
            alert = _ALERTS.get(exc.reason)
            if alert is not None:
                self._out += frame(FrameType.ALERT, bytes([alert]))
            raise
        shared, x_pub, ct = ks.hybrid_respond(
            self._kem, hello.x25519_public, hello.kem_public, self._entropy
        )
        self.version, self.suite = version, suite
        reply = ServerHello(version, suite, self._entropy.random(RANDOM_SIZE), x_pub, ct)
        raw_reply = frame(FrameType.SERVER_HELLO, reply.encode())
        self._transcript.update(raw)
        self._transcript.update(raw_reply)
        self._start_handshake_keys(shared)
        self._out += raw_reply
        self.state = nxt

    def _admit_client_hello(self, raw: bytes) -> tuple[ClientHello, int, int]:
        """The admission checks, cheapest first, all before any KEM or state: a hello that
        no pinned client signed for this server, just now, is refused."""
        hello = ClientHello.decode(raw[FRAME_HEADER_SIZE:])
        common = [v for v in hello.versions if v in SUPPORTED_VERSIONS]
        if not common:
            raise ChannelError(
                f"no common protocol version in {hello.versions}", reason="unsupported_version"
            )
        suite = next((s for s in hello.suites if s in SUPPORTED_SUITES), None)
        if suite is None:
            raise ChannelError(f"no common suite in {hello.suites}", reason="unsupported_suite")
        if hello.server_name != self.identity.name:
            raise ChannelError(
                f"client {hello.client_name[:64]!r} meant server {hello.server_name[:64]!r}, "
                f"this is {self.identity.name!r} (relayed handshake?)",
                reason="wrong_server",
            )
        key = self._allowed.get(hello.client_name)
        if key is None:
            raise ChannelError(
                f"client {hello.client_name[:64]!r} is not allowed", reason="unknown_client"
            )
        now = self._wall_clock()
        hello_time = hello.time_ms / 1000
        refusal = self._replay_cache.refusal(hello.client_name, hello.random, hello_time, now)
        if refusal is not None:
            raise ChannelError(
                f"hello of {hello.client_name!r} refused ({refusal}): its time is "
                f"{hello_time - now:+.1f}s from ours",
                reason=refusal,
            )
        if not ks.verify_transcript(
            key, ks.HELLO_SIGNATURE_CONTEXT, hello.signed_part(), hello.signature
        ):
            raise ChannelError(
                f"hello of {hello.client_name!r} is not signed by its pinned key",
                reason="bad_signature",
            )
        self._replay_cache.admit(hello.client_name, hello.random, hello_time)
        if self._admit is not None and (refusal := self._admit(hello.client_name)) is not None:
            raise ChannelError(
                f"hello of {hello.client_name!r} refused: too many handshakes in flight",
                reason=refusal,
            )
        self._hello_client = hello.client_name
        return hello, max(common), suite

    def _on_alert(self, code: int) -> None:
        try:
            text = _ALERT_TEXT[AlertReason(code)]
        except ValueError:
            text = f"alert {code}"
        raise ChannelError(f"the server refused the handshake: {text}", reason="refused_by_peer")

    def _start_handshake_keys(self, shared: bytes) -> None:
        th_hello = self.th_hello = self._transcript.digest()
        self._hs_secret = ks.handshake_secret(shared, th_hello)
        c_hs, s_hs = ks.handshake_keys(self._hs_secret, th_hello)
        mine, theirs = (c_hs, s_hs) if self.role == Role.CLIENT else (s_hs, c_hs)
        self._send = ks.RecordProtection(mine)
        self._recv = ks.RecordProtection(theirs)

    def _on_server_hello(self, raw: bytes) -> None:
        nxt = self._remote(Event.RECV_SERVER_HELLO)
        hello = ServerHello.decode(raw[FRAME_HEADER_SIZE:])
        # The server must pick from what we offered and what we implement; an attacker who
        # rewrote our offer is caught by the transcript (the keys and signatures differ).
        if hello.version not in self._offer_versions or hello.version not in SUPPORTED_VERSIONS:
            raise ChannelError(
                f"server chose version {hello.version:#06x}", reason="unsupported_version"
            )
        if hello.suite not in self._offer_suites or hello.suite not in SUPPORTED_SUITES:
            raise ChannelError(f"server chose suite {hello.suite:#06x}", reason="unsupported_suite")
        if self._initiator is None:
            raise InvariantError("self._initiator unset here")
        shared = self._initiator.finish(hello.x25519_public, hello.kem_ciphertext)
        self._initiator = None
        self.version, self.suite = hello.version, hello.suite
        self._transcript.update(raw)
        self._start_handshake_keys(shared)
        # ClientAuth: our name and a signature over the transcript up to and including it
        prefix = bytes([ContentType.CLIENT_AUTH]) + PeerAuth.name_bytes(self.identity.name)
        th = self._transcript.copy()
        th.update(prefix)
        sig = ks.sign_transcript(
            self.identity.private_key, ks.CLIENT_SIGNATURE_CONTEXT, th.digest(), self._entropy
        )
        inner = bytes([ContentType.CLIENT_AUTH]) + PeerAuth(self.identity.name, sig).encode()
        self._seal(inner)
        self._transcript.update(inner)
        self.state = nxt

    def _on_client_auth(self, inner: bytes, payload: bytes) -> None:
        auth = PeerAuth.decode(payload, "ClientAuth")
        if auth.name != self._hello_client:
            self._refuse()
            raise ChannelError(
                f"ClientAuth names {auth.name[:64]!r}, the hello was {self._hello_client!r}",
                reason="bad_signature",
            )
        key = self._allowed.get(auth.name)
        if key is None:  # un-pinned between its hello and now
            self._refuse()
            raise ChannelError(f"client {auth.name[:64]!r} is not allowed", reason="unknown_client")
        th = self._transcript.copy()
        th.update(bytes([ContentType.CLIENT_AUTH]) + PeerAuth.name_bytes(auth.name))
        if not ks.verify_transcript(key, ks.CLIENT_SIGNATURE_CONTEXT, th.digest(), auth.signature):
            self._refuse()
            raise ChannelError(
                f"client {auth.name!r} failed to prove its identity", reason="bad_signature"
            )
        self._transcript.update(inner)
        prefix = bytes([ContentType.SERVER_AUTH]) + PeerAuth.name_bytes(self.identity.name)
        th = self._transcript.copy()
        th.update(prefix)
        sig = ks.sign_transcript(
            self.identity.private_key, ks.SERVER_SIGNATURE_CONTEXT, th.digest(), self._entropy
        )
        reply = bytes([ContentType.SERVER_AUTH]) + PeerAuth(self.identity.name, sig).encode()
        self._seal(reply)
        self._transcript.update(reply)
        self._pinned_key, self._pinned_obj = key.public_bytes_raw(), key
        self._establish(auth.name)

    def _refuse(self) -> None:
        self._seal(bytes([ContentType.CLOSE, CloseReason.UNAUTHORIZED]))

    def _on_server_auth(self, inner: bytes, payload: bytes) -> None:
        auth = PeerAuth.decode(payload, "ServerAuth")
        if auth.name != self.server_name:
            raise ChannelError(
                f"server calls itself {auth.name[:64]!r}, expected {self.server_name!r}",
                reason="bad_server_identity",
            )
        th = self._transcript.copy()
        th.update(bytes([ContentType.SERVER_AUTH]) + PeerAuth.name_bytes(auth.name))
        if self._server_key is None:
            raise InvariantError("self._server_key unset here")
        if not ks.verify_transcript(
            self._server_key, ks.SERVER_SIGNATURE_CONTEXT, th.digest(), auth.signature
        ):
            raise ChannelError(
                f"server {auth.name!r} does not hold the pinned key (impostor?)",
                reason="bad_server_identity",
            )
        self._transcript.update(inner)
        self._establish(auth.name)

    def _establish(self, peer: str) -> None:
        if self._hs_secret is None:
            raise InvariantError("self._hs_secret unset here")
        self.th_full = self._transcript.digest()
        self._master = ks.master_secret(self._hs_secret, self.th_full)
        self._hs_secret = None
        self._install_epoch_keys(both=True)
        self._established_at = self._clock()
        self.peer_name = peer
        self._events.append(HandshakeComplete(peer))

    def _install_epoch_keys(self, *, both: bool) -> None:
        if self._master is None:
            raise InvariantError("self._master unset here")
        c_ap, s_ap = ks.application_keys(self._master, self.epoch)
        mine, theirs = (c_ap, s_ap) if self.role == Role.CLIENT else (s_ap, c_ap)
        self._send = ks.RecordProtection(mine)
        # each counter counts the records of one key: the send key changes now, the
        # receive key now (both) or at KeyUpdateDone (the server)
        self._epoch_started = self._clock()
        self._epoch_sent = 0
        self._ku_requested_at = None
        if both:
            self._recv = ks.RecordProtection(theirs)
            self._epoch_received = 0
        else:
            self._pending_recv = ks.RecordProtection(theirs)

    # ---------------------------------------------------------------- application data

    def _on_app(self, ctype: ContentType, payload: bytes) -> None:
        if not payload and ctype is ContentType.APP_FRAGMENT:
            # a sender never makes one (only an empty message is an empty AppFinal); they
            # would let a peer keep us busy without ever reaching max_message_size
            raise ChannelError("empty AppFragment", reason="malformed")
        if len(self._partial) + len(payload) > self.max_message_size:
            raise ChannelError(
                f"message exceeds {self.max_message_size} bytes", reason="message_too_large"
            )
        self._partial += payload
        if ctype is ContentType.APP_FINAL:
            data = bytes(self._partial)
            self._partial.clear()
            self.stats.messages_received += 1
            self.stats.bytes_received += len(data)
            self._events.append(Message(data))

    # ---------------------------------------------------------------- rekey

    def _epoch_used_up(self) -> bool:
        return (
            self._epoch_sent >= self.rekey_after_records
            or self._epoch_received >= self.rekey_after_records
            or self._clock() - self._epoch_started >= self.rekey_after_seconds
        )

    def rekey_due(self) -> bool:
        """This end's rekey limit is reached: the client starts a key update, the server
        asks for one (once per epoch)."""
        if self.state is not State.ESTABLISHED or not self._epoch_used_up():
            return False
        return self.role == Role.CLIENT or self._ku_requested_at is None

    def rekey_overdue(self) -> bool:
        """A key update is due or in flight and this key has already protected twice the
        configured number of records; the sender should wait for the update to finish
        (the asyncio adapter does), so that one key never protects more than that."""
        if self._epoch_sent < 2 * self.rekey_after_records:
            return False
        if self.role == Role.CLIENT:
            return self.state is State.REKEYING
        # the server: it asked and waits for the client's KeyUpdate, or the new key is
        # already used up before the client's KeyUpdateDone came back
        return self.state is State.REKEY_RESPONDED or (
            self.state is State.ESTABLISHED and self._ku_requested_at is not None
        )

    def _maybe_rekey(self) -> None:
        if not self.rekey_due():
            return
        if self.role == Role.CLIENT:
            self._start_rekey()
        else:
            self._local(Event.SEND_KEY_UPDATE_REQUEST)
            self._ku_requested_at = self._clock()
            self._seal(bytes([ContentType.KEY_UPDATE_REQUEST]))

    # ---------------------------------------------------------------- limits

    def _check_limits(self, *, sending: bool) -> None:
        """End the session (Close record for the peer, then ChannelError) when trust or a
        limit says so. Cheap: called for every record and every message sent."""
        now = self._clock()
        if now - self._established_at >= self.max_session_lifetime:
            self._end(
                f"session with {self.peer_name} reached its maximum lifetime of "
                f"{self.max_session_lifetime:g}s; a new handshake re-authenticates",
                "session_expired",
                CloseReason.EXPIRED,
            )
        if self.role == Role.SERVER and self._unpinned():
            self._end(
                f"client {self.peer_name!r} is no longer in allowed_clients (or its key "
                "changed); its session is closed",
                "client_unpinned",
                CloseReason.UNAUTHORIZED,
            )
        if (
            self._ku_requested_at is not None and now - self._ku_requested_at >= self.rekey_grace
        ) or max(self._epoch_sent + (1 if sending else 0), self._epoch_received) > (
            self._epoch_record_limit
        ):
            self._end(
                f"{self.peer_name} did not rekey in time (epoch {self.epoch}: "
                f"{self._epoch_sent} records sent, {self._epoch_received} received)",
                "rekey_overdue",
                CloseReason.EXPIRED,
            )

    def _unpinned(self) -> bool:
        if self.peer_name is None:
            raise InvariantError("self.peer_name unset here")
        key = self._allowed.get(self.peer_name)
        if key is self._pinned_obj:
            return False
        return key is None or key.public_bytes_raw() != self._pinned_key

    def _end(self, message: str, reason: str, close: int) -> None:
        if self._send is not None:
            self._seal(bytes([ContentType.CLOSE, close]))
        raise ChannelError(message, reason=reason)

    def request_rekey(self) -> bytes:
        """Client: start a key update now (normally automatic, see ``rekey_after_*``)."""
        self._start_rekey()
        return self.data_to_send()

    def _start_rekey(self) -> None:
        if self.role != Role.CLIENT:
            raise LocalProtocolError("the client starts key updates")
        nxt = self._local(Event.SEND_KEY_UPDATE)
        self._initiator = ks.HybridInitiator(self._kem, self._entropy)
        share = KeyShare(self._initiator.x25519_public, self._initiator.kem_public)
        inner = bytes([ContentType.KEY_UPDATE]) + share.encode()
        self._seal(inner)
        self._ku_request = inner
        self.state = nxt

    def _on_key_update(self, inner: bytes, payload: bytes) -> None:
        share = KeyShare.decode(payload, "KeyUpdate")
        shared, x_pub, ct = ks.hybrid_respond(self._kem, share.x25519, share.kem, self._entropy)
        reply = bytes([ContentType.KEY_UPDATE_RESPONSE]) + KeyShare(x_pub, ct).encode()
        self._next_master(shared, inner, reply)
        self._seal(reply)  # last record under the old key
        self._install_epoch_keys(both=False)

    def _on_key_update_response(self, inner: bytes, payload: bytes) -> None:
        share = KeyShare.decode(payload, "KeyUpdateResponse")
        if self._initiator is None or self._ku_request is None:
            raise InvariantError("self._initiator, self._ku_request unset here")
        shared = self._initiator.finish(share.x25519, share.kem)
        self._initiator = None
        self._next_master(shared, self._ku_request, inner)
        self._ku_request = None
        self._seal(bytes([ContentType.KEY_UPDATE_DONE]))  # last record under the old key
        self._install_epoch_keys(both=True)

    def _next_master(self, shared: bytes, request: bytes, response: bytes) -> None:
        if self._master is None:
            raise InvariantError("self._master unset here")
        th_ku = ks.transcript_hash(request + response)
        self._master = ks.next_master_secret(self._master, shared, th_ku)
        self.epoch += 1
        self.stats.rekeys += 1

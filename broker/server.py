"""``pacegate broker -c broker.yaml``: amqtt, made to enforce mutual TLS for real.

What this adds to amqtt 0.12.1 (whose listener uses ``CERT_OPTIONAL``):

- the TLS context comes from :func:`pacegate.tlsconf.server_context`: ``CERT_REQUIRED``,
  TLS >= 1.2, CRL checked on the leaf; a handshake without a valid client certificate fails;
- :class:`RevocationGuard` watches ``crl.pem``: when it changes, a fresh context is built
  (each connection's handshake uses the newest one, so a revoked device's new handshakes
  fail) and live sessions whose certificate is now revoked are closed, without a restart;
- the CONNECT's client id is checked against the *connection's* certificate before amqtt
  touches any session: stock amqtt deletes the old session of a clean-session client id,
  hands a persistent one (``clean_session=False``, with the previous connection's
  certificate in ``ssl_object``) to the newcomer, copying its will into it, and takes over a
  connected one, all before it looks at the authentication result;
- a CONNECT carrying a will is refused (amqtt broadcasts a will without the publish ACL;
  no pacegate client sets one);
- limits: connections are counted from the TCP accept (TLS handshake included); beyond
  ``max_connections`` the oldest connection that has not yet sent its CONNECT is evicted,
  else the newcomer is refused (never queued); one source address holds at most
  :data:`MAX_PENDING_PER_SOURCE` such pending connections (its oldest is evicted); the TLS
  handshake and the CONNECT each have a timeout, a packet larger than ``max_payload``
  (plus header room) closes the connection before it is buffered;
- every refusal is a :func:`pacegate.log.security_event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
from functools import partial
from typing import Any

from cryptography import x509

from broker import packets
from broker.amqtt_api import (
    Action,
    AMQTTError,
    Broker,
    BrokerProtocolHandler,
    BufferReader,
    IncomingApplicationMessage,
    ListenerType,
    MQTTError,
    NoDataError,
    ReaderAdapter,
    Server,
    Session,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WriterAdapter,
)
from broker.config import BrokerConfig
from broker.delivery import (
    MAX_AWAITING_GATEWAY,
    DeliveringHandler,
    GatewayAcks,
    TrackedPayload,
    compact,
)
from broker.plugins import (
    CERT_KEY,
    COMPONENT,
    CONN_CERT,
    IDENTITY_KEY,
    SERIAL_KEY,
    CertIdentityAuthPlugin,
    TopicAclPlugin,
    session_identity,
)
from broker.strict import StrictHandler, packet_type_name, read_frame
from pacegate.admission import AdmissionPolicy, Admitted, Limit, Ticket, WhenFull, source_key
from pacegate.filewatch import FileWatch, ticks
from pacegate.log import flush_security_events, security_event
from pacegate.tlsconf import allows_client_auth, peer_identity, server_context

log = logging.getLogger("pacegate.broker")

# Room for the fixed header, topic and packet id around a payload of max_payload bytes
# (a topic is at most ~100 bytes here; MQTT allows 65535, we do not need that).
PACKET_OVERHEAD = 512
READY_MESSAGE = "pacegate broker listening on %s:%d (mTLS required, CRL %s)"

# Connections from one source address (an IPv6 /64 counts as one) that may be pending at
# once: accepted but without a CONNECT read yet (in the TLS handshake, or between it and the
# CONNECT). At the cap, that source's oldest pending connection is evicted to admit the new
# one, so one host holds at most this many slots with stalled sockets, however fast it
# opens them. Established sessions do not count. A genuine client is pending for one TLS
# handshake plus one round trip (milliseconds); the device simulator starts at most 64
# handshakes at once (device_sim.fleet.DEFAULT_CONNECT_CONCURRENCY), a whole 200-device
# test fleet fits at once, and many gateways behind one NAT reconnecting in the same instant
# would see their oldest attempts evicted, which they retry like any failed connect.
MAX_PENDING_PER_SOURCE = 256

# Packets written to one connection in one event-loop turn leave as one write (one TLS
# record, one send): under load amqtt writes each PUBLISH and PUBACK on its own, and the
# per-write cost (a record, a syscall, the peer's wake-up) was most of the broker's time.
# Past this many bytes pending the write goes out at once, so that the transport's buffer
# (and so drain()'s backpressure) sees it; 64 KiB is four full TLS records.
COALESCE_MAX_BYTES = 64 * 1024
# Broadcasts taken from amqtt's queue in one pass of its broadcast loop (which paid a task
# and an asyncio.wait per message): the relays of one pass are written in one turn, and so
# coalesce (above). Bounded so that one pass cannot hold the loop for long.
BROADCASTS_PER_PASS = 256
# ACL decisions that allowed, remembered by (identity, action, topic): pacegate.acl is a pure
# function of these (and of the gateway identity, fixed per broker), so an allowed publish or
# delivery need not go through amqtt's plugin manager again (~7 % of the broker's CPU under
# load, docs/benchmarks.md). A refusal is never remembered: it goes through the plugin each
# time, so each one is logged. Cleared when full: a device has one telemetry topic, so this
# is ~2 entries per device and the gateway's; 2,000 devices use a tenth of it.
ACL_ALLOWED_CACHE_MAX = 50_000

# The certificate identity of the connection handled by the current task.
_CONN_IDENTITY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pacegate_conn_identity", default=None
)


class _Conn:
    """One accepted TCP connection, counted from the accept until it closes."""

    __slots__ = ("done", "evicted", "identity", "remote", "serial", "source", "ticket", "writer")

    def __init__(self, source: str, remote: str, writer: asyncio.StreamWriter) -> None:
        self.source = source
        self.remote = remote
        self.writer = writer
        self.evicted = False  # closed by us to admit a newer connection (already logged)
        # its slot in the broker's admission policy: pending until its CONNECT is read
        self.ticket: Ticket[_Conn] | None = None
        # set once its CONNECT is admitted: the certificate identity and serial it holds
        self.identity: str | None = None
        self.serial: int | None = None
        self.done = asyncio.Event()  # set when the connection has been wholly torn down

    def abort(self) -> None:
        """Cut the TCP connection now: amqtt's reader sees the end, whatever its state."""
        self.writer.transport.abort()


class _Admission:
    """The lock that admits one connection of an identity at a time, and how many wait."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


# The connection handled by the current task.
_CONN: contextvars.ContextVar[_Conn | None] = contextvars.ContextVar("pacegate_conn", default=None)


def _serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def _serial_or_none(der: bytes | None) -> int | None:
    """The serial of a certificate, None without one (the plaintext benchmark has none)."""
    if not der:
        return None
    with contextlib.suppress(ValueError):
        return _serial_of(der)
    return None


# A CONNECT for a client id that is connected closes the older connection (MQTT-3.1.4-2)
# and waits this long for it to be torn down (its session released) before admitting the
# newcomer. The old socket is aborted at once, so this is only the time amqtt's tasks
# take to notice (milliseconds); past it the newcomer goes on regardless.
TAKEOVER_WAIT = 5.0
# The broker grants at most QoS 1 (MQTT-3.8.4-6 lets it grant less than asked): no
# outgoing QoS 2 flow exists, so a client's PUBREC/PUBREL/PUBCOMP is a protocol error and
# no QoS 2 state can grow per connection (broker.packets).
MAX_GRANTED_QOS = 1


class RevocationGuard:
    """Holds the listener's current TLS context and revoked serials; reloads on CRL change."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self._watch = FileWatch(cfg.tls.crl)
        self.revoked: frozenset[int] = frozenset()
        self.context = self._build()

    def _build(self) -> ssl.SSLContext:
        from pacegate.pki.crl import revoked_serials

        t = self.cfg.tls
        revoked = revoked_serials(t.crl)
        context = server_context(t.cert, t.key, t.ca, crl=t.crl)
        self.revoked = revoked
        return context

    def is_revoked_der(self, der: bytes) -> bool:
        return _serial_of(der) in self.revoked

    def reload_if_changed(self) -> frozenset[int] | None:
        """Rebuild when crl.pem changed; return the serials revoked since the last load."""
        if not self._watch.changed():
            return None
        before = self.revoked
        try:
            self.context = self._build()
        except Exception as exc:  # a half-written or bad CRL: keep the previous one
            log.error("CRL %s not reloaded (keeping the previous one): %s", self.cfg.tls.crl, exc)
            return None
        log.info("CRL reloaded: %d revoked certificate(s)", len(self.revoked))
        return self.revoked - before


async def _quiet_close(writer: WriterAdapter) -> None:
    """Close a refused connection; the peer may already have gone (that is fine)."""
    with contextlib.suppress(Exception):
        await writer.close()


def _handshake_reason(exc: BaseException) -> str:
    """A short stable reason for a failed handshake (OpenSSL's reason code when known)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate_verify_failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower()
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "handshake_timeout"
    return type(exc).__name__


class _BoundedReader(StreamReaderAdapter):  # type: ignore[misc]
    """Refuses any single read larger than the packet limit, before buffering it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int
    ) -> None:
        super().__init__(reader)
        self._writer = writer
        self._limit = limit
        self.refused = False

    async def read(self, n: int = -1) -> bytes:
        if n > self._limit:
            self.refused = True
            security_event(
                "packet_refused",
                component=COMPONENT,
                reason="packet_too_large",
                peer=_CONN_IDENTITY.get(),
                size=n,
                limit=self._limit,
            )
            # amqtt's reader loop swallows read errors and goes on parsing; cut the
            # connection so that the rest of the oversized packet is never read at all.
            self._writer.transport.abort()
            raise asyncio.IncompleteReadError(b"", n)
        data: bytes = await super().read(n)
        return data


class CoalescingWriter(StreamWriterAdapter):  # type: ignore[misc]
    """Joins the packets written in one event-loop turn into one write (see
    :data:`COALESCE_MAX_BYTES`). Order is kept: every write goes through the one list, and
    :meth:`close` writes what is pending before closing."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= COALESCE_MAX_BYTES:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if not self.is_closed and not self._writer.is_closing():
            self._writer.write(data)

    async def close(self) -> None:
        self._flush()
        await super().close()


class PacegateBroker(Broker):  # type: ignore[misc]
    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self.guard = RevocationGuard(cfg)
        super().__init__(amqtt_config(cfg), plugin_namespace="pacegate.broker.plugins")
        self._watch_task: asyncio.Task[None] | None = None
        # every connection from the TCP accept until it is closed or evicted, counted
        # against max_connections; pending (evictable) until its CONNECT is read
        self.admission: AdmissionPolicy[_Conn] = AdmissionPolicy(
            total=Limit(cfg.max_connections, WhenFull.EVICT_OLDEST, "max_connections"),
            per_source=Limit(MAX_PENDING_PER_SOURCE, WhenFull.EVICT_OLDEST, "pending_per_source"),
        )
        # device publishes whose PUBACK waits for the gateway's (end-to-end acknowledgement)
        self.acks = GatewayAcks(self._is_gateway)
        self._init_registry()

    def _is_gateway(self, session: Session | None) -> bool:
        return session is not None and session.attributes.get(IDENTITY_KEY) == (
            self.cfg.gateway_identity
        )

    def _init_registry(self) -> None:
        """The live-connection registry (the plaintext benchmark, which skips
        ``__init__``, calls this too)."""
        # admitted connections (CONNECT accepted), with their identity and certificate
        # serial: takeover and revocation walk these, never amqtt's session table (which
        # forgets a connection when a newer one of the same client id replaces its entry)
        self.live: dict[_Conn, None] = {}
        # one admission at a time per identity, so a takeover sees every older connection
        self._admitting: dict[str, _Admission] = {}
        self._acl_allowed: set[tuple[str, Action, str]] = set()  # ACL_ALLOWED_CACHE_MAX

    # -- listener ----------------------------------------------------------------------
    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:  # type: ignore[override]
        return self.guard.context

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            address,
            port,
            reuse_address=True,
            # TLS is started per connection in stream_connected, with the newest context
            backlog=1024,  # 2,000 devices may connect at once
        )

    def bound_port(self) -> int:
        for server in self._servers.values():
            inst = server.instance
            if isinstance(inst, asyncio.Server) and inst.sockets:
                return int(inst.sockets[0].getsockname()[1])
        return self.cfg.port

    # -- connection accounting -----------------------------------------------------------
    @property
    def open_connections(self) -> int:
        """Connections from the TCP accept until closed (or evicted), sessions included."""
        return len(self.admission)

    def _settle(self, conn: _Conn) -> None:
        """Its CONNECT is here: no longer pending (never evicted), still counted."""
        if conn.ticket is not None:
            self.admission.settle(conn.ticket)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        peer = writer.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if peer else "?"
        conn = _Conn(source_key(str(peer[0])) if peer else "?", remote, writer)
        # Make room: a source at its cap of pending connections loses its oldest; a full
        # broker loses its oldest pending connection; refused if every slot is a session.
        decision = self.admission.admit(conn.source, conn)
        if not isinstance(decision, Admitted):
            security_event(
                "connect_refused",
                component=COMPONENT,
                reason=decision.limit.reason,
                peer=remote,
                source=conn.source,
                limit=decision.limit.count,
            )
            writer.transport.abort()
            return
        for eviction in decision.evicted:
            victim = eviction.ticket.item
            victim.evicted = True
            security_event(
                "connection_evicted",
                component=COMPONENT,
                reason=eviction.limit.reason,
                peer=victim.remote,
                source=victim.source,
                limit=eviction.limit.count,
            )
            victim.writer.transport.abort()
        conn.ticket = decision.ticket
        _CONN.set(conn)
        try:
            await self._serve_connection(reader, writer, listener_name, conn)
        finally:
            self.admission.release(decision.ticket)
            self.live.pop(conn, None)
            writer.close()
            conn.done.set()

    async def _serve_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener_name: str,
        conn: _Conn,
    ) -> None:
        # The handshake runs here rather than in the listener so that (1) each connection
        # gets the newest context (the newest CRL), (2) a refused handshake is a security
        # event instead of a line asyncio only prints in debug mode and (3) a connection in
        # its handshake counts against the limits.
        try:
            await writer.start_tls(
                self.guard.context, ssl_handshake_timeout=self.cfg.handshake_timeout
            )
        except Exception as exc:  # any failure: refuse, never crash the listener
            if not conn.evicted:  # an evicted one was logged when it was evicted
                security_event(
                    "tls_handshake_refused",
                    component=COMPONENT,
                    reason=_handshake_reason(exc),
                    peer=conn.remote,
                    source=conn.source,
                )
            return
        if conn.evicted:
            return
        sslobj = writer.get_extra_info("ssl_object")
        if not allows_client_auth(sslobj.getpeercert(binary_form=True) if sslobj else None):
            # a CA-signed certificate without extendedKeyUsage clientAuth: OpenSSL accepts
            # one with no extendedKeyUsage at all; close before any MQTT byte is read
            security_event(
                "tls_handshake_refused",
                component=COMPONENT,
                reason="client_certificate_without_client_auth",
                peer=conn.remote,
            )
            return
        limit = self.cfg.max_payload + PACKET_OVERHEAD
        await self._client_connected(
            listener_name, _BoundedReader(reader, writer, limit), CoalescingWriter(writer)
        )

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        sslobj = writer.get_ssl_info()
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        identity = peer_identity(der)
        peer = writer.get_peer_info()
        remote = f"{peer[0]}:{peer[1]}" if peer else "?"
        if der is None or identity is None:  # CERT_REQUIRED makes this unreachable; belt
            security_event(
                "connect_refused", component=COMPONENT, reason="no_client_certificate", peer=remote
            )
            await _quiet_close(writer)
            return
        if self.guard.is_revoked_der(der):
            security_event(
                "connect_refused",
                component=COMPONENT,
                reason="certificate_revoked",
                peer=identity,
                remote=remote,
            )
            await _quiet_close(writer)
            return
        _CONN_IDENTITY.set(identity)
        CONN_CERT.set(der)
        await super()._client_connected(listener_name, reader, writer)

    def _connection_identity(self, incoming: Session) -> tuple[str | None, bytes | None]:
        """Who this connection is: the identity in its TLS client certificate, and the
        certificate. (The one seam the plaintext benchmark replaces; ``incoming`` is the
        CONNECT's session, unused here on purpose: a claim is never an identity.)"""
        der = CONN_CERT.get()
        return peer_identity(der), der

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's, with the CONNECT judged against the connection's certificate *before*
        any session is deleted, reused or modified (amqtt does it after)."""
        conn = _CONN.get()
        source = conn.source if conn is not None else remote_address
        limit = self.cfg.max_payload + PACKET_OVERHEAD
        try:
            async with asyncio.timeout(self.cfg.connect_timeout):
                frame = await read_frame(reader, limit)
                if frame is None:
                    raise NoDataError("connection closed before its CONNECT")
                packets.check_connect(frame)
                # amqtt decodes the CONNECT from the bytes already judged
                stock, incoming = await BrokerProtocolHandler.init_from_connect(
                    BufferReader(frame.to_bytes()), writer, self.plugins_manager
                )
        except packets.PacketRefused as exc:
            security_event(
                "connect_refused",
                component=COMPONENT,
                reason=exc.reason,
                peer=_CONN_IDENTITY.get(),
                source=source,
                packet_type=packet_type_name(exc.packet_type),
                remote=f"{remote_address}:{remote_port}",
            )
            await _quiet_close(writer)
            raise AMQTTError(f"CONNECT refused: {exc.reason}") from None
        except TimeoutError:
            security_event(
                "connect_refused",
                component=COMPONENT,
                reason="connect_timeout",
                peer=_CONN_IDENTITY.get(),
                timeout=self.cfg.connect_timeout,
            )
            await _quiet_close(writer)
            raise AMQTTError("no CONNECT before the timeout") from None
        except (AMQTTError, MQTTError, NoDataError) as exc:
            await _quiet_close(writer)
            raise AMQTTError(f"no valid CONNECT from {remote_address}:{remote_port}") from exc
        if conn is not None:
            self._settle(conn)  # no longer pending: its CONNECT is here
        identity, der = self._connection_identity(incoming)
        refusal = None
        if identity is None or incoming.client_id != identity:
            refusal = "client_id_mismatch"
        elif incoming.will_flag:
            refusal = "will_refused"
        if refusal is not None or identity is None or der is None:
            refusal = refusal or "no_client_certificate"
            security_event(
                "connect_refused",
                component=COMPONENT,
                reason=refusal,
                peer=identity,
                client_id=incoming.client_id,
                will_topic=incoming.will_topic if incoming.will_flag else None,
                remote=f"{remote_address}:{remote_port}",
            )
            incoming.parent = 0
            stock.attach(incoming, reader, writer)
            with contextlib.suppress(Exception):
                await stock.mqtt_connack_authorize(False)
            await _quiet_close(writer)
            raise AMQTTError(f"CONNECT refused: {refusal}")
        admission = self._admitting.setdefault(identity, _Admission())
        admission.users += 1
        try:
            async with admission.lock:
                await self._take_over(identity, conn)
                session = await self._admit_session(
                    identity, der, incoming, remote_address, remote_port
                )
                serial = session.attributes[SERIAL_KEY]
                if conn is not None:
                    conn.identity, conn.serial = identity, serial
                    self.live[conn] = None
        finally:
            admission.users -= 1
            if not admission.users:
                del self._admitting[identity]
        # amqtt's fresh, unattached handler is replaced by one that delivers QoS 1
        # properly (broker.delivery) and judges every packet before amqtt
        # decodes it (broker.strict)
        return StrictHandler(
            self.plugins_manager,
            deliver=self._relay,
            acks=self.acks,
            limit=limit,
            source=source,
            is_revoked=lambda: serial is not None and serial in self.guard.revoked,
        ), session

    async def _take_over(self, identity: str, conn: _Conn | None) -> None:
        """MQTT-3.1.4-2: close every older connection of ``identity`` and wait until it is
        torn down, whatever the clean-session flags of either."""
        older = [c for c in self.live if c.identity == identity and c is not conn]
        for old in older:
            security_event(
                "session_taken_over",
                component=COMPONENT,
                reason="same_client_id",
                peer=identity,
                source=old.source,
                remote=old.remote,
                level=logging.INFO,
            )
            self.live.pop(old, None)
            old.abort()
        if older:
            done = [asyncio.ensure_future(c.done.wait()) for c in older]
            _, pending = await asyncio.wait(done, timeout=TAKEOVER_WAIT)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "%s: an older connection took over %.0f s to close", identity, TAKEOVER_WAIT
                )

    async def _admit_session(
        self,
        identity: str,
        der: bytes,
        incoming: Session,
        remote_address: str,
        remote_port: int,
    ) -> Session:
        """The session this connection gets, by MQTT 3.1.1 §3.1.2.4: clean session
        discards the stored one; otherwise the identity's stored session resumes."""
        session = incoming
        if incoming.clean_session:
            await self._delete_session(identity)
            session.parent = 0
        elif identity in self._sessions:
            # the identity's own persistent session: this connection's parameters and
            # certificate replace those of the previous connection
            session, _ = self._sessions[identity]
            session.keep_alive = incoming.keep_alive
            session.username = incoming.username
            session.password = incoming.password
            session.will_flag = False
            session.will_message = session.will_topic = None
            session.remote_address, session.remote_port = remote_address, remote_port
            session.ssl_object = incoming.ssl_object
            session.parent = 1
        else:
            session.parent = 0
        session.attributes[IDENTITY_KEY] = identity
        session.attributes[CERT_KEY] = der
        # parsed once per connection, not for every publish's revocation check (_relay)
        session.attributes[SERIAL_KEY] = _serial_or_none(der)
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return session

    async def _delete_session(self, client_id: str) -> None:
        # amqtt deletes a clean-session client's old session before authenticating it:
        # never let a connection delete a session that is not its own identity's.
        identity = _CONN_IDENTITY.get()
        if identity is not None and identity != client_id:
            return
        await super()._delete_session(client_id)

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        # Authenticate first: stock amqtt takes over a connected session of the same client
        # id before acting on a refusal.
        if not await self._authenticate(client_session, self.listeners_config[listener_name]):
            handler.attach(client_session, reader, writer)
            with contextlib.suppress(Exception):
                await handler.mqtt_connack_authorize(False)
            await _quiet_close(writer)
            return
        await super()._handle_client_session(
            reader, writer, client_session, handler, server, listener_name
        )

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: Any
    ) -> bool:
        msg = wait_deliver.result()
        if msg is not None and msg.data is not None and len(msg.data) > self.cfg.max_payload:
            security_event(
                "publish_refused",
                component=COMPONENT,
                reason="payload_too_large",
                peer=client_session.client_id,
                size=len(msg.data),
                limit=self.cfg.max_payload,
            )
            await handler.handle_connection_closed()
            return True
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result

    async def _relay(self, handler: DeliveringHandler, message: IncomingApplicationMessage) -> bool:
        """Relay one incoming PUBLISH now (before its PUBACK): amqtt's checks, our size
        check and ACL, then into the broadcast queue. False: close the connection."""
        if handler.session is None:
            return False
        serial = handler.session.attributes.get(SERIAL_KEY)
        if serial is not None and serial in self.guard.revoked:
            return False  # revoked since it connected: never relayed (closed at once)
        done: asyncio.Future[IncomingApplicationMessage] = self._loop.create_future()
        done.set_result(message)
        keep = await self._handle_message_delivery(handler.session, handler, done)
        data = message.data
        if keep and isinstance(data, TrackedPayload) and not data.ticket.relayed:
            # refused by the ACL: nothing downstream will ever hold it, so it is PUBACKed
            # at once, as before (MQTT 3.1.1 has no negative acknowledgement)
            self.acks.acknowledge(data.ticket)
        return keep

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """amqtt's ACL call (every plugin must allow), with allowed decisions remembered
        (:data:`ACL_ALLOWED_CACHE_MAX`)."""
        identity = session_identity(session)
        key = (identity, action, topic) if identity is not None else None
        if key is not None and key in self._acl_allowed:
            return True
        allowed: bool = await super()._topic_filtering(session, topic, action)
        if allowed and key is not None:
            if len(self._acl_allowed) >= ACL_ALLOWED_CACHE_MAX:
                self._acl_allowed.clear()
            self._acl_allowed.add(key)
        return allowed

    async def _run_broadcast(self, running_tasks: Any) -> None:
        # amqtt relays one message per pass (a task and an asyncio.wait each); take those
        # already queued behind it in the same pass (BROADCASTS_PER_PASS): the same relay,
        # in the same order, without a round of the loop per message
        await super()._run_broadcast(running_tasks)
        for _ in range(BROADCASTS_PER_PASS - 1):
            if self._broadcast_queue.empty():
                break
            await super()._run_broadcast(running_tasks)

    # -- end-to-end acknowledgement (broker.delivery) ---------------------------
    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        if isinstance(data, TrackedPayload) and topic is not None:
            data.ticket.relayed = True
            if not self._gateway_receives(topic):
                self.acks.park(data)  # handed to the gateway when it subscribes
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        # An offline session's queue holds at most what is awaited: copies whose devices
        # left (and resend) are dropped once it exceeds the bound of awaited publishes.
        queue = target_session.retained_messages
        if queue.qsize() >= MAX_AWAITING_GATEWAY:
            dropped = compact(queue)
            if dropped:
                log.info(
                    "dropped %d abandoned copies from %s's queue", dropped, target_session.client_id
                )
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    def _gateway_receives(self, topic: str) -> bool:
        """Whether the broadcast of ``topic`` reaches a gateway session at QoS 1: connected,
        or persistent (its offline queue keeps it) and subscribed to a matching filter."""
        entry = self._sessions.get(self.cfg.gateway_identity)
        if entry is None:
            return False
        session = entry[0]
        if session.transitions.state != "connected" and session.clean_session:
            return False
        return any(
            self._matches(topic, a_filter) and any(s is session and q for s, q in subs)
            for a_filter, subs in self._subscriptions.items()
        )

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        # granted at most QoS 1 (MAX_GRANTED_QOS): the broker never starts a QoS 2 flow
        a_filter, qos = subscription
        code: int = await super().add_subscription((a_filter, min(qos, MAX_GRANTED_QOS)), session)
        handler = self._get_handler(session)
        # granted at QoS >= 1 to a live gateway connection: it takes the parked publishes
        if self._is_gateway(session) and code in (1, 2) and isinstance(handler, DeliveringHandler):
            parked = self.acks.unpark(lambda topic: self._matches(topic, a_filter))
            if parked:
                log.info("handing %d parked device publishes to the gateway", len(parked))
            for payload in parked:
                handler.spawn(handler.mqtt_publish(payload.ticket.topic, payload, 1, False))
        return code

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # The messages queued for an offline persistent session, sent on its reconnect.
        # amqtt awaited their PUBACKs here (so the connection's SUBSCRIBEs waited too) and
        # flagged them RETAIN; they are ordinary deliveries: started in order, not awaited,
        # after the in-flight resends and before any live message (see delivery.py).
        handler = self._get_handler(session)
        if not isinstance(handler, DeliveringHandler):
            await super()._publish_session_retained_messages(session)
            return
        handler.deliver_backlog(session.retained_messages)

    # -- live revocation ---------------------------------------------------------------
    async def watch_crl(self) -> None:
        async for _ in ticks(self.cfg.crl_reload_interval):
            newly = self.guard.reload_if_changed()
            if newly:
                await self.close_revoked_sessions(newly)
            flush_security_events()  # the summary of any rate-limited flood that ended

    async def close_revoked_sessions(self, serials: frozenset[int]) -> int:
        """Close every live connection whose certificate serial is in ``serials``: walks
        the connection registry, so a connection that amqtt's session table has lost
        track of (an older one of the same client id) is closed too."""
        closed = 0
        for conn in list(self.live):
            if conn.serial is None or conn.serial not in serials:
                continue
            security_event(
                "session_closed",
                component=COMPONENT,
                reason="certificate_revoked",
                peer=conn.identity,
                remote=conn.remote,
            )
            self.live.pop(conn, None)
            conn.abort()
            closed += 1
        return closed

    # -- retained messages: none are kept, none bypass a subscription ------------------
    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        # A client's RETAIN is refused by the packet rules (broker.packets), and
        # no will is accepted: nothing is ever stored. (amqtt would keep it and push it to
        # every later client, subscribed or not.)
        return

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt calls this on every reconnect with *every* filter any client subscribed,
        # not the session's own, and sends without asking the ACL. The store is empty
        # (retain_message), and even if it were not, only a filter this session holds,
        # and a topic the ACL lets it receive, would be sent.
        topic_filter, qos = subscription
        held = any(s is session for s, _qos in self._subscriptions.get(topic_filter, ()))
        handler = self._get_handler(session)
        if not held or handler is None:
            return
        sends = [
            asyncio.ensure_future(
                handler.mqtt_publish(topic, kept.data, min(qos, kept.qos or qos), retain=True)
            )
            for topic, kept in list(self._retained_messages.items())
            if self._matches(topic, topic_filter)
            and await self._topic_filtering(session, topic, Action.RECEIVE)
        ]
        if sends:
            await asyncio.wait(sends)


def amqtt_config(cfg: BrokerConfig) -> dict[str, Any]:
    """The amqtt configuration derived from ours: one TLS listener, our plugins only."""
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"{host}:{cfg.port}",
                "ssl": True,
                # unused (our context replaces amqtt's) but amqtt insists on them
                "certfile": str(cfg.tls.cert),
                "keyfile": str(cfg.tls.key),
                "cafile": str(cfg.tls.ca),
                "max_connections": -1,  # we refuse beyond the limit; amqtt would queue
            }
        },
        "plugins": {
            f"{CertIdentityAuthPlugin.__module__}.{CertIdentityAuthPlugin.__name__}": {},
            f"{TopicAclPlugin.__module__}.{TopicAclPlugin.__name__}": {
                "gateway_identity": cfg.gateway_identity
            },
        },
    }


async def run(cfg: BrokerConfig, stop: asyncio.Event) -> None:
    """Run the broker until ``stop`` is set."""
    broker = PacegateBroker(cfg)
    await broker.start()
    watcher = asyncio.create_task(broker.watch_crl())
    log.info(READY_MESSAGE, cfg.host, broker.bound_port(), cfg.tls.crl)
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await broker.shutdown()

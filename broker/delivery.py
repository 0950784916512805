"""QoS 1 delivery that keeps MQTT 3.1.1's promises, which amqtt 0.12.1 does not, and
end-to-end acknowledgement: a device's PUBACK means the gateway has its reading durably.

**End-to-end acknowledgement.** A pacemaker deletes a reading once the broker PUBACKs it, so
the broker PUBACKs a device's QoS 1 publish only once the *gateway identity* has PUBACKed
the copy relayed to it (and the gateway PUBACKs only after the hospital's commit or an
fsynced spool write). The broker therefore holds nothing that a crash can lose: every
publish it holds is still in the device's buffer, and the device sends it again on its next
connection (DUP=1); the gateway's replay window and the hospital's uniqueness on
(device, counter) absorb the copies. The device's payload travels through amqtt's relay (the
broadcast queue, the gateway session's offline queue, its in-flight store, redelivery on the
gateway's reconnect) as a :class:`TrackedPayload`: the bytes plus the :class:`GatewayTicket`
that the gateway's PUBACK resolves, whichever copy it acknowledges. A publish relayed while
no gateway session would receive it (no gateway ever connected since the broker started, or
not subscribed) is *parked* in :class:`GatewayAcks` and handed to the gateway when it
subscribes. Publishes awaiting the gateway are bounded per connection and in all (see the
constants); a publisher beyond a bound is disconnected (it keeps the reading and sends it
again after its backoff). When a device's connection ends, its tickets are abandoned: it
will send those readings again, and a gateway PUBACK for an abandoned ticket is a no-op.
A publish the broker does not relay (refused by the ACL) is PUBACKed at once, as before:
nothing downstream will ever hold it, and MQTT 3.1.1 has no negative acknowledgement.

Three amqtt defects, all fixed here by a subclass of its per-connection protocol handler
(:class:`DeliveringHandler`, installed by :class:`broker.server.PacegateBroker`):

1. **Outgoing in-flight messages are forgotten.** amqtt waits 5 s for a subscriber's PUBACK
   and then, or when the connection ends, drops the message from ``session.inflight_out``
   (a ``finally``), so a persistent session never gets it again. Here a QoS 1 message stays in
   ``inflight_out`` until its PUBACK arrives, however long that takes; when the connection
   ends first it stays there, and when the persistent session (``clean_session=False``)
   reconnects it is sent again, first, in the original order, with DUP=1 and its original
   packet id (MQTT-4.4.0-1). Resends do not hold up the new connection (amqtt awaited them
   for up to 10 s, and then dropped them too).
2. **Acknowledged publishes are lost when the publisher leaves.** amqtt answers a QoS 1
   PUBLISH with PUBACK once the message is in the publisher's own in-memory queue; a
   per-connection loop relays that queue to the subscribers later, and stops (dropping what
   is left) when the publisher disconnects. Here the message is relayed (topic checks, ACL,
   into the broker's broadcast queue, from which it reaches every connected subscriber or
   the offline queue of every persistent session) at once, and the PUBACK waits for the
   gateway's (above). QoS 0 messages take the same path (without PUBACK). Publishes of one
   connection are relayed in arrival order.
3. **Live messages overtake, and were sent twice with, a reconnect's backlog.** amqtt marks
   a reconnecting session connected (so the broadcast loop hands it live messages at once)
   before the handler has started, resent its in-flight messages or drained its offline
   queue. A live message could so be sent first (out of order), and, being in
   ``inflight_out`` when the resends were collected, be sent a second time with DUP=1 on the
   same connection. Here live publishes wait at a gate until the backlog is written:
   resends of ``inflight_out`` first, then the offline queue (one task writes it, packet after
   packet, and only then opens the gate), then live messages, each sent once per connection.

QoS 2 keeps amqtt's own flow (pacegate's devices and gateway use QoS 1).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from broker.amqtt_api import (
    OUTGOING,
    QOS_0,
    QOS_1,
    ApplicationMessage,
    BrokerProtocolHandler,
    DisconnectPacket,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    PluginManager,
    ProtocolHandler,
    PubackPacket,
    PublishPacket,
    Session,
)
from pacegate.errors import InvariantError
from pacegate.log import security_event


async def _nothing() -> None:
    """The task body of a packet already handled when the reader loop read it."""


# ``deliver(handler, message) -> keep_connection``: relay one incoming PUBLISH now.
Deliver = Callable[["DeliveringHandler", IncomingApplicationMessage], Awaitable[bool]]

# Device publishes one connection may have awaiting the gateway's acknowledgement. The
# simulator keeps at most 32 in flight (device_sim.device.MAX_IN_FLIGHT), paho's default is
# 20, MQTT 5 calls this Receive Maximum; a client far beyond it is flooding, not buffering.
MAX_AWAITING_GATEWAY_PER_CONNECTION = 128
# All device publishes awaiting the gateway. Each one is a copy in the gateway session (a
# packet id of its 65,535 once sent), so the bound stays below that; at ~300 bytes apiece it
# is ~15 MB, and it is 25 readings in flight for each of 2,000 devices.
MAX_AWAITING_GATEWAY = 50_000


class GatewayTicket:
    """One device QoS 1 publish awaiting the gateway's PUBACK (see module doc)."""

    __slots__ = ("_event", "acknowledged", "closed", "relayed", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.relayed = False  # into the broadcast queue (the ACL let it through)
        self.acknowledged = False  # the gateway PUBACKed a copy: the device may be PUBACKed
        self.closed = False  # acknowledged, or abandoned (the device connection ended)
        self._event = asyncio.Event()

    async def wait(self) -> bool:
        """Until acknowledged or abandoned; True if acknowledged."""
        await self._event.wait()
        return self.acknowledged

    def _close(self, *, acknowledged: bool) -> bool:
        if self.closed:
            return False
        self.closed = True
        self.acknowledged = acknowledged
        self._event.set()
        return True


class TrackedPayload(bytes):
    """A device's QoS 1 payload on its way through amqtt's relay, carrying its ticket.

    A ``bytes`` subclass so that every amqtt structure that holds a message's data (the
    broadcast queue, a session's offline queue and in-flight store) carries the ticket with
    it, with no second copy of the message to keep in step."""

    ticket: GatewayTicket

    def __new__(cls, data: bytes | bytearray, ticket: GatewayTicket) -> TrackedPayload:
        obj = super().__new__(cls, data)
        obj.ticket = ticket
        return obj


def abandoned(data: object) -> bool:
    """A tracked copy whose publisher's connection ended unacknowledged: the device sends
    the reading again, so this copy need not be delivered (nor kept queued)."""
    return isinstance(data, TrackedPayload) and data.ticket.closed and not data.ticket.acknowledged


def compact(queue: asyncio.Queue[ApplicationMessage]) -> int:
    """Drop the abandoned copies from a session's offline queue; return how many."""
    kept: list[ApplicationMessage] = []
    dropped = 0
    while not queue.empty():
        item = queue.get_nowait()
        if abandoned(item.data):
            dropped += 1
        else:
            kept.append(item)
    for item in kept:
        queue.put_nowait(item)
    return dropped


class GatewayAcks:
    """The broker's publishes awaiting the gateway: counted, bounded, parked while no gateway
    session would receive them. Pure bookkeeping (no I/O); one per broker."""

    def __init__(
        self,
        is_gateway: Callable[[Session | None], bool],
        *,
        limit: int = MAX_AWAITING_GATEWAY,
        per_connection: int = MAX_AWAITING_GATEWAY_PER_CONNECTION,
    ) -> None:
        self.is_gateway = is_gateway
        self.limit = limit
        self.per_connection = per_connection
        self.awaiting = 0
        self._parked: dict[GatewayTicket, TrackedPayload] = {}  # insertion order: FIFO

    def refusal(self, connection_awaiting: int) -> tuple[str, int] | None:
        """Why one more publish may not wait for the gateway: (reason, limit), or None."""
        if connection_awaiting >= self.per_connection:
            return "too_many_unacknowledged", self.per_connection
        if self.awaiting >= self.limit:
            return "broker_busy", self.limit
        return None

    def open(self, topic: str, data: bytes | bytearray) -> TrackedPayload:
        self.awaiting += 1
        return TrackedPayload(data, GatewayTicket(topic))

    def acknowledge(self, ticket: GatewayTicket) -> None:
        """The gateway PUBACKed a copy."""
        if ticket._close(acknowledged=True):
            self._release(ticket)

    def abandon(self, ticket: GatewayTicket) -> None:
        """The publisher's connection ended (it resends), or the publish was not relayed."""
        if ticket._close(acknowledged=False):
            self._release(ticket)

    def _release(self, ticket: GatewayTicket) -> None:
        self.awaiting -= 1
        self._parked.pop(ticket, None)

    @property
    def parked(self) -> int:
        return len(self._parked)

    def park(self, payload: TrackedPayload) -> None:
        if not payload.ticket.closed:
            self._parked[payload.ticket] = payload

    def unpark(self, matches: Callable[[str], bool]) -> list[TrackedPayload]:
        """The parked payloads whose topic ``matches`` (a new gateway subscription), oldest
        first, no longer parked."""
        out = [p for t, p in self._parked.items() if matches(t.topic)]
        for p in out:
            del self._parked[p.ticket]
        return out


class DeliveringHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker-side protocol handler with QoS 1 delivery fixed (see module doc)."""

    def __init__(
        self, plugins_manager: PluginManager[Any], *, deliver: Deliver, acks: GatewayAcks
    ) -> None:
        super().__init__(plugins_manager)
        self._deliver = deliver
        self._acks = acks
        # this connection's publishes whose PUBACK waits for the gateway's
        self._awaiting: set[GatewayTicket] = set()
        self._relay_order = asyncio.Lock()  # FIFO: publishes relayed in arrival order
        self._background: set[asyncio.Task[Any]] = set()
        # Live publishes (the broadcast loop's) wait here until the reconnect backlog has
        # been started (deliver_backlog), or until the connection ends.
        self._live = asyncio.Event()

    # -- connection state --------------------------------------------------------------
    def closing(self) -> bool:
        """True before :meth:`start` and from the moment the connection is known to end."""
        waiter: asyncio.Future[Any] | None = getattr(self, "_disconnect_waiter", None)
        return waiter is None or waiter.done()

    async def start(self) -> None:
        # amqtt creates the disconnect waiter only after the reader runs and the resends are
        # done, so a disconnect during start() was lost; create it first.
        if self.closing():
            self._disconnect_waiter = asyncio.get_running_loop().create_future()
        try:
            await ProtocolHandler.start(self)
        except BaseException:
            self._live.set()  # never strand live publishes behind a handler that failed
            raise

    async def stop(self) -> None:
        self._live.set()  # waiting live publishes find the handler closing: kept in session
        self._abandon_awaiting()
        await super().stop()

    def _abandon_awaiting(self) -> None:
        """The connection ends: the device sends these again on its next one."""
        for ticket in list(self._awaiting):
            self._acks.abandon(ticket)
        self._awaiting.clear()

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        await super().handle_disconnect(disconnect)
        self._live.set()
        self._abandon_awaiting()

    async def handle_connection_closed(self) -> None:
        await super().handle_connection_closed()
        self._abandon_awaiting()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in a task this handler keeps a reference to until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- outgoing: backlog first, then live messages ---------------------------------------
    def deliver_backlog(self, offline: asyncio.Queue[ApplicationMessage]) -> None:
        """After :meth:`start` (which started the resends of ``inflight_out``): send the
        session's offline queue, in order, then let live publishes through.

        One task writes the whole backlog, packet after packet, and opens the gate only once
        the last one is written. A live publish whose task was created before this call but
        has not run yet therefore still finds the gate shut: the gate is not a question of
        which task runs first. PUBACKs are awaited in the background."""
        backlog: list[ApplicationMessage] = []
        while not offline.empty():
            queued = offline.get_nowait()
            if not abandoned(queued.data):  # its device resends it on its new connection
                backlog.append(queued)
        self.spawn(self._write_backlog(backlog))

    async def _write_backlog(self, backlog: list[ApplicationMessage]) -> None:
        try:
            for queued in backlog:
                if queued.qos != QOS_1 or self.session is None:  # QoS 2: amqtt's flow
                    self.spawn(
                        ProtocolHandler.mqtt_publish(
                            self, queued.topic, queued.data, queued.qos, False
                        )
                    )
                    continue
                message = OutgoingApplicationMessage(
                    self.session.next_packet_id, queued.topic, QOS_1, queued.data, False
                )
                waiter = await self._send_qos1(message)
                if waiter is not None:
                    self.spawn(self._await_puback(message, waiter))
        finally:
            self._live.set()

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> OutgoingApplicationMessage:
        """A live publish to this client: sent after the reconnect backlog (see module doc)."""
        if not self._live.is_set():
            await self._live.wait()
        message: OutgoingApplicationMessage = await super().mqtt_publish(
            topic, data, qos, retain, ack_timeout
        )
        return message

    # -- incoming: relay, then PUBACK once the gateway acknowledged ------------------------
    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        qos = publish_packet.qos
        if qos not in (QOS_0, QOS_1):
            await super().handle_publish(publish_packet)  # QoS 2: amqtt's flow
            return
        header = publish_packet.variable_header
        packet_id = header.packet_id if header is not None else None
        topic, data = publish_packet.topic_name, publish_packet.data
        if topic is None or data is None or (qos == QOS_1 and packet_id is None):
            return
        if self.closing():
            return  # not relayed: a QoS 1 publisher sends it again on its next connection
        ticket: GatewayTicket | None = None
        if qos == QOS_1:
            refusal = self._acks.refusal(len(self._awaiting))
            if refusal is not None:
                reason, limit = refusal
                security_event(
                    "publish_refused",
                    component="broker",
                    reason=reason,
                    peer=self.session.client_id if self.session is not None else None,
                    limit=limit,
                )
                await self._drop_connection()  # it keeps the reading, resends later
                return
            data = self._acks.open(topic, data)
            ticket = data.ticket
            self._awaiting.add(ticket)
        message = IncomingApplicationMessage(
            packet_id, topic, qos, data, publish_packet.retain_flag
        )
        message.publish_packet = publish_packet
        async with self._relay_order:
            if self.closing():  # ended while this publish waited its turn
                if ticket is not None:
                    self._forget(ticket)
                return
            keep = await self._deliver(self, message)
        if ticket is not None and (not keep or self.closing()):
            self._forget(ticket)
        if not keep:  # an invalid topic: MQTT says close the connection
            await self._drop_connection()
            return
        if ticket is not None:
            if packet_id is None:
                raise InvariantError("a QoS 1 publish with a ticket has a packet id")
            self.spawn(self._puback_when_acknowledged(ticket, packet_id))

    async def _drop_connection(self) -> None:
        """End this connection now (amqtt's ``handle_connection_closed`` only tells the
        broker's session loop, which leaves the socket open and the reader reading)."""
        await self.handle_connection_closed()
        if self.writer is not None:
            with contextlib.suppress(Exception):
                await self.writer.close()

    def _forget(self, ticket: GatewayTicket) -> None:
        self._acks.abandon(ticket)
        self._awaiting.discard(ticket)

    async def _puback_when_acknowledged(self, ticket: GatewayTicket, packet_id: int) -> None:
        try:
            acknowledged = await ticket.wait()
        finally:
            self._awaiting.discard(ticket)
        if acknowledged and not self.closing():
            puback = PubackPacket.build(packet_id)
            await self._send_packet(puback)

    # -- outgoing: keep until PUBACK, resend on reconnect ------------------------------
    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        if not isinstance(app_message, OutgoingApplicationMessage):
            raise InvariantError(f"an outgoing flow got {type(app_message).__name__}")
        waiter = await self._send_qos1(app_message)
        if waiter is not None:
            await self._await_puback(app_message, waiter)

    async def _send_qos1(
        self, app_message: OutgoingApplicationMessage
    ) -> asyncio.Future[PubackPacket] | None:
        """Put ``app_message`` in the session until its PUBACK and write it once on this
        connection. Returns the PUBACK waiter, or None if it was not sent here (already in
        flight on this connection, or the connection is ending: the next one resends it)."""
        if self.session is None:
            raise InvariantError("a QoS 1 message sent with no session")
        packet_id = app_message.packet_id
        if packet_id is None:
            raise ValueError("QoS 1 message without a packet id")
        if packet_id in self._puback_waiters:
            return None  # already in flight on this connection: sent once per connection
        # The session owns it until the PUBACK, across connections.
        self.session.inflight_out.setdefault(packet_id, app_message)
        waiter: asyncio.Future[PubackPacket] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter  # before sending: a PUBACK may be quick
        if self.closing():
            del self._puback_waiters[packet_id]
            return None  # kept in inflight_out; the next connection resends it
        # DUP=1 if it may have reached the client before (MQTT-3.3.1-1)
        packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        try:
            await self._send_packet(packet)
        except BaseException:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
            raise
        app_message.publish_packet = packet
        return waiter

    async def _await_puback(
        self, app_message: OutgoingApplicationMessage, waiter: asyncio.Future[PubackPacket]
    ) -> None:
        """Wait for the PUBACK of a message :meth:`_send_qos1` wrote; only then does the
        session let go of it. If the connection ends first, it stays for the next one."""
        if self.session is None:
            raise InvariantError("a QoS 1 message sent with no session")
        packet_id = app_message.packet_id
        try:
            # handle_puback already released it from the session and acknowledged it
            app_message.puback_packet = await waiter
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not waiter.cancelled() or (task is not None and task.cancelling()):
                raise
            # the connection ended before the PUBACK: the message stays in the session
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]

    def handle_puback(self, puback: PubackPacket) -> Coroutine[Any, Any, None]:
        """Release the acknowledged message now, while the reader loop reads the packet.

        amqtt's reader loop calls ``asyncio.create_task(self.handle_puback(packet))`` and,
        when the stream ends (a DISCONNECT and EOF right behind the last PUBACKs), cancels
        every task it created that has not finished, including tasks that never started.
        A PUBACK handled inside the task could so be lost, and the session then resent an
        acknowledged message to the next connection. The work is therefore done in this
        synchronous call, before the task exists; the task it returns does nothing. Only a
        message in flight on this connection is released: a stray packet id changes nothing."""
        header = puback.variable_header
        waiter = self._puback_waiters.get(header.packet_id) if header is not None else None
        if waiter is None:
            if header is not None:
                self.logger.debug("PUBACK for unknown packet id %s", header.packet_id)
        elif not waiter.done():
            if self.session is not None:
                message = self.session.inflight_out.pop(header.packet_id, None)
                data = message.data if message is not None else None
                if isinstance(data, TrackedPayload) and self._acks.is_gateway(self.session):
                    self._acks.acknowledge(data.ticket)  # the device may now be PUBACKed
            waiter.set_result(puback)
        return _nothing()

    async def _retry_deliveries(self) -> None:
        """MQTT-4.4.0-1: resend unacknowledged PUBLISH on reconnect, in their order.

        QoS 1 resends are started here (their packets go out in this order: the write lock
        is FIFO) but not awaited: their PUBACKs come when the client is ready. Only messages
        of earlier connections are resent: live publishes are held back until the backlog
        is under way, and one already in flight here is never sent again."""
        if self.session is None:
            return
        others = []
        for message in list(self.session.inflight_out.values()):
            if message.packet_id in self._puback_waiters:
                continue  # in flight on this connection, not unacknowledged from a past one
            if message.qos == QOS_1:
                self.spawn(self._handle_qos1_message_flow(message))
            else:
                others.append(message)
        others.extend(self.session.inflight_in.values())
        if others:  # QoS 2: amqtt's behaviour
            tasks = [
                asyncio.create_task(asyncio.wait_for(self._handle_message_flow(m), 10))
                for m in others
            ]
            await asyncio.wait(tasks)
            for t in tasks:
                with contextlib.suppress(BaseException):
                    t.result()

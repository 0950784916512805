"""QoS 1 delivery that keeps MQTT 3.1.1's promises, which amqtt 0.12.1 does not.

Three amqtt defects, all fixed here by a subclass of its per-connection protocol handler
(:class:`DeliveringHandler`, installed by :class:`pacegate.broker.server.PacegateBroker`):

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
   the offline queue of every persistent session) *before* the PUBACK is sent, so a PUBACK
   means the broker owns the message. QoS 0 messages take the same path (without PUBACK).
   Publishes of one connection are relayed in arrival order.
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

from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.manager import PluginManager
from amqtt.session import (
    OUTGOING,
    ApplicationMessage,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
)


async def _nothing() -> None:
    """The task body of a packet already handled when the reader loop read it."""


# ``deliver(handler, message) -> keep_connection``: relay one incoming PUBLISH now.
Deliver = Callable[["DeliveringHandler", IncomingApplicationMessage], Awaitable[bool]]


class DeliveringHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker-side protocol handler with QoS 1 delivery fixed (see module doc)."""

    def __init__(self, plugins_manager: PluginManager[Any], *, deliver: Deliver) -> None:
        super().__init__(plugins_manager)
        self._deliver = deliver
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
        await super().stop()

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        await super().handle_disconnect(disconnect)
        self._live.set()

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
            backlog.append(offline.get_nowait())
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

    # -- incoming: relay, then PUBACK --------------------------------------------------
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
        message = IncomingApplicationMessage(
            packet_id, topic, qos, data, publish_packet.retain_flag
        )
        message.publish_packet = publish_packet
        async with self._relay_order:
            keep = await self._deliver(self, message)
        if not keep:  # an invalid topic: MQTT says close the connection
            await self.handle_connection_closed()
            return
        if qos == QOS_1 and not self.closing():
            assert packet_id is not None
            puback = PubackPacket.build(packet_id)
            await self._send_packet(puback)
            message.puback_packet = puback

    # -- outgoing: keep until PUBACK, resend on reconnect ------------------------------
    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        assert isinstance(app_message, OutgoingApplicationMessage)
        waiter = await self._send_qos1(app_message)
        if waiter is not None:
            await self._await_puback(app_message, waiter)

    async def _send_qos1(
        self, app_message: OutgoingApplicationMessage
    ) -> asyncio.Future[PubackPacket] | None:
        """Put ``app_message`` in the session until its PUBACK and write it once on this
        connection. Returns the PUBACK waiter, or None if it was not sent here (already in
        flight on this connection, or the connection is ending: the next one resends it)."""
        assert self.session is not None
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
        assert self.session is not None
        packet_id = app_message.packet_id
        try:
            app_message.puback_packet = await waiter
            self.session.inflight_out.pop(packet_id, None)
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
                self.session.inflight_out.pop(header.packet_id, None)
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

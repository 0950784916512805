"""The embedded broker's per-connection reader: every packet is judged before amqtt sees it.

amqtt 0.12.1's reader loop (``ProtocolHandler._reader_loop``) decodes straight from the
socket, discards a packet it cannot decode and reads on, spawns one task per packet with no
bound, and never closes a connection whose keep-alive ran out. :class:`StrictHandler`
replaces that loop:

- each frame is read whole (its length checked against the packet limit from the header,
  before its body is buffered) and judged by the sans-IO rules of
  :mod:`broker.packets`; a refused frame closes the connection with one
  ``packet_refused`` security event and no traceback;
- only then does amqtt decode it (from the bytes in hand); a decoding failure is refused
  the same way;
- at most :data:`MAX_INCOMING_IN_FLIGHT` packets of one connection are handled at once;
  beyond that the reader stops reading (TCP pushes back on the peer), so a fast publisher,
  or a peer that sends PINGREQ or SUBSCRIBE and never reads the answers, cannot queue
  tasks without bound;
- a PUBACK for a packet id the broker is not waiting for is ignored, counted and, past
  :data:`MAX_UNKNOWN_ACKS` on one connection, closes it (400 KB of them once made amqtt
  log 100,000 lines);
- a connection silent for 1.5 keep-alive periods is closed (MQTT-3.1.2-24);
- a PUBLISH from a connection whose certificate has been revoked since it connected is
  never relayed (``is_revoked``, asked for each one), whatever the CRL watcher's timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from broker import packets
from broker.amqtt_api import (
    BufferReader,
    MQTTFixedHeader,
    PluginManager,
    PubackPacket,
    PublishPacket,
    ReaderAdapter,
    Subscription,
    UnSubscription,
    packet_class,
)
from broker.delivery import DeliveringHandler, GatewayAcks
from pacegate.errors import InvariantError
from pacegate.log import security_event

log = logging.getLogger("pacegate.broker")

COMPONENT = "broker"

# Packets of one connection handled at once (PUBLISH waiting for their relay and PUBACK,
# PINGRESP/SUBACK writes into a socket the peer does not read, ...). The device simulator
# keeps at most 32 PUBLISH in flight (device_sim.device.MAX_IN_FLIGHT) and paho 20 by
# default; a peer with more waits (the reader stops reading, TCP pushes back), so the
# broker holds at most this many packets per connection, and max_connections times that
# in all. (Without it, 20,000 PINGREQ+SUBSCRIBE from a peer that never reads grew the
# broker by 63 MB: one task per packet.)
MAX_INCOMING_IN_FLIGHT = 64
# SUBSCRIBE/UNSUBSCRIBE waiting for the broker's session loop (amqtt's queues are
# unbounded); a full queue holds its packet's task, which the bound above counts.
MAX_PENDING_SUBSCRIPTIONS = 16
# PUBACKs for unknown packet ids tolerated on one connection before it is closed: a
# duplicate PUBACK now and then is harmless; hundreds are a peer that is broken or probing.
MAX_UNKNOWN_ACKS = 100
# MQTT-3.1.2-24: the server closes a connection silent for one and a half keep-alives.
KEEPALIVE_GRACE = 1.5

_TYPE_NAMES = {
    0: "RESERVED_0",
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "RESERVED_15",
}


def packet_type_name(packet_type: int | None) -> str | None:
    return None if packet_type is None else _TYPE_NAMES.get(packet_type, str(packet_type))


async def read_frame(reader: ReaderAdapter, limit: int) -> packets.Frame | None:
    """One whole frame from ``reader``; None at end of stream. Raises
    :class:`~broker.packets.PacketRefused` for a malformed length or a frame
    larger than ``limit`` (before reading its body)."""
    try:
        first = await reader.read(1)
        if not first:
            return None
        encoded = b""
        while (length := packets.parse_remaining_length(encoded)) is None:
            byte = await reader.read(1)
            if not byte:
                return None
            encoded += byte
        if length > limit:
            raise packets.PacketRefused(packets.PACKET_TOO_LARGE, first[0] >> 4)
        body = await reader.read(length) if length else b""
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if len(body) != length:
        return None
    return packets.Frame(first[0] >> 4, first[0] & 0x0F, body)


async def decode(frame: packets.Frame) -> Any:
    """amqtt's packet object for a frame that passed the rules (from the bytes in hand)."""
    header = MQTTFixedHeader(frame.packet_type, frame.flags, len(frame.body))
    try:
        cls = packet_class(header)
        return await cls.from_stream(BufferReader(frame.body), fixed_header=header)
    except Exception:  # whatever amqtt's decoder raises: the peer sent garbage
        raise packets.PacketRefused(packets.UNDECODABLE, frame.packet_type) from None


class StrictHandler(DeliveringHandler):
    """:class:`DeliveringHandler` with a reader loop that enforces the packet rules."""

    def __init__(
        self,
        plugins_manager: PluginManager[Any],
        *,
        deliver: Any,
        acks: GatewayAcks,
        limit: int,
        source: str,
        is_revoked: Callable[[], bool],
    ) -> None:
        super().__init__(plugins_manager, deliver=deliver, acks=acks)
        self._limit = limit
        self._source = source
        self._is_revoked = is_revoked
        self.unknown_acks = 0
        self.refused: str | None = None  # the reason this connection was closed for
        self._pending_subscriptions: asyncio.Queue[Subscription] = asyncio.Queue(
            MAX_PENDING_SUBSCRIPTIONS
        )
        self._pending_unsubscriptions: asyncio.Queue[UnSubscription] = asyncio.Queue(
            MAX_PENDING_SUBSCRIPTIONS
        )

    def _peer(self) -> str | None:
        session = self.session
        return None if session is None else session.client_id

    def refuse(self, reason: str, packet_type: int | None = None, **detail: Any) -> None:
        """Log the one security event of a connection closed for a protocol violation."""
        if self.refused is not None:
            return
        self.refused = reason
        security_event(
            "packet_refused",
            component=COMPONENT,
            reason=reason,
            peer=self._peer(),
            source=self._source,
            packet_type=packet_type_name(packet_type),
            **detail,
        )

    async def _reader_loop(self) -> None:
        if self.session is None or self._reader_ready is None:
            raise InvariantError("self.session, self._reader_ready unset here")
        keep_alive = self.session.keep_alive
        idle = keep_alive * KEEPALIVE_GRACE if keep_alive > 0 else None
        handling: set[asyncio.Task[None]] = set()
        self._reader_ready.set()
        try:
            # a refusal decided in a packet's task (see handle_puback) ends the loop too
            while self.reader is not None and self.refused is None:
                if len(handling) >= MAX_INCOMING_IN_FLIGHT:
                    await asyncio.wait(handling, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    # asyncio.timeout, not wait_for: before 3.12 wait_for drops a
                    # cancellation that arrives as the read completes (cpython gh-86296,
                    # fixed by gh-96764), so stop() never ended the reader of a
                    # connection flooding packets
                    async with asyncio.timeout(idle):
                        frame = await read_frame(self.reader, self._limit)
                    if frame is None:
                        break
                    packets.check_client_packet(frame)
                    packet = await decode(frame)
                except TimeoutError:
                    log.info("%s: no packet for %.0f s (keep-alive), closing", self._peer(), idle)
                    break
                except packets.PacketRefused as exc:
                    self.refuse(exc.reason, exc.packet_type)
                    break
                task = self._dispatch(frame.packet_type, packet)
                if task is not None:
                    handling.add(task)
                    task.add_done_callback(handling.discard)
                    task.add_done_callback(self._task_failed)
        except asyncio.CancelledError:
            pass
        finally:
            for task in handling:
                task.cancel()
            with contextlib.suppress(Exception):
                await self.handle_connection_closed()
            self._reader_stopped.set()
            await self.stop()

    def _task_failed(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a handler bug or a write to a closed socket: close, quietly
            log.debug("%s: packet handling failed: %r", self._peer(), exc)
            self.spawn(self.handle_connection_closed())

    def _dispatch(self, packet_type: int, packet: Any) -> asyncio.Task[None] | None:
        handlers = {
            packets.PUBLISH: self._guarded_publish,
            packets.PUBACK: self.handle_puback,
            packets.SUBSCRIBE: self.handle_subscribe,
            packets.UNSUBSCRIBE: self.handle_unsubscribe,
            packets.PINGREQ: self.handle_pingreq,
            packets.DISCONNECT: self.handle_disconnect,
        }
        handler = handlers.get(packet_type)
        if handler is None:  # unreachable: check_client_packet admits only these
            return None
        task: asyncio.Task[None] = asyncio.create_task(handler(packet))
        return task

    async def _guarded_publish(self, packet: PublishPacket) -> None:
        if self._is_revoked():
            # revoked since it connected: the CRL watcher closes the connection; until
            # then nothing of it is relayed or acknowledged
            self.refuse("certificate_revoked", packets.PUBLISH)
            await self.handle_connection_closed()
            return
        await self.handle_publish(packet)

    async def handle_puback(self, puback: PubackPacket) -> None:
        header = puback.variable_header
        packet_id = header.packet_id if header is not None else None
        if packet_id in self._puback_waiters:
            await super().handle_puback(puback)
            return
        self.unknown_acks += 1
        if self.unknown_acks > MAX_UNKNOWN_ACKS:
            self.refuse("too_many_unknown_acks", packets.PUBACK, limit=MAX_UNKNOWN_ACKS)
            await self.handle_connection_closed()
            return
        security_event(
            "puback_ignored",
            component=COMPONENT,
            reason="unknown_packet_id",
            peer=self._peer(),
            source=self._source,
            level=logging.INFO,
        )

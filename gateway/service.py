"""``pacegate gateway -c gateway.yaml``: receive, open, forward, acknowledge.

Threads: paho-mqtt runs its network loop in its own thread and only hands each message to the
asyncio loop (``call_soon_threadsafe``); the pipeline, the replay store, the spool and the
channel all live on the asyncio loop, so none of them needs a lock.

MQTT: one client with the gateway's certificate, ``clean_session=False`` (the broker keeps
QoS 1 messages for us while we are away), manual acknowledgements. A message is acknowledged
when it is rejected (it will never be valid) or once its reading is durable (hospital ACK or
spool) *and* its replay window is committed. After every (re)connect the broker redelivers
what was not acknowledged, so the live replay windows rewind to the durable ones, and acks
owed to the previous connection are not sent (their packet ids belong to the new redelivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from gateway.config import GatewayConfig, GatewayConfigError, load_gateway_config
from gateway.forwarder import ChannelStream, Connector, Forwarder, Pending
from gateway.metrics import GatewayMetrics
from gateway.pipeline import REPLAY, UNKNOWN_DEVICE, Accepted, PipelineState, Rejected, process
from gateway.replay_store import ReplayStore
from gateway.spool import Spool
from pacegate.errors import ConfigError, InvariantError
from pacegate.filewatch import FileWatch, ticks
from pacegate.keystore import PskStore
from pacegate.log import security_event
from pacegate.reading import Reading
from pacegate.replay import ReplayRejected, ReplayWindow
from pacegate.sealed import SealedReadingError, open_reading, parse_header
from pacegate.tlsconf import client_context

log = logging.getLogger("pacegate.gateway")

# Security events per rejection reason and second; beyond it they are only counted, so that a
# flood of garbage cannot turn into a flood of log lines (the metrics still count each one).
SECURITY_EVENTS_PER_REASON_PER_S = 20
MQTT_RECONNECT_MIN_S = 1
MQTT_RECONNECT_MAX_S = 10
# Copies of a reading that is accepted but not yet durable (a device resent it, DUP=1, while
# the first copy was on its way to the hospital) whose acknowledgement waits for the first
# copy's. Acknowledging such a copy at once would let the broker PUBACK the device for a
# reading that a crash could still lose. Bounded: past it, a copy is not acknowledged at all
# (the broker delivers it again on the next connection).
MAX_HELD_ACKS = 10_000


@dataclass(frozen=True, slots=True)
class _Message:
    generation: int
    topic: str
    payload: bytes
    mid: int
    qos: int
    arrived: float


@dataclass(frozen=True, slots=True)
class _Connected:
    generation: int


def hospital_connector(cfg: GatewayConfig) -> Connector | None:
    """The PQ channel to the hospital, or None if this build has no channel module yet."""
    try:
        from pacegate import channel
    except ImportError:
        return None
    connect = getattr(channel, "connect", None)
    if connect is None:
        return None
    h = cfg.hospital
    # our channel name is the identity file's stem: pki/channel/<name>.mldsa.key
    name = h.identity.name.removesuffix(".mldsa.key")
    identity = channel.load_identity(h.identity, name)
    server_key = channel.load_public_key(h.server_key)
    route = HospitalRoute(h.endpoints)

    async def _connect() -> ChannelStream:
        last: BaseException | None = None
        for host, port in route.attempts():
            try:
                stream: ChannelStream = await connect(
                    host,
                    port,
                    identity=identity,
                    server_name=h.server_name,
                    server_key=server_key,
                )
            except (OSError, TimeoutError, channel.ChannelError, channel.ChannelClosed) as exc:
                log.warning("hospital %s:%d unreachable: %s", host, port, exc)
                route.failed()
                last = exc
                continue
            route.connected()
            return stream
        raise last if last is not None else ConnectionError("no hospital endpoint")

    return _connect


class HospitalRoute:
    """Which hospital ingest node the gateway tries (sans-IO): the one that last worked, then
    the others in the configured order. One connect attempt walks the list once, so a dead
    node costs one failed connect, and the forwarder's backoff applies only when every node
    refused; the batches not acknowledged are resent to the node that answers (the
    hospital's row key makes a resent reading a duplicate, not a second row)."""

    def __init__(self, endpoints: tuple[tuple[str, int], ...]) -> None:
        if not endpoints:
            raise InvariantError("a gateway needs at least one hospital endpoint")
        self.endpoints = endpoints
        self.current = 0

    def attempts(self) -> list[tuple[str, int]]:
        n = len(self.endpoints)
        return [self.endpoints[(self.current + i) % n] for i in range(n)]

    def failed(self) -> None:
        self.current = (self.current + 1) % len(self.endpoints)

    def connected(self) -> None:
        pass  # self.current already names the node that answered


class Gateway:
    """One running gateway. ``await run(stop)``; ``request_reload()`` is SIGHUP."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        metrics: GatewayMetrics | None = None,
        connector: Connector | None = None,
        use_channel: bool = True,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics or GatewayMetrics()
        self.metrics_port: int | None = None
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.replay = ReplayStore(cfg.replay_db)
        # each watch looks before its file is read: a write in between is seen next time
        self._keys_watch = FileWatch(cfg.psk_store.path)
        self._keys_missing_reported = False
        self.keys = PskStore.load(cfg.psk_store.path, cfg.psk_store.key)
        self._cfg_watch = FileWatch(cfg.path)
        self.state = PipelineState(
            routes=cfg.routes, keys=self.keys, windows=self.replay, open_sealed=self._open_sealed
        )
        _warn_about_legacy_routes(cfg)
        self.spool = Spool(cfg.spool.path, cfg.spool.key, max_readings=cfg.spool.max_readings)
        if connector is None and use_channel:
            connector = hospital_connector(cfg)
            if connector is None:
                log.warning("no PQ channel available in this build: readings stay in the spool")
        self.forwarder = Forwarder(
            cfg.hospital,
            self.spool,
            self.metrics,
            connector=connector,
            on_durable=self._on_durable,
            on_spool_full=self._pause_mqtt,
            on_spool_room=self._resume_mqtt,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[_Message | _Connected] = asyncio.Queue()
        self._generation = 0
        self._current = 0  # generation whose messages the consumer is processing
        self._gen_lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._subscribed: dict[str, int] = {}
        self._reload_requested = False
        self._event_budget: dict[str, tuple[int, int]] = {}
        self._stopping = False  # a disconnect we asked for (shutdown, spool full)
        # (device, counter) accepted, not yet durable -> acks of its copies (MAX_HELD_ACKS)
        self._held: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
        self._held_count = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        if self.cfg.metrics.enabled:
            self.metrics_port = self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port)
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.metrics_port)
        self._client = self._make_client()
        self._start_mqtt()
        tasks = [
            asyncio.create_task(self._consume(stop), name="gateway-consume"),
            asyncio.create_task(self.forwarder.run(stop), name="gateway-forward"),
            asyncio.create_task(self._watch(stop), name="gateway-watch"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="gateway-stop")
        try:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    # a bug, not a peer: stop so that the supervisor restarts a clean process
                    # (nothing is lost: unacked messages stay with the broker)
                    raise t.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await asyncio.to_thread(self._stop_mqtt)
            self.metrics.close()
            self.spool.close()
            self.replay.close()
            log.info("gateway stopped")

    def request_reload(self) -> None:
        self._reload_requested = True

    # -- MQTT (callbacks run on paho's thread) ----------------------------------------------
    def _make_client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=m.client_id,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
            manual_ack=True,
        )
        self._secure(client)
        client.reconnect_delay_set(MQTT_RECONNECT_MIN_S, MQTT_RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    @staticmethod
    def _open_sealed(psk: bytes, device_id: str, payload: bytes) -> tuple[int, Reading]:
        """The seal check of every message (a seam, as :meth:`_secure` is, for the
        plaintext baseline of bench/bench_pipeline.py)."""
        return open_reading(psk, device_id, payload)

    def _secure(self, client: mqtt.Client) -> None:
        """Mutual TLS with the gateway identity (the seam the plaintext benchmark replaces)."""
        m = self.cfg.mqtt
        client.tls_set_context(client_context(m.ca, m.cert, m.key, server_name=m.server_name))

    def _start_mqtt(self) -> None:
        if self._client is None:
            raise InvariantError("self._client unset here")
        self._stopping = False
        m = self.cfg.mqtt
        self._client.connect_async(str(m.host), int(m.port), keepalive=int(m.keepalive_s))
        self._client.loop_start()

    def _stop_mqtt(self) -> None:
        self._stopping = True
        if self._client is not None:
            _stop_client(self._client)

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any = None
    ) -> None:
        if reason.is_failure:
            log.warning("MQTT connection refused: %s", reason)
            return
        with self._gen_lock:
            self._generation += 1
            gen = self._generation
        topics = [(r.topic, r.qos) for r in self.state.routes]
        client.subscribe(topics)
        self._subscribed = dict(topics)
        self.metrics.mqtt_up.set(1)
        log.info("MQTT session up (generation %d), subscribed to %d filters", gen, len(topics))
        self._post(_Connected(gen))

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.metrics.mqtt_up.set(0)
        if not self._stopping:
            log.warning("MQTT session lost (%s); paho reconnects", reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._gen_lock:
            gen = self._generation
        self._post(_Message(gen, msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.monotonic()))

    def _post(self, item: _Message | _Connected) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._inbox.put_nowait, item)

    def _ack(self, generation: int, mid: int, qos: int) -> None:
        if qos > 0 and generation == self._current and self._client is not None:
            self._client.ack(mid, qos)

    # -- the asyncio side ------------------------------------------------------------------
    async def _consume(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            item = await self._inbox.get()
            if isinstance(item, _Connected):
                # the broker redelivers every unacked message on this connection
                self._current = item.generation
                self.replay.reset_live()
                self.forwarder.drop_queued()
                self._held.clear()  # acks owed to the old connection are not sent
                self._held_count = 0
                continue
            self._handle(item)

    def _handle(self, msg: _Message) -> None:
        m = self.metrics
        m.received.inc()
        if msg.generation != self._current:
            return  # from a connection that is gone; the broker sends it again
        result = self.decide(msg.topic, msg.payload)
        m.receive_latency.observe(time.monotonic() - msg.arrived)
        if isinstance(result, Accepted):
            m.accepted.inc()
            if result.flagged:
                m.flagged.inc()
            log.debug("accepted %s #%d", result.item.device_id, result.item.counter)
            self.forwarder.submit(
                Pending(result.item, msg.mid, msg.qos, msg.generation, msg.arrived)
            )
            return
        m.rejected.labels(reason=result.reason).inc()
        if self._may_log(result.reason):
            security_event(
                "reading_rejected",
                component="gateway",
                reason=result.reason,
                peer=result.device_id,
                route=result.route.name if result.route else None,
                detail=result.detail,
                size=len(msg.payload),
            )
        # a replay is counted and logged like any refusal (the gateway cannot tell a
        # device's resend from an attacker's copy); only its acknowledgement may wait
        if result.reason == REPLAY and self._hold_ack(msg, result):
            return  # acknowledged once the first copy is durable
        self._ack(msg.generation, msg.mid, msg.qos)  # refused for good: do not redeliver

    def _hold_ack(self, msg: _Message, result: Rejected) -> bool:
        """A copy of a reading whose first copy is accepted but not yet durable: keep its
        ack until that one is (:meth:`_on_durable`). False: a plain replay (the reading is
        durable already, or this is not a copy of an accepted one)."""
        if result.device_id is None or msg.qos == 0:
            return False
        try:
            counter = parse_header(msg.payload).counter
        except SealedReadingError:
            return False
        durable = self.replay.durable(result.device_id)
        if durable is not None and not _fresh(durable, counter):
            return False  # durable: acknowledging the copy loses nothing
        if self._held_count >= MAX_HELD_ACKS:
            return True  # neither acknowledged nor counted: redelivered on reconnect
        self._held.setdefault((result.device_id, counter), []).append(
            (msg.generation, msg.mid, msg.qos)
        )
        self._held_count += 1
        self.metrics.duplicates_held.inc()
        return True

    def decide(self, topic: str, payload: bytes) -> Accepted | Rejected:
        """The pipeline's decision for one message, with the PSK store re-checked once.

        A device enrolled a moment ago publishes before the watcher's next poll: before its
        message is refused (and acknowledged, i.e. dropped) as ``unknown_device``, the PSK store
        is reloaded if its file changed (one ``stat``) and the lookup retried. An id that is
        still unknown afterwards is refused for good, so an unenrolled device cannot fill the
        broker's queue with messages the gateway never acknowledges.
        """
        result = process(topic, payload, self.state, now=time.monotonic(), wall=datetime.now(UTC))
        if (
            isinstance(result, Rejected)
            and result.reason == UNKNOWN_DEVICE
            and result.device_id is not None  # a valid id, merely not in the store we hold
            and self.refresh_keys()
        ):
            result = process(
                topic, payload, self.state, now=time.monotonic(), wall=datetime.now(UTC)
            )
        return result

    def _may_log(self, reason: str) -> bool:
        second = int(time.monotonic())
        start, count = self._event_budget.get(reason, (second, 0))
        if start != second:
            start, count = second, 0
        self._event_budget[reason] = (start, count + 1)
        if count == SECURITY_EVENTS_PER_REASON_PER_S:
            log.warning("more than %d '%s' rejections this second: counting only", count, reason)
        return count < SECURITY_EVENTS_PER_REASON_PER_S

    def _on_durable(self, batch: Sequence[Pending]) -> None:
        self.replay.mark_durable((p.item.device_id, p.item.counter) for p in batch)
        for p in batch:
            self._ack(p.generation, p.mid, p.qos)
            for generation, mid, qos in self._held.pop((p.item.device_id, p.item.counter), ()):
                self._held_count -= 1
                self._ack(generation, mid, qos)

    def _pause_mqtt(self) -> None:
        self._current = -1  # nothing in flight may be acked now
        self._stopping = True
        client = self._client
        if client is not None:
            asyncio.get_running_loop().run_in_executor(None, _stop_client, client)

    def _resume_mqtt(self) -> None:
        # a fresh client: paho's loop_start() on a stopped client leaks its wake-up sockets
        self._client = self._make_client()
        self._start_mqtt()

    # -- reloads ---------------------------------------------------------------------------
    async def _watch(self, stop: asyncio.Event) -> None:
        # at least every 0.5 s, so that a SIGHUP (request_reload) is acted on promptly
        async for _ in ticks(min(self.cfg.reload.poll_s or 1.0, 0.5), stop):
            # the file is looked at on every tick, so a SIGHUP does not leave its edit
            # to be "seen" (and applied a second time) at the next tick
            edited = self._cfg_watch.changed()
            if self._reload_requested or (self.cfg.reload.poll_s and edited):
                self._reload_requested = False
                self.reload_config()
            self.refresh_keys()

    def reload_config(self) -> bool:
        try:
            new = load_gateway_config(self.cfg.path)
        except GatewayConfigError as exc:
            self.metrics.reloads.labels(result="invalid").inc()
            log.error("gateway.yaml edit refused, previous configuration kept:\n%s", exc)
            return False
        restart_only = [
            name
            for name in ("mqtt", "psk_store", "state_dir", "hospital", "spool", "metrics")
            if getattr(new, name) != getattr(self.cfg, name)
        ]
        if restart_only:
            log.warning("changes to %s take effect at restart", ", ".join(restart_only))
        self.state.routes = new.routes
        self.cfg = _with_routes(self.cfg, new)
        self._resubscribe()
        self.metrics.reloads.labels(result="applied").inc()
        log.info("gateway.yaml reloaded: %d routes", len(new.routes))
        return True

    def _resubscribe(self) -> None:
        client = self._client
        if client is None:
            return
        want = {r.topic: r.qos for r in self.state.routes}
        gone = [t for t in self._subscribed if t not in want]
        new = [(t, q) for t, q in want.items() if self._subscribed.get(t) != q]
        if gone:
            client.unsubscribe(gone)
        if new:
            client.subscribe(new)
        self._subscribed = want

    def refresh_keys(self) -> bool:
        """Reload the PSK store if its file changed since it was read; True if reloaded."""
        watch = self._keys_watch
        if watch.changed():  # a bad file is reported once per change, not per message
            return self.reload_keys()
        if watch.missing and not self._keys_missing_reported:
            # a deleted store is no change (the keys held stay in force, a revocation is not
            # undone) but the operator hears of it once: the next start would fail
            self._keys_missing_reported = True
            log.error(
                "PSK store %s is missing, previous keys kept; restore it (or enrol again "
                "with 'pacegate pki') before the gateway restarts",
                watch.path,
            )
            self.metrics.key_reloads.labels(result="refused").inc()
        elif not watch.missing:
            self._keys_missing_reported = False
        return False

    def reload_keys(self) -> bool:
        try:
            keys = PskStore.load(self.cfg.psk_store.path, self.cfg.psk_store.key)
        except (ConfigError, ValueError, KeyError) as exc:
            # e.g. an older store put back: it could re-activate revoked devices
            log.error("PSK store reload failed, previous keys kept: %s", exc)
            self.metrics.key_reloads.labels(result="refused").inc()
            return False
        self.keys = keys
        self.state.keys = keys
        self.metrics.key_reloads.labels(result="applied").inc()
        log.info("PSK store reloaded: %d devices (generation %d)", len(keys), keys.generation)
        return True


def _fresh(window: ReplayWindow, counter: int) -> bool:
    try:
        window.check(counter)
    except ReplayRejected:
        return False
    return True


def _stop_client(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def _with_routes(old: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
    import dataclasses

    return dataclasses.replace(old, routes=new.routes, reload=new.reload)


def _warn_about_legacy_routes(cfg: GatewayConfig) -> None:
    """A gateway.yaml written before sealed-reading v2 still names v1: say so at start, since
    every reading of an updated device would otherwise be refused as unsupported_version."""
    for route in cfg.routes:
        if route.format == "sealed-reading" and route.version == 1:
            log.warning(
                "%s: route %r opens sealed-reading v1 only; pacegate devices send v2 "
                "(key per boot epoch) and would be refused as unsupported_version. "
                "Fix: set 'format: sealed-reading/v2' unless these devices cannot be updated",
                cfg.path,
                route.name,
            )

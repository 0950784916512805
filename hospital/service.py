"""``pacegate hospital -c hospital.yaml``: the ingest service.

Gateways open post-quantum channel sessions (only pinned identities get one). Each channel
message is one ``pacegate.ingest`` BATCH; the service stores it in one transaction and only
*then* answers the ACK, so a gateway that holds the ACK knows the readings are on disk.

:class:`IngestHandler` is the whole per-message logic as plain code (bytes in, ACK bytes out,
or :class:`~pacegate.ingest.IngestWireError`); the asyncio part around it only moves bytes and
runs the handler on the one writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from hospital.config import HospitalConfig
from hospital.store import ReadingStore, StoreError, open_store
from pacegate.channel import (
    ChannelClosed,
    ChannelServerStats,
    ChannelStream,
    load_identity,
    load_public_key,
    serve,
)
from pacegate.ingest import IngestAck, IngestBatch, IngestWireError, decode, encode_ack
from pacegate.log import security_event

log = logging.getLogger("pacegate.hospital")
COMPONENT = "hospital"


class HospitalMetrics:
    """The service's Prometheus metrics, in their own registry (tests make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.stored = Counter(
            "pacegate_hospital_stored", "readings stored (exactly once)", registry=self.registry
        )
        self.duplicates = Counter(
            "pacegate_hospital_duplicates",
            "readings already stored, absorbed (at-least-once delivery)",
            registry=self.registry,
        )
        # refusals by reason: ours (malformed ingest message, conflicting_duplicate,
        # store_error) and the channel's, prefixed "channel_" (handshake refusals such as
        # channel_unknown_client, and records that ended a session such as channel_bad_record)
        self.channel = ChannelServerStats()
        self._rejected: dict[str, int] = {}
        self._rejected_lock = threading.Lock()
        self.registry.register(_RejectedCollector(self))
        self.sessions = Gauge(
            "pacegate_hospital_sessions", "open gateway sessions", registry=self.registry
        )
        self.batches = Counter(
            "pacegate_hospital_batches",
            "batches committed and acknowledged",
            registry=self.registry,
        )

    def reject(self, reason: str, count: int = 1) -> None:
        with self._rejected_lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + count

    def rejected_by_reason(self) -> dict[str, int]:
        with self._rejected_lock:
            merged = dict(self._rejected)
        for reason, n in list(self.channel.refused.items()):
            key = f"channel_{reason}"
            merged[key] = merged.get(key, 0) + n
        return merged


class _RejectedCollector(Collector):
    def __init__(self, metrics: HospitalMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "pacegate_hospital_rejected",
            "messages, readings or connections refused, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(self._metrics.rejected_by_reason().items()):
            family.add_metric([reason], n)
        yield family


class IngestHandler:
    """One ingest message in, one ACK out, after the batch is durably committed."""

    def __init__(self, store: ReadingStore, metrics: HospitalMetrics) -> None:
        self.store = store
        self.metrics = metrics

    def handle(self, message: bytes, peer: str) -> bytes:
        """Store the BATCH in ``message`` and return the encoded ACK.

        Raises :class:`IngestWireError` for anything that is not a well-formed BATCH (the
        session must then be closed); it is counted and logged here. A storage failure
        raises as is, with no ACK: the gateway keeps the readings and sends them again.
        """
        try:
            msg = decode(message)
            if isinstance(msg, IngestAck):
                raise IngestWireError("a gateway sent an ACK", reason="unexpected_ack")
        except IngestWireError as exc:
            self.metrics.reject(exc.reason)
            security_event(
                "ingest_message_rejected",
                component=COMPONENT,
                reason=exc.reason,
                peer=peer,
                detail=str(exc),
                size=len(message),
            )
            raise
        return encode_ack(self._store(msg, peer))

    def _store(self, batch: IngestBatch, peer: str) -> IngestAck:
        result = self.store.store_batch(batch.items)  # returns after COMMIT (fsync)
        self.metrics.stored.inc(result.stored)
        self.metrics.duplicates.inc(result.duplicates)
        self.metrics.batches.inc()
        if result.conflicts:
            self.metrics.reject("conflicting_duplicate", result.conflicts)
            security_event(
                "conflicting_duplicate",
                component=COMPONENT,
                reason="conflicting_duplicate",
                peer=peer,
                detail="a (device, counter) already stored arrived with another reading",
                count=result.conflicts,
                batch_id=batch.batch_id,
            )
        log.debug(
            "batch %d from %s: %d stored, %d duplicates",
            batch.batch_id,
            peer,
            result.stored,
            result.duplicates,
        )
        return IngestAck(batch.batch_id, result.stored, result.duplicates)


@dataclass
class RunningMetrics:
    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics(cfg: HospitalConfig, metrics: HospitalMetrics) -> RunningMetrics:
    server, thread = start_http_server(
        cfg.metrics_port, addr=cfg.metrics_host, registry=metrics.registry
    )
    return RunningMetrics(cfg.metrics_host, int(server.server_port), server, thread)


class HospitalService:
    """The ingest service: the channel server, the store, the metrics."""

    def __init__(self, cfg: HospitalConfig, store: ReadingStore) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = HospitalMetrics()
        self.handler = IngestHandler(store, self.metrics)
        # SQLite has one writer: every batch goes through this one thread, in arrival order
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hospital-store")

    async def on_session(self, stream: ChannelStream) -> None:
        """Serve one gateway session: BATCH in, ACK out after commit, until it ends.
        Returning closes the session (``serve`` does it)."""
        peer = stream.peer_name
        loop = asyncio.get_running_loop()
        self.metrics.sessions.inc()
        log.info("session opened by gateway %s", peer)
        try:
            while True:
                try:
                    message = await stream.recv()
                except ChannelClosed as exc:
                    if exc.cause is not None:  # tampered, replayed, truncated record...
                        self.metrics.reject(f"channel_{exc.cause.reason}")
                    return
                try:
                    ack = await loop.run_in_executor(
                        self._writer, self.handler.handle, message, peer
                    )
                except IngestWireError:
                    return  # counted and logged by the handler; the session closes
                except Exception:
                    log.exception("storing a batch from %s failed; no ACK, session closed", peer)
                    self.metrics.reject("store_error")
                    return
                await stream.send(ack)
        except ChannelClosed:
            return  # the peer went away while we answered; it will resend
        finally:
            self.metrics.sessions.dec()
            log.info("session with gateway %s closed", peer)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.store.close()


async def run(
    cfg: HospitalConfig,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[HospitalService, asyncio.Server, RunningMetrics], None] | None = None,
) -> None:
    """Ingest over the PQ channel until ``stop`` is set."""
    identity = load_identity(cfg.identity_key, cfg.identity_name)
    allowed = {name: load_public_key(path) for name, path in cfg.allowed_gateways.items()}
    store = open_store(cfg)
    if store.anchor is not None and not store.anchor.exists():
        store.close()
        raise StoreError(
            f"{store.anchor.path}: the chain-head anchor of {store.name} is missing: the "
            "database may have been replaced or rolled back, and ingest would hide it. Run "
            f"'pacegate hospital verify -c {cfg.path}'; once the store is known good, "
            f"'pacegate hospital verify -c {cfg.path} --reanchor'"
        )
    service = HospitalService(cfg, store)
    running_metrics = start_metrics(cfg, service.metrics)
    try:
        server = await serve(
            cfg.listen_host,
            cfg.listen_port,
            identity=identity,
            allowed_clients=allowed,
            on_session=service.on_session,
            stats=service.metrics.channel,
            component=COMPONENT,
        )
        try:
            log.info(
                "hospital listening on %s:%s (%d readings stored; metrics on %s:%d)",
                cfg.listen_host,
                _bound_port(server, cfg.listen_port),
                store.count(),
                running_metrics.host,
                running_metrics.port,
            )
            if on_ready is not None:
                on_ready(service, server, running_metrics)
            await stop.wait()
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
    finally:
        running_metrics.close()
        service.close()


def _bound_port(server: asyncio.Server, default: int) -> int:
    with contextlib.suppress(AttributeError, IndexError, TypeError):
        return int(server.sockets[0].getsockname()[1])
    return default

"""The CKKS cloud worker: computes aggregates blind on the hospital's ciphertexts.

:class:`CloudSession` is the protocol, sans I/O: ``handle(message) -> reply`` for one
hospital session (one channel connection). It holds the *public* context only, refuses a
context that carries a secret key, and executes :func:`pacegate.analytics_wire.accumulator_plan`:
slot-wise sums of lanes and of lane products (one multiplication, no relinearization, no
rescaling, so neither relin nor Galois keys are needed). The hospital finishes the slot
sums after decryption. Where the arithmetic runs is the session's aggregator
(:mod:`cloud.aggregator`): in this process by default, or on a Dask cluster
(:mod:`cloud.dask_aggregator`). Either way every ciphertext is checked here first.

:func:`main` (``pacegate cloud -c cloud.yaml``) serves it over the post-quantum channel:
only the pinned hospital identity may connect. A refusal is answered with an ERROR
message, counted and logged as a security event; the session ends and the worker keeps
serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import tenseal as ts

from cloud.aggregator import Aggregator, AggregatorFactory, InProcessAggregator, Lane
from pacegate import analytics_wire as wire
from pacegate import ckks
from pacegate.analytics_wire import AnalyticsProtocolError
from pacegate.errors import InvariantError
from pacegate.log import security_event

log = logging.getLogger("pacegate.cloud")
COMPONENT = "cloud"
# With inputs bounded by hospital/analysis (products <= 2**15) a slot stays below
# 2**(15 + 20) < 2**ckks.MAX_SLOT_MAGNITUDE_BITS: 2**20 batches = 4.3 billion readings.
DEFAULT_MAX_BATCHES = 1 << 20


class SessionState(Enum):
    AWAIT_OPEN = "await_open"
    RECEIVING = "receiving"
    FAILED = "failed"


@dataclass
class WorkerStats:
    """Counters of one worker process (exported in logs; metrics can read them)."""

    sessions: int = 0
    batches: int = 0
    results: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class CloudSession:
    """One hospital's analysis session, sans I/O."""

    def __init__(
        self,
        *,
        max_batches: int = DEFAULT_MAX_BATCHES,
        stats: WorkerStats | None = None,
        peer: str | None = None,
        aggregator: AggregatorFactory = InProcessAggregator,
    ) -> None:
        self.max_batches = max_batches
        self._make_aggregator = aggregator
        self.stats = stats if stats is not None else WorkerStats()
        self.peer = peer
        self.state = SessionState.AWAIT_OPEN
        self.context: ts.Context | None = None
        self.error: AnalyticsProtocolError | None = None
        self.compute_seconds = 0.0
        self._plan: tuple[wire.Accumulator, ...] = ()
        self._lanes = 0
        self._aggregator: Aggregator | None = None
        self._pending: list[Lane] = []
        self._batches = 0  # complete batches folded into the accumulators

    @property
    def batches(self) -> int:
        return self._batches

    def handle(self, message: bytes) -> bytes:
        """Process one request; always return the one reply to send (maybe ERROR)."""
        try:
            if self.state is SessionState.FAILED:
                raise AnalyticsProtocolError(
                    "session already failed; open a new connection", reason="session_failed"
                )
            reply = self._dispatch(wire.decode(message))
        except AnalyticsProtocolError as exc:
            return self._fail(exc)
        return wire.encode(reply)

    def _fail(self, exc: AnalyticsProtocolError) -> bytes:
        if self.state is not SessionState.FAILED:
            self.stats.refused[exc.reason] += 1
            security_event(
                "analytics_refused",
                component=COMPONENT,
                reason=exc.reason,
                peer=self.peer,
                detail=str(exc),
            )
            self.error = exc
        self.state = SessionState.FAILED
        # Drop everything the session held: a refused session keeps no ciphertexts.
        self.close()
        return wire.encode(wire.Error(exc.reason, str(exc)))

    def close(self) -> None:
        """Drop the ciphertexts and the aggregator's work (the session is over)."""
        self._pending.clear()
        if self._aggregator is not None:
            self._aggregator.close()

    def _dispatch(self, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Open):
            return self._open(msg)
        if self.state is SessionState.AWAIT_OPEN:
            raise AnalyticsProtocolError(
                f"{type(msg).__name__.upper()} before OPEN", reason="unexpected_message"
            )
        if isinstance(msg, wire.Ciphertext):
            return self._ciphertext(msg)
        if isinstance(msg, wire.Fetch):
            return self._fetch(msg)
        raise AnalyticsProtocolError(
            f"a worker does not accept {type(msg).__name__.upper()}", reason="unexpected_message"
        )

    def _open(self, msg: wire.Open) -> wire.Message:
        if self.state is not SessionState.AWAIT_OPEN:
            raise AnalyticsProtocolError("second OPEN in one session", reason="unexpected_message")
        ctx = ckks.load_public_context(msg.context)
        if ctx.is_private():  # load_public_context refuses it; belt and braces
            raise AnalyticsProtocolError(
                "a context with a secret key", reason="secret_key_in_context"
            )
        self.context = ctx
        self._plan = wire.accumulator_plan(msg.bands)
        self._lanes = wire.lanes(msg.bands)
        self._aggregator = self._make_aggregator(
            context=ctx, context_bytes=msg.context, plan=self._plan
        )
        self.state = SessionState.RECEIVING
        self.stats.sessions += 1
        return wire.Ready(slots=ckks.SLOTS, max_batches=self.max_batches)

    def _ciphertext(self, msg: wire.Ciphertext) -> wire.Message:
        expected = (self._batches, len(self._pending))
        if (msg.batch, msg.lane) != expected:
            raise AnalyticsProtocolError(
                f"got batch {msg.batch} lane {msg.lane}, expected batch {expected[0]} "
                f"lane {expected[1]}",
                reason="out_of_order",
            )
        if msg.batch >= self.max_batches:
            raise AnalyticsProtocolError(
                f"session exceeds {self.max_batches} batches", reason="too_many_batches"
            )
        if self.context is None or self._aggregator is None:
            raise InvariantError("self.context unset here")
        started = time.perf_counter()
        vec = ckks.load_ciphertext(self.context, msg.data)
        self._pending.append(Lane(msg.data, vec))
        if len(self._pending) == self._lanes:
            self._aggregator.add_batch(self._pending)
            self._pending = []
            self._batches += 1
            self.stats.batches += 1
        self.compute_seconds += time.perf_counter() - started
        return wire.Ack(msg.batch, msg.lane)

    def _fetch(self, msg: wire.Fetch) -> wire.Message:
        if self._pending:
            raise AnalyticsProtocolError(
                f"FETCH with batch {self._batches} incomplete "
                f"({len(self._pending)} of {self._lanes} lanes)",
                reason="incomplete_batch",
            )
        if msg.batches != self._batches:
            raise AnalyticsProtocolError(
                f"hospital sent {msg.batches} batches, worker received {self._batches}",
                reason="batch_count_mismatch",
            )
        if self._batches == 0:
            raise AnalyticsProtocolError("FETCH before any batch", reason="no_data")
        if self._aggregator is None:
            raise InvariantError("self._aggregator unset here")
        if msg.name not in {acc.name for acc in self._plan}:
            raise AnalyticsProtocolError(
                f"no accumulator named {msg.name!r}", reason="unknown_accumulator"
            )
        started = time.perf_counter()
        data = self._aggregator.result(msg.name)
        self.compute_seconds += time.perf_counter() - started
        self.stats.results += 1
        return wire.Result(
            batches=self._batches,
            name=msg.name,
            data=data,
            compute_seconds=self.compute_seconds,
        )


# --- the service ---------------------------------------------------------------------


async def serve_session(stream: Any, session: CloudSession) -> None:
    """Run one session over a channel stream (``recv() -> bytes``, ``send(bytes)``)."""
    from pacegate.channel import ChannelClosed

    while True:
        try:
            request = await stream.recv()
        except ChannelClosed:
            return
        # In a thread: CKKS arithmetic, and a Dask aggregator waiting on its cluster, must
        # not stop the event loop that serves the other sessions and the channel itself.
        reply = await asyncio.to_thread(session.handle, request)
        await stream.send(reply)
        if session.state is SessionState.FAILED:
            return  # the ERROR reply is sent; serve() closes the stream


async def start_worker(
    config: Any,
    *,
    stats: WorkerStats | None = None,
    aggregator: AggregatorFactory = InProcessAggregator,
) -> asyncio.Server:
    """Listen on ``config.host:config.port`` (port 0: the OS picks) for pinned hospitals.
    ``config`` is a :class:`cloud.config.CloudConfig`; ``aggregator`` makes each session's
    aggregator (in this process unless given, e.g. a ``cloud.dask_aggregator.DaskBackend``)."""
    from pacegate import channel

    identity = channel.load_identity(config.identity_key, config.identity_name)
    allowed = {name: channel.load_public_key(path) for name, path in config.allowed_clients.items()}
    counters = stats if stats is not None else WorkerStats()

    async def on_session(stream: Any) -> None:
        peer = getattr(stream, "peer_name", None)
        session = CloudSession(
            max_batches=config.max_batches, stats=counters, peer=peer, aggregator=aggregator
        )
        log.info("analysis session opened", extra={"fields": {"peer": peer}})
        try:
            await serve_session(stream, session)
        finally:
            session.close()
            session.context = None  # drop the public context with the session
            log.info(
                "analysis session closed",
                extra={
                    "fields": {
                        "peer": peer,
                        "batches": session.batches,
                        "state": session.state.value,
                    }
                },
            )

    return await channel.serve(
        config.host,
        config.port,
        identity=identity,
        allowed_clients=allowed,
        on_session=on_session,
        component=COMPONENT,
    )


async def run(config: Any, stop: asyncio.Event) -> None:
    """Serve pinned hospitals until ``stop`` is set (``config``: a
    :class:`cloud.config.CloudConfig`; with ``aggregator: {backend: dask}`` each session's
    batches are summed on that Dask cluster)."""
    backend = None
    if getattr(config, "dask", None) is not None:
        from cloud.dask_aggregator import DaskBackend, DaskSettings

        d = config.dask
        # connecting may wait for a scheduler still starting: off the event loop
        backend = await asyncio.to_thread(
            DaskBackend,
            DaskSettings(
                scheduler=d.scheduler,
                ca_file=d.ca_file,
                cert=d.cert,
                key=d.key,
                batches_per_task=d.batches_per_task,
                max_tasks_in_flight=d.max_tasks_in_flight,
                task_timeout_s=d.task_timeout_s,
            ),
        )
    try:
        server = await (
            start_worker(config) if backend is None else start_worker(config, aggregator=backend)
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            log.info(
                "cloud worker listening",
                extra={"fields": {"host": config.host, "port": port, "dask": backend is not None}},
            )
            await stop.wait()
    finally:
        if backend is not None:
            backend.close()

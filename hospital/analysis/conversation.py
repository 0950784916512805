"""The analysis session with the cloud worker: OPEN, a window of CKKS ciphertexts in
flight, then FETCH each accumulator and finish it here."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Iterable

import tenseal as ts

from hospital.analysis.errors import AnalysisError
from hospital.analysis.lanes import (
    PlainSums,
    RowChunk,
    pack_lanes,
    recut_batches,
    statistics_from_sums,
)
from hospital.analysis.report import AnalysisReport, Timings
from hospital.analysis.rows import sequential_chunks
from hospital.analysis.settings import AnalysisSettings
from hospital.analysis.transport import Transport
from pacegate import analytics_wire as wire
from pacegate import ckks
from pacegate.reading import Reading


class Conversation:
    """Request/reply bookkeeping with a window of requests in flight."""

    def __init__(self, transport: Transport, timings: Timings) -> None:
        self.transport = transport
        self.timings = timings
        self.in_flight: list[tuple[int, int]] = []
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, msg: wire.Message) -> None:
        data = wire.encode(msg)
        started = time.perf_counter()
        await self.transport.send(data)
        self.timings.transfer += time.perf_counter() - started
        self.bytes_sent += len(data)

    async def recv(self) -> wire.Message:
        started = time.perf_counter()
        data = await self.transport.recv()
        self.timings.transfer += time.perf_counter() - started
        self.bytes_received += len(data)
        msg = wire.decode(data)
        if isinstance(msg, wire.Error):
            raise AnalysisError(
                f"the cloud worker refused the analysis: [{msg.code}] {msg.message}"
            )
        return msg

    async def drain_acks(self, keep: int) -> None:
        while len(self.in_flight) > keep:
            expected = self.in_flight.pop(0)
            msg = await self.recv()
            if not isinstance(msg, wire.Ack) or (msg.batch, msg.lane) != expected:
                raise AnalysisError(f"cloud worker answered {msg!r}, expected ACK {expected}")


async def analyze(
    readings: Iterable[list[Reading]],
    transport: Transport,
    settings: AnalysisSettings | None = None,
    *,
    context: ts.Context | None = None,
) -> AnalysisReport:
    """Run one analysis session over ``transport`` and return the report (not yet checked
    against the tolerance: see :meth:`AnalysisReport.failures`)."""
    settings = settings or AnalysisSettings()
    timings = Timings()
    return await analyze_chunks(
        sequential_chunks(readings, timings), transport, settings, timings, context=context
    )


async def analyze_chunks(
    chunks: AsyncIterator[RowChunk],
    transport: Transport,
    settings: AnalysisSettings,
    timings: Timings,
    *,
    context: ts.Context | None = None,
) -> AnalysisReport:
    """:func:`analyze` over row chunks (e.g. :meth:`ParallelRows.chunks`)."""
    t0 = time.perf_counter()
    ctx = context or ckks.create_context()
    conv = Conversation(transport, timings)
    await conv.send(wire.Open(bands=len(settings.bands), context=ckks.public_context_bytes(ctx)))
    ready = await conv.recv()
    if not isinstance(ready, wire.Ready) or ready.slots != ckks.SLOTS:
        raise AnalysisError(f"cloud worker answered {ready!r} to OPEN")
    plain = PlainSums(len(settings.bands))
    excluded = [0]
    batches = 0
    async for age, hr in recut_batches(chunks, settings.batch_size, excluded):
        if batches >= ready.max_batches:
            raise AnalysisError(
                f"more than {ready.max_batches} batches: narrow --since/--until or raise "
                "the worker's limits.max_batches"
            )
        lanes = pack_lanes(age, hr, settings, plain)
        for lane, column in enumerate(lanes):
            started = time.perf_counter()
            data = ckks.encrypt_vector(ctx, column)
            timings.ckks_encrypt += time.perf_counter() - started
            await conv.send(wire.Ciphertext(batch=batches, lane=lane, data=data))
            conv.in_flight.append((batches, lane))
            await conv.drain_acks(settings.window)
        batches += 1
    await conv.drain_acks(0)
    if batches == 0:
        raise AnalysisError("no plausible readings in the selected period: nothing to analyse")
    sums: dict[str, float] = {}
    for acc in wire.accumulator_plan(len(settings.bands)):
        await conv.send(wire.Fetch(batches=batches, name=acc.name))
        result = await conv.recv()
        if not isinstance(result, wire.Result) or result.name != acc.name:
            raise AnalysisError(f"cloud worker answered {result!r} to FETCH {acc.name}")
        if result.batches != batches:
            raise AnalysisError(f"cloud worker summed {result.batches} batches, sent {batches}")
        timings.compute = result.compute_seconds
        started = time.perf_counter()
        try:
            values = ckks.decrypt_vector(ctx, result.data, degree=acc.degree)
        except wire.AnalyticsProtocolError as exc:
            raise AnalysisError(f"cloud result {acc.name} refused: {exc}") from None
        sums[acc.name] = math.fsum(values.tolist())  # the slot sum, finished locally
        timings.decrypt += time.perf_counter() - started
    timings.total = time.perf_counter() - t0
    plain_stats = statistics_from_sums(
        {k: float(v) for k, v in plain.as_accumulators().items()}, settings
    )
    return AnalysisReport(
        settings=settings,
        plain=plain,
        encrypted=statistics_from_sums(sums, settings),
        plaintext=plain_stats,
        batches=batches,
        excluded_implausible=excluded[0],
        bytes_sent=conv.bytes_sent,
        bytes_received=conv.bytes_received,
        timings=timings,
    )

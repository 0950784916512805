"""The hospital side of the confidential analytics (``pacegate analyze``).

Stream readings out of the encrypted store, pack them into CKKS vectors (one vector per
lane: heart rate, age, out-of-range indicator, one indicator per age band), send them to
the cloud worker, which sums them and their products slot-wise *blind*; fetch the
encrypted sums, decrypt them, finish the slot sums, derive the statistics, and check
each one against the same statistic computed here in plaintext. Decrypted results never
go back to the cloud. Memory is bounded by one batch of :data:`pacegate.ckks.SLOTS`
readings, whatever the number of readings.

The ``analysis:`` section of hospital.yaml (this module owns it)::

    analysis:
      bands: [0, 40, 60, 75]   # lower edges of the age bands, years; the last is open
      tolerance: 1.0e-3        # relative error allowed between encrypted and plaintext
      batch_size: 4096         # readings per CKKS batch (<= 4096 slots)
      window: 16               # ciphertexts in flight before waiting for the worker's ACK
      workers: 2               # processes decrypting store rows beside the CKKS work (0: none)

With ``workers`` > 0 and a large enough store, rows are read and Fernet-decrypted by a pool
of processes (each opens the store and keyring itself, over a slice of row sequence
numbers) while this process CKKS-encrypts and ships the previous slices: decryption and
CKKS encryption run on different cores. Slices come back in order, so the batches are
exactly those of a sequential scan.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import resource
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import tenseal as ts

from pacegate import analytics_wire as wire
from pacegate import ckks
from pacegate.configfile import ConfigSection
from pacegate.errors import PacegateError
from pacegate.reading import (
    AGE_MAX,
    HEART_RATE_NORMAL_MAX,
    HEART_RATE_NORMAL_MIN,
    HEART_RATE_PLAUSIBLE_MAX,
    HEART_RATE_PLAUSIBLE_MIN,
    Reading,
)

log = logging.getLogger("pacegate.analysis")

DEFAULT_BANDS = (0, 40, 60, 75)
DEFAULT_TOLERANCE = 1e-3
DEFAULT_WINDOW = 16
DEFAULT_WORKERS = 2
# Rows per slice handed to a decrypting process (~0.3 s of work), and the smallest store
# worth starting processes for (starting one costs about a second).
DEFAULT_CHUNK_ROWS = 16_384
DEFAULT_PARALLEL_MIN_ROWS = 50_000
# An error below a millionth of the statistic's unit (bpm, years, share) passes even when
# the plaintext value is ~0 (a slope or correlation of random data), where relative
# error is meaningless.
ABSOLUTE_FLOOR = 1e-6


class AnalysisError(PacegateError):
    """The analysis could not run, or the worker refused it (message says why)."""


class ToleranceExceeded(AnalysisError):
    """An encrypted statistic differs from the plaintext one by more than the tolerance."""


@dataclass(frozen=True)
class AnalysisSettings:
    bands: tuple[int, ...] = DEFAULT_BANDS
    tolerance: float = DEFAULT_TOLERANCE
    batch_size: int = ckks.SLOTS
    window: int = DEFAULT_WINDOW
    workers: int = DEFAULT_WORKERS
    # not in hospital.yaml: tuning knobs for tests and benchmarks
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    parallel_min_rows: int = DEFAULT_PARALLEL_MIN_ROWS

    def __post_init__(self) -> None:
        if not self.bands or self.bands[0] != 0:
            raise ValueError("bands must start at 0 so that every reading falls in one band")
        if any(b <= a for a, b in zip(self.bands, self.bands[1:], strict=False)):
            raise ValueError(f"band edges must increase strictly, got {list(self.bands)}")
        if len(self.bands) > wire.MAX_BANDS:
            raise ValueError(f"at most {wire.MAX_BANDS} bands")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if not 1 <= self.batch_size <= ckks.SLOTS:
            raise ValueError(f"batch_size must be in [1, {ckks.SLOTS}]")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        if self.chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")

    def band_label(self, k: int) -> str:
        lo = self.bands[k]
        return f"{lo}-{self.bands[k + 1] - 1}" if k + 1 < len(self.bands) else f"{lo}+"


def parse_analysis_settings(section: ConfigSection) -> AnalysisSettings:
    """The ``analysis:`` section of hospital.yaml; every error names file, line and key."""
    section.check_keys({"bands", "tolerance", "batch_size", "window", "workers"})
    bands: tuple[int, ...] = DEFAULT_BANDS
    if "bands" in section.data and section.data["bands"] is not None:
        raw = section.data["bands"]
        if not isinstance(raw, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) for b in raw
        ):
            raise section.error("bands", "must be a list of integer ages", fix="e.g. [0, 40, 60]")
        bands = tuple(int(b) for b in raw)
    try:
        return AnalysisSettings(
            bands=bands,
            tolerance=section.get_float("tolerance", DEFAULT_TOLERANCE, lo=1e-12, hi=0.5),
            batch_size=section.get_int("batch_size", ckks.SLOTS, lo=1, hi=ckks.SLOTS),
            window=section.get_int("window", DEFAULT_WINDOW, lo=1, hi=1024),
            workers=section.get_int("workers", DEFAULT_WORKERS, lo=0, hi=64),
        )
    except ValueError as exc:
        raise section.error("bands", str(exc), fix="strictly increasing, starting at 0") from None


# --- plaintext reference and lane packing -----------------------------------------------


@dataclass
class PlainSums:
    """Exact integer sums, the reference the encrypted results are checked against."""

    bands: int
    n: int = 0
    hr: int = 0
    hr2: int = 0
    age: int = 0
    age2: int = 0
    age_hr: int = 0
    out_of_range: int = 0
    band_n: list[int] = field(default_factory=list)
    band_hr: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.band_n = [0] * self.bands
        self.band_hr = [0] * self.bands

    def as_accumulators(self) -> dict[str, float]:
        out: dict[str, float] = {
            "hr": self.hr,
            "hr2": self.hr2,
            "age": self.age,
            "age2": self.age2,
            "age_hr": self.age_hr,
            "out_of_range": self.out_of_range,
        }
        for k in range(self.bands):
            out[f"band{k}_n"] = self.band_n[k]
            out[f"band{k}_hr"] = self.band_hr[k]
        return out


IntArray = npt.NDArray[np.int64]


@dataclass
class RowChunk:
    """The plausible readings of one slice of the store, as two integer columns: what
    crosses from a decrypting process to the analysis (no timestamps, no device ids)."""

    age: IntArray
    hr: IntArray
    excluded: int = 0  # implausible readings of the slice, left out
    seconds: float = 0.0  # time spent reading and decrypting the slice
    peak_rss: int = 0  # of the process that decrypted it, bytes (0: this process)


def chunk_from_readings(readings: Iterable[Reading]) -> RowChunk:
    """Columns of the plausible readings; implausible ones (sensor glitches, flagged at
    ingest) are counted and left out: they would distort the statistics and, unbounded,
    could overflow a CKKS slot."""
    ages: list[int] = []
    hrs: list[int] = []
    excluded = 0
    for r in readings:
        if r.plausible:
            ages.append(r.age)
            hrs.append(r.heart_rate_bpm)
        else:
            excluded += 1
    return RowChunk(np.array(ages, dtype=np.int64), np.array(hrs, dtype=np.int64), excluded)


def chunk_from_columns(age: IntArray, hr: IntArray) -> RowChunk:
    """:func:`chunk_from_readings` for columns (the same plausibility rule)."""
    ok = (hr >= HEART_RATE_PLAUSIBLE_MIN) & (hr <= HEART_RATE_PLAUSIBLE_MAX) & (age <= AGE_MAX)
    return RowChunk(age[ok], hr[ok], int(len(ok) - np.count_nonzero(ok)))


def pack_lanes(
    age: IntArray, hr: IntArray, settings: AnalysisSettings, plain: PlainSums
) -> list[IntArray]:
    """The lane vectors of one batch (``wire.lanes(bands)`` arrays), updating ``plain``."""
    out = ((hr < HEART_RATE_NORMAL_MIN) | (hr > HEART_RATE_NORMAL_MAX)).astype(np.int64)
    band = np.searchsorted(np.asarray(settings.bands), age, side="right") - 1
    lanes: list[IntArray] = [out] * wire.lanes(len(settings.bands))
    lanes[wire.LANE_HEART_RATE] = hr
    lanes[wire.LANE_AGE] = age
    lanes[wire.LANE_OUT_OF_RANGE] = out
    plain.n += len(hr)
    plain.hr += int(hr.sum())
    plain.hr2 += int((hr * hr).sum())
    plain.age += int(age.sum())
    plain.age2 += int((age * age).sum())
    plain.age_hr += int((age * hr).sum())
    plain.out_of_range += int(out.sum())
    for k in range(len(settings.bands)):
        mask = (band == k).astype(np.int64)
        lanes[wire.LANE_FIRST_BAND + k] = mask
        plain.band_n[k] += int(mask.sum())
        plain.band_hr[k] += int((mask * hr).sum())
    return lanes


def statistics_from_sums(sums: dict[str, float], settings: AnalysisSettings) -> dict[str, float]:
    """The reported statistics from the (slot-summed) accumulators. Undefined ones (no
    readings in a band, zero variance) are left out."""
    bands = len(settings.bands)
    n = sum(sums[f"band{k}_n"] for k in range(bands))
    stats: dict[str, float] = {"count": n}
    if n <= 0.5:
        return stats
    mean = sums["hr"] / n
    var = max(sums["hr2"] / n - mean * mean, 0.0)
    stats["heart_rate_mean"] = mean
    stats["heart_rate_variance"] = var
    stats["heart_rate_std"] = math.sqrt(var)
    stats["out_of_range_share"] = sums["out_of_range"] / n
    for k in range(bands):
        label = settings.band_label(k)
        bn = sums[f"band{k}_n"]
        stats[f"band_{label}_count"] = bn
        if bn > 0.5:
            stats[f"band_{label}_heart_rate_mean"] = sums[f"band{k}_hr"] / bn
    sxx = n * sums["age2"] - sums["age"] ** 2
    syy = n * sums["hr2"] - sums["hr"] ** 2
    sxy = n * sums["age_hr"] - sums["age"] * sums["hr"]
    if sxx > 0:
        stats["age_heart_rate_slope"] = sxy / sxx
        if syy > 0:
            stats["age_heart_rate_correlation"] = sxy / math.sqrt(sxx * syy)
    return stats


# --- the session ---------------------------------------------------------------------------


class Transport(Protocol):
    """What the session needs from the channel (``ChannelStream`` fits)."""

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...


class LocalTransport:
    """Hands messages to an in-process handler (``CloudSession.handle``): for tests and for
    the benchmark's in-process mode. Replies are queued in order, as on a channel."""

    def __init__(self, handle: Callable[[bytes], bytes]) -> None:
        self._handle = handle
        self._replies: list[bytes] = []
        self.sent: list[int] = []

    async def send(self, data: bytes) -> None:
        self._replies.append(self._handle(data))

    async def recv(self) -> bytes:
        if not self._replies:
            raise AnalysisError("no reply pending")
        return self._replies.pop(0)


@dataclass
class Timings:
    """Seconds per phase. With decrypting processes the phases overlap: ``decrypt_rows`` is
    then their summed busy time and ``rows_wait`` the time this process waited for rows."""

    decrypt_rows: float = 0.0
    ckks_encrypt: float = 0.0
    transfer: float = 0.0
    compute: float = 0.0  # as reported by the worker
    decrypt: float = 0.0
    total: float = 0.0
    rows_wait: float = 0.0
    row_workers: int = 0  # decrypting processes used (0: rows decrypted in this process)
    row_workers_peak_rss: int = 0  # bytes, the largest of them


@dataclass
class AnalysisReport:
    settings: AnalysisSettings
    plain: PlainSums
    encrypted: dict[str, float]
    plaintext: dict[str, float]
    batches: int
    excluded_implausible: int
    bytes_sent: int
    bytes_received: int
    timings: Timings
    # rows 1..store_rows were checked against the chain and its anchor (0: not a store)
    store_rows: int = 0
    period: tuple[datetime | None, datetime | None] = (None, None)

    def failures(self) -> list[str]:
        out = []
        for name, plain in self.plaintext.items():
            enc = self.encrypted.get(name)
            if enc is None:
                out.append(f"{name}: no encrypted result")
                continue
            err = abs(enc - plain)
            if not err <= max(self.settings.tolerance * abs(plain), ABSOLUTE_FLOOR):
                out.append(
                    f"{name}: encrypted {enc:.9g} vs plaintext {plain:.9g} "
                    f"(error {err:.3g} > tolerance {self.settings.tolerance:g} relative)"
                )
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def to_json(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        for name, plain in self.plaintext.items():
            enc = self.encrypted.get(name, float("nan"))
            err = abs(enc - plain)
            stats[name] = {
                "encrypted": enc,
                "plaintext": plain,
                "abs_error": err,
                "rel_error": err / abs(plain) if plain else err,
            }
        t = self.timings
        return {
            "ok": self.ok,
            "count": self.plain.n,
            "heart_rate_mean": stats.get("heart_rate_mean"),
            "statistics": stats,
            "failures": self.failures(),
            "tolerance": self.settings.tolerance,
            "bands": [self.settings.band_label(k) for k in range(len(self.settings.bands))],
            "batches": self.batches,
            "excluded_implausible": self.excluded_implausible,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "timings_s": {
                "decrypt_rows": t.decrypt_rows,
                "ckks_encrypt": t.ckks_encrypt,
                "transfer": t.transfer,
                "compute": t.compute,
                "decrypt": t.decrypt,
                "total": t.total,
                "rows_wait": t.rows_wait,
            },
            "row_workers": t.row_workers,
            # what the analysis covers: every row of the store (within --since/--until),
            # each checked against the hash chain and the anchor first
            "scope": {
                "store_rows": self.store_rows,
                "chain_verified": self.store_rows > 0,
                "since": self.period[0].isoformat() if self.period[0] else None,
                "until": self.period[1].isoformat() if self.period[1] else None,
            },
        }


async def _sequential_chunks(
    readings: Iterable[list[Reading]], timings: Timings
) -> AsyncIterator[RowChunk]:
    """Row chunks from an in-process iterable (the store's ``iter_readings``, or a list)."""
    it = iter(readings)
    while True:
        started = time.perf_counter()
        batch = next(it, None)
        chunk = None if batch is None else chunk_from_readings(batch)
        timings.decrypt_rows += time.perf_counter() - started
        if chunk is None:
            return
        yield chunk


async def _value_chunks(
    values: Iterator[tuple[list[int], list[int]]], timings: Timings
) -> AsyncIterator[RowChunk]:
    """Row chunks from the store's value scan, in this process."""
    while True:
        started = time.perf_counter()
        batch = next(values, None)
        chunk = None if batch is None else chunk_from_columns(*map(_int_column, batch))
        timings.decrypt_rows += time.perf_counter() - started
        if chunk is None:
            return
        yield chunk


def _int_column(values: list[int]) -> IntArray:
    return np.array(values, dtype=np.int64)


async def _batches(
    source: AsyncIterator[RowChunk], size: int, excluded: list[int]
) -> AsyncIterator[tuple[IntArray, IntArray]]:
    """Re-cut row chunks into CKKS batches of ``size`` readings (``(age, hr)`` columns),
    in order: the batches of a sequential scan, however the chunks were cut."""
    ages: list[IntArray] = []
    hrs: list[IntArray] = []
    pending = 0
    async for chunk in source:
        excluded[0] += chunk.excluded
        ages.append(chunk.age)
        hrs.append(chunk.hr)
        pending += len(chunk.age)
        if pending < size:
            continue
        age, hr = np.concatenate(ages), np.concatenate(hrs)
        start = 0
        while pending - start >= size:
            yield age[start : start + size], hr[start : start + size]
            start += size
        ages, hrs, pending = [age[start:]], [hr[start:]], pending - start
    if pending:
        yield np.concatenate(ages), np.concatenate(hrs)


# --- decrypting the store in other processes ---------------------------------------------

_WORKER_STORES: dict[tuple[str, str], Any] = {}


def _decrypt_slice(
    db_path: str,
    keyring_path: str,
    anchor_path: str,
    lo: int,
    hi: int,
    since: datetime | None,
    until: datetime | None,
) -> RowChunk:
    """In a decrypting process: rows ``lo <= seq < hi`` as columns. The process opens the
    store and its keyring itself (once); no key crosses the process boundary."""
    started = time.perf_counter()
    try:
        store = _WORKER_STORES.get((db_path, keyring_path))
        if store is None:
            from hospital.store import SqliteReadingStore

            store = SqliteReadingStore.open(Path(db_path), Path(keyring_path), Path(anchor_path))
            _WORKER_STORES[(db_path, keyring_path)] = store
        ages: list[int] = []
        rates: list[int] = []
        # each slice checks its rows' links from the row before it: together the slices
        # check the whole chain, as verify does
        for batch_ages, batch_rates in store.iter_reading_values(
            since, until, seq_range=(lo, hi), check_chain=True
        ):
            ages += batch_ages
            rates += batch_rates
        chunk = chunk_from_columns(_int_column(ages), _int_column(rates))
    except Exception as exc:  # re-raised in the analysis process: must pickle
        raise AnalysisError(f"decrypting store rows {lo}..{hi - 1} failed: {exc}") from None
    chunk.seconds = time.perf_counter() - started
    chunk.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return chunk


class ParallelRows:
    """Decrypt the store's rows in ``settings.workers`` processes (spawned: nothing of this
    process is inherited), ``chunk_rows`` rows per task, a bounded number of tasks ahead.
    Chunks come back in sequence order. Rows stored after :meth:`start` are not read. A
    decrypting process that dies fails the analysis (``BrokenProcessPool``), never hangs it.
    """

    def __init__(
        self,
        db_path: Path,
        keyring_path: Path,
        anchor_path: Path,
        bounds: tuple[int, int],
        settings: AnalysisSettings,
        timings: Timings,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> None:
        self._args = (str(db_path), str(keyring_path), str(anchor_path))
        self._bounds = bounds
        self._settings = settings
        self._timings = timings
        self._since, self._until = since, until
        self._pool: ProcessPoolExecutor | None = None
        self._starts: Iterator[int] = iter(())
        self._pending: deque[Future[RowChunk]] = deque()

    def start(self) -> None:
        """Start the processes and queue the first slices (before the CKKS context is made
        and the session opened, so they overlap)."""
        workers = self._settings.workers
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self._timings.row_workers = workers
        lo, hi = self._bounds
        self._starts = iter(range(lo, hi + 1, self._settings.chunk_rows))
        for _ in range(2 * workers + 2):  # bounded read-ahead
            self._submit()

    def _submit(self) -> None:
        start = next(self._starts, None)
        if start is not None and self._pool is not None:
            stop = min(start + self._settings.chunk_rows, self._bounds[1] + 1)
            args = (*self._args, start, stop, self._since, self._until)
            self._pending.append(self._pool.submit(_decrypt_slice, *args))

    async def chunks(self) -> AsyncIterator[RowChunk]:
        if self._pool is None:
            self.start()
        while self._pending:
            started = time.perf_counter()
            chunk = await asyncio.wrap_future(self._pending.popleft())
            self._timings.rows_wait += time.perf_counter() - started
            self._submit()
            self._timings.decrypt_rows += chunk.seconds
            self._timings.row_workers_peak_rss = max(
                self._timings.row_workers_peak_rss, chunk.peak_rss
            )
            yield chunk

    def close(self) -> None:
        """Drop queued slices, let running ones finish (a fraction of a second), reap."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()


class _Conversation:
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
        _sequential_chunks(readings, timings), transport, settings, timings, context=context
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
    conv = _Conversation(transport, timings)
    await conv.send(wire.Open(bands=len(settings.bands), context=ckks.public_context_bytes(ctx)))
    ready = await conv.recv()
    if not isinstance(ready, wire.Ready) or ready.slots != ckks.SLOTS:
        raise AnalysisError(f"cloud worker answered {ready!r} to OPEN")
    plain = PlainSums(len(settings.bands))
    excluded = [0]
    batches = 0
    async for age, hr in _batches(chunks, settings.batch_size, excluded):
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


# --- against a hospital config: its store + the channel to its cloud --------------------


async def run_analysis_async(
    config: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    settings: AnalysisSettings | None = None,
    transport: Transport | None = None,
) -> AnalysisReport:
    """Analyse the store that the hospital config file ``config`` names: the cloud endpoint
    and identities come from it too. ``transport`` replaces the channel (tests, the
    in-process benchmark)."""
    from hospital.config import load_hospital_config
    from hospital.store import SqliteReadingStore, StoreError

    cfg = load_hospital_config(config)
    if settings is None:
        settings = parse_analysis_settings(cfg.analysis)
    store = SqliteReadingStore.open(cfg.database, cfg.keyring, cfg.anchor)
    stream: Any = None
    try:
        if transport is None:
            from pacegate import channel

            identity = channel.load_identity(cfg.identity_key, cfg.identity_name)
            server_key = channel.load_public_key(cfg.cloud.server_key)
            try:
                stream = await channel.connect(
                    cfg.cloud.host,
                    cfg.cloud.port,
                    identity=identity,
                    server_name=cfg.cloud.server_name,
                    server_key=server_key,
                )
            except OSError as exc:
                raise AnalysisError(
                    f"cannot reach the cloud worker at {cfg.cloud.host}:{cfg.cloud.port} "
                    f"({exc.strerror or exc}); is 'pacegate cloud' running? "
                    f"(endpoint from {cfg.path}: cloud.host/cloud.port)"
                ) from None
            transport = stream
        # The store's integrity first: the head and its anchor (no rollback) here, every
        # row's chain link as the rows are read, so a store verify would fail is refused.
        # The analysis covers the whole store, rows 1..last (or the period within it).
        try:
            last = store.check_head()
        except StoreError as exc:
            raise AnalysisError(f"the store's integrity check failed: {exc}") from None
        bounds = (1, last)
        if settings.workers > 0 and last >= settings.parallel_min_rows:
            timings = Timings()
            rows = ParallelRows(
                cfg.database,
                cfg.keyring,
                cfg.anchor,
                bounds,
                settings,
                timings,
                since=since,
                until=until,
            )
            try:
                rows.start()
                report = await analyze_chunks(rows.chunks(), transport, settings, timings)
            finally:
                rows.close()
        else:
            timings = Timings()
            values = store.iter_reading_values(
                since, until, settings.batch_size, seq_range=(1, last + 1), check_chain=True
            )
            try:
                report = await analyze_chunks(
                    _value_chunks(values, timings), transport, settings, timings
                )
            except StoreError as exc:
                raise AnalysisError(f"the store's integrity check failed: {exc}") from None
        report.store_rows, report.period = last, (since, until)
        return report
    finally:
        if stream is not None:
            await stream.close()
        store.close()


def run_analysis(
    config: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    settings: AnalysisSettings | None = None,
) -> dict[str, Any]:
    """Synchronous API: run the analysis and return its JSON report (``ok`` says whether
    every statistic is within tolerance; the caller decides what a failure means)."""
    report = asyncio.run(run_analysis_async(config, since=since, until=until, settings=settings))
    return report.to_json()

"""Rows out of the store as :class:`~hospital.analysis.lanes.RowChunk` columns: in this
process, or decrypted by a pool of processes.

With ``workers`` > 0 and a large enough store, rows are read and Fernet-decrypted by a pool
of processes (each opens the store and keyring itself, over a slice of row sequence
numbers) while this process CKKS-encrypts and ships the previous slices: decryption and
CKKS encryption run on different cores. Slices come back in order, so the batches are
exactly those of a sequential scan.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np

from hospital.analysis.errors import AnalysisError
from hospital.analysis.lanes import IntArray, RowChunk, chunk_from_columns, chunk_from_readings
from hospital.analysis.report import Timings
from hospital.analysis.settings import AnalysisSettings
from hospital.config import load_hospital_config
from hospital.store import ReadingStore, open_store
from pacegate.reading import Reading


async def sequential_chunks(
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


async def value_chunks(
    values: Iterator[tuple[list[int], list[int]]], timings: Timings
) -> AsyncIterator[RowChunk]:
    """Row chunks from the store's value scan, in this process."""
    while True:
        started = time.perf_counter()
        batch = next(values, None)
        chunk = None if batch is None else chunk_from_columns(*map(int_column, batch))
        timings.decrypt_rows += time.perf_counter() - started
        if chunk is None:
            return
        yield chunk


def int_column(values: list[int]) -> IntArray:
    return np.array(values, dtype=np.int64)


# in a decrypting process: the store it opened, per hospital config (opened once)
_WORKER_STORES: dict[str, ReadingStore] = {}


def _decrypt_slice(
    config: str,
    lo: int,
    hi: int,
    since: datetime | None,
    until: datetime | None,
) -> RowChunk:
    """In a decrypting process: rows ``lo <= seq < hi`` as columns. The process opens the
    store that the hospital config ``config`` names, with its keyring, itself (once); no key
    crosses the process boundary."""
    started = time.perf_counter()
    try:
        store = _WORKER_STORES.get(config)
        if store is None:
            store = open_store(load_hospital_config(config))
            _WORKER_STORES[config] = store
        ages: list[int] = []
        rates: list[int] = []
        # each slice checks its rows' links from the row before it: together the slices
        # check the whole chain, as verify does
        for batch_ages, batch_rates in store.iter_reading_values(
            since, until, seq_range=(lo, hi), check_chain=True
        ):
            ages += batch_ages
            rates += batch_rates
        chunk = chunk_from_columns(int_column(ages), int_column(rates))
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
        config: Path,
        bounds: tuple[int, int],
        settings: AnalysisSettings,
        timings: Timings,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> None:
        self._config = str(config)
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
            args = (self._config, start, stop, self._since, self._until)
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

"""One analysis of the store that a hospital config names, over the channel to its cloud
worker (``pacegate analyze``)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

from hospital.analysis.conversation import analyze_chunks
from hospital.analysis.errors import AnalysisError
from hospital.analysis.report import AnalysisReport, Timings
from hospital.analysis.rows import ParallelRows, value_chunks
from hospital.analysis.settings import AnalysisSettings, parse_analysis_settings
from hospital.analysis.transport import Transport
from hospital.config import load_hospital_config
from hospital.store import StoreError, open_store


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
    cfg = load_hospital_config(config)
    if settings is None:
        settings = parse_analysis_settings(cfg.analysis)
    store = open_store(cfg)
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
                cfg.path,
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
                    value_chunks(values, timings), transport, settings, timings
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

"""The plaintext side of an analysis, pure: row chunks as integer columns, the lane vectors
of a CKKS batch, the exact reference sums, and the statistics derived from sums."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hospital.analysis.settings import AnalysisSettings
from pacegate import analytics_wire as wire
from pacegate.reading import (
    AGE_MAX,
    HEART_RATE_NORMAL_MAX,
    HEART_RATE_NORMAL_MIN,
    HEART_RATE_PLAUSIBLE_MAX,
    HEART_RATE_PLAUSIBLE_MIN,
    Reading,
)


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


async def recut_batches(
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

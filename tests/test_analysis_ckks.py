"""The hospital's analysis against the real cloud session, in memory, with real TenSEAL:
every statistic computed blind is within tolerance of the plaintext one."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
import tenseal as ts

from cloud.worker import CloudSession
from hospital.analysis.conversation import analyze
from hospital.analysis.errors import AnalysisError
from hospital.analysis.lanes import statistics_from_sums
from hospital.analysis.settings import AnalysisSettings
from hospital.analysis.transport import LocalTransport
from pacegate import ckks
from pacegate.reading import Reading

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def generated_readings(n: int, *, seed: int = 7) -> list[Reading]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        age = rng.randint(18, 95)
        # heart rate rises a little with age, plus noise; some outside 60-100
        hr = max(30, min(200, round(55 + 0.25 * age + rng.gauss(0, 14))))
        out.append(Reading(age, hr, 1000 + i % 50, T0 + timedelta(seconds=i)))
    return out


def batches_of(readings: list[Reading], size: int) -> list[list[Reading]]:
    return [readings[i : i + size] for i in range(0, len(readings), size)]


@pytest.fixture(scope="module")
def context() -> ts.Context:  # context creation costs; one per module
    return ckks.create_context()


async def test_every_encrypted_statistic_is_within_tolerance_of_plaintext(
    context: ts.Context,
) -> None:
    readings = generated_readings(6000)
    # two glitches: stored and flagged at ingest, left out of the statistics
    readings.append(Reading(40, 900, 1, T0))
    readings.append(Reading(200, 70, 1, T0))
    session = CloudSession()
    report = await analyze(
        batches_of(readings, 1000),
        LocalTransport(session.handle),
        AnalysisSettings(bands=(0, 40, 65)),
        context=context,
    )
    assert report.failures() == []
    assert report.batches == 2  # 6000 plausible readings in 4096-slot batches
    assert report.excluded_implausible == 2
    assert report.plain.n == 6000
    expected = {
        "count",
        "heart_rate_mean",
        "heart_rate_variance",
        "heart_rate_std",
        "out_of_range_share",
        "age_heart_rate_slope",
        "age_heart_rate_correlation",
        "band_0-39_count",
        "band_0-39_heart_rate_mean",
        "band_40-64_count",
        "band_40-64_heart_rate_mean",
        "band_65+_count",
        "band_65+_heart_rate_mean",
    }
    assert set(report.plaintext) == expected
    assert set(report.encrypted) == expected
    for name, plain in report.plaintext.items():
        assert report.encrypted[name] == pytest.approx(plain, rel=1e-3, abs=1e-6), name
    assert report.plaintext["age_heart_rate_slope"] > 0.1  # the generated trend is found
    out = report.to_json()
    assert out["ok"] is True
    assert out["count"] == 6000
    assert set(out["heart_rate_mean"]) >= {"encrypted", "plaintext", "abs_error"}
    assert report.bytes_sent > 2 * 6 * 200_000  # 2 batches x 6 lanes, ~260 KB each


async def test_plaintext_reference_matches_a_direct_computation(context: ts.Context) -> None:
    readings = generated_readings(500, seed=3)
    report = await analyze(
        [readings], LocalTransport(CloudSession().handle), AnalysisSettings(), context=context
    )
    hrs = [r.heart_rate_bpm for r in readings]
    mean = sum(hrs) / len(hrs)
    var = sum((h - mean) ** 2 for h in hrs) / len(hrs)
    assert report.plaintext["heart_rate_mean"] == pytest.approx(mean, rel=1e-12)
    assert report.plaintext["heart_rate_variance"] == pytest.approx(var, rel=1e-9)
    share = sum(1 for h in hrs if not 60 <= h <= 100) / len(hrs)
    assert report.plaintext["out_of_range_share"] == pytest.approx(share, rel=1e-12)
    assert report.encrypted["out_of_range_share"] == pytest.approx(share, rel=1e-3)


def test_a_result_off_by_more_than_the_tolerance_is_reported_as_a_failure() -> None:
    settings = AnalysisSettings(bands=(0,))
    sums = {
        "hr": 700.0,
        "hr2": 49500.0,
        "age": 500.0,
        "age2": 26000.0,
        "age_hr": 35100.0,
        "out_of_range": 1.0,
        "band0_n": 10.0,
        "band0_hr": 700.0,
    }
    good = statistics_from_sums(sums, settings)
    bad = statistics_from_sums({**sums, "hr": 700.0 * 1.01}, settings)
    from hospital.analysis.lanes import PlainSums
    from hospital.analysis.report import AnalysisReport, Timings

    report = AnalysisReport(settings, PlainSums(1), bad, good, 1, 0, 0, 0, Timings())
    failures = report.failures()
    assert any(f.startswith("heart_rate_mean:") for f in failures)
    assert report.to_json()["ok"] is False


async def test_an_empty_period_is_refused_with_a_clear_error(context: ts.Context) -> None:
    with pytest.raises(AnalysisError, match="no plausible readings"):
        await analyze([[]], LocalTransport(CloudSession().handle), context=context)


def test_bands_must_start_at_zero_and_increase() -> None:
    with pytest.raises(ValueError, match="start at 0"):
        AnalysisSettings(bands=(10, 40))
    with pytest.raises(ValueError, match="increase"):
        AnalysisSettings(bands=(0, 40, 40))

"""The simulated wearer: reproducible from a seed, physiologically plausible, with episodes."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta

import pytest

from device_sim.model import (
    SENSOR_MAX_BPM,
    SENSOR_MIN_BPM,
    HeartModel,
    State,
    sensor_id_for,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _run(model: HeartModel, seconds: int, dt: float = 1.0) -> list[int]:
    return [model.step(dt, T0 + timedelta(seconds=i * dt)).heart_rate_bpm for i in range(seconds)]


def test_same_seed_and_device_give_the_same_readings() -> None:
    assert _run(HeartModel("pm-0001", seed=7), 600) == _run(HeartModel("pm-0001", seed=7), 600)


def test_another_seed_or_another_device_gives_other_readings() -> None:
    base = _run(HeartModel("pm-0001", seed=7), 600)
    assert _run(HeartModel("pm-0001", seed=8), 600) != base
    assert _run(HeartModel("pm-0002", seed=7), 600) != base


def test_reading_carries_the_wearers_age_and_sensor_id() -> None:
    model = HeartModel("pm-0042", seed=1)
    reading = model.step(1.0, T0)
    assert reading.age == model.patient.age
    assert reading.sensor_id == sensor_id_for("pm-0042") == model.patient.sensor_id
    assert reading.timestamp == T0


def test_population_is_elderly_and_rests_near_seventy_bpm() -> None:
    models = [HeartModel(f"pm-{i:04d}", seed=3) for i in range(300)]
    ages = [m.patient.age for m in models]
    resting = [m.patient.resting_bpm for m in models]
    assert 68 <= statistics.mean(ages) <= 80
    assert 65 <= statistics.mean(resting) <= 75
    assert all(18 <= a <= 99 for a in ages)


def test_a_day_has_activity_and_stays_within_sensor_range() -> None:
    model = HeartModel("pm-0001", seed=1)
    states: set[State] = set()
    values = []
    for i in range(0, 86_400, 5):
        values.append(model.step(5.0, T0 + timedelta(seconds=i)).heart_rate_bpm)
        states.add(model.state)
    assert State.ACTIVE in states
    assert all(SENSOR_MIN_BPM <= v <= SENSOR_MAX_BPM for v in values)
    assert 60 <= statistics.median(values) <= 90


def test_fleet_day_shows_bradycardia_and_tachycardia_episodes() -> None:
    low = high = 0
    for i in range(20):
        model = HeartModel(f"pm-{i:04d}", seed=11)
        for s in range(0, 86_400, 10):
            bpm = model.step(10.0, T0 + timedelta(seconds=s)).heart_rate_bpm
            low += model.state is State.BRADYCARDIA and bpm < 55
            high += model.state is State.TACHYCARDIA and bpm > 120
    assert low > 0
    assert high > 0


def test_negative_time_step_is_refused() -> None:
    with pytest.raises(ValueError, match="dt must be"):
        HeartModel("pm-0001").step(-1.0, T0)

"""A plausible heart-rate model for a simulated pacemaker wearer (pure, seeded, no I/O).

The rate a pacemaker reports is the sum of a few slow and fast processes, each with a
physiological reason:

- **resting rate**: about 70 bpm in adults, barely dependent on age; a per-patient offset
  (sd 6 bpm) and a small age slope (older hearts a little slower at rest under beta-blockers
  and conduction disease, which is why they wear a pacemaker);
- **circadian rhythm**: about 4 bpm lower around 04:00 UTC than in the afternoon;
- **drift**: an Ornstein-Uhlenbeck process (mean-reverting random walk, time constant 10 min,
  sd 3 bpm): posture, temperature, digestion;
- **activity bouts**: a two-state Markov chain (rest <-> active). An active bout targets a
  share of the heart-rate reserve (Karvonen: ``rest + intensity * (max - rest)``, with
  Tanaka's ``max = 208 - 0.7 * age``); the rate follows the target with a 30 s time constant;
- **episodes**: occasional bradycardia (35-50 bpm, tens of seconds; pacemaker patients have
  conduction disease) and tachycardia (130-190 bpm, up to two minutes), as Poisson events
  whose rates differ per patient;
- **beat-to-beat noise**: sd 1.5 bpm.

Everything is drawn from one ``random.Random`` seeded from (fleet seed, device id), so a
run is reproducible: the same seed and the same sequence of ``step`` calls give the same
readings. The model never reads the clock; the caller passes the time.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from pacegate.reading import Reading

# Population of pacemaker wearers: mostly elderly (mean age at implant is about 75).
AGE_MEAN = 74.0
AGE_SD = 11.0
AGE_MIN = 18
AGE_MAX = 99

RESTING_MEAN_BPM = 70.0
RESTING_SD_BPM = 6.0
RESTING_AGE_SLOPE = -0.08  # bpm per year above 60
CIRCADIAN_AMPLITUDE_BPM = 4.0
CIRCADIAN_TROUGH_HOUR = 4.0  # UTC
DRIFT_TAU_S = 600.0
DRIFT_SD_BPM = 3.0
NOISE_SD_BPM = 1.5
RESPONSE_TAU_S = 30.0  # how fast the heart follows a change of demand

ACTIVITY_BOUTS_PER_HOUR = 2.0
ACTIVITY_MEAN_DURATION_S = 300.0
ACTIVITY_INTENSITY = (0.2, 0.6)  # share of heart-rate reserve

BRADY_PER_HOUR = (0.05, 0.5)  # per-patient rate drawn uniformly from this range
BRADY_DURATION_S = (10.0, 90.0)
BRADY_BPM = (35.0, 50.0)
TACHY_PER_HOUR = (0.02, 0.3)
TACHY_DURATION_S = (15.0, 120.0)
TACHY_BPM = (130.0, 190.0)

# The model clamps what it reports to what the sensor can measure, not to "normal": values
# out of the clinical range are the point of the episodes.
SENSOR_MIN_BPM = 25
SENSOR_MAX_BPM = 230


class State(Enum):
    REST = "rest"
    ACTIVE = "active"
    BRADYCARDIA = "bradycardia"
    TACHYCARDIA = "tachycardia"


def derive_seed(fleet_seed: int, device_id: str) -> int:
    """A 64-bit seed for one device: stable across runs, processes and Python versions."""
    digest = hashlib.sha256(f"{fleet_seed}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def sensor_id_for(device_id: str) -> int:
    """The pacemaker's sensor number: a stable u32 derived from its device id."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big")


@dataclass(frozen=True, slots=True)
class Patient:
    """What stays fixed for one wearer."""

    device_id: str
    sensor_id: int
    age: int
    resting_bpm: float
    max_bpm: float
    brady_per_hour: float
    tachy_per_hour: float

    @classmethod
    def draw(cls, device_id: str, rng: random.Random) -> Patient:
        age = round(min(AGE_MAX, max(AGE_MIN, rng.gauss(AGE_MEAN, AGE_SD))))
        resting = RESTING_MEAN_BPM + RESTING_AGE_SLOPE * (age - 60) + rng.gauss(0.0, RESTING_SD_BPM)
        return cls(
            device_id=device_id,
            sensor_id=sensor_id_for(device_id),
            age=age,
            resting_bpm=min(95.0, max(50.0, resting)),
            max_bpm=208.0 - 0.7 * age,
            brady_per_hour=rng.uniform(*BRADY_PER_HOUR),
            tachy_per_hour=rng.uniform(*TACHY_PER_HOUR),
        )


class HeartModel:
    """One wearer's heart rate over time. Call :meth:`step` with the time since the last call."""

    def __init__(self, device_id: str, *, seed: int = 0) -> None:
        self._rng = random.Random(derive_seed(seed, device_id))
        self.patient = Patient.draw(device_id, self._rng)
        self.state = State.REST
        self._state_left_s = 0.0
        self._target = self.patient.resting_bpm
        self._drift = 0.0
        self._rate = self.patient.resting_bpm

    def _circadian(self, when: datetime) -> float:
        hour = when.hour + when.minute / 60.0
        phase = 2.0 * math.pi * (hour - CIRCADIAN_TROUGH_HOUR) / 24.0
        return -CIRCADIAN_AMPLITUDE_BPM * math.cos(phase)

    def _maybe_change_state(self, dt: float) -> None:
        rng = self._rng
        if self.state is not State.REST:
            self._state_left_s -= dt
            if self._state_left_s <= 0.0:
                self.state = State.REST
                self._target = self.patient.resting_bpm
            return
        # Poisson events over dt: P(at least one) = 1 - exp(-lambda * dt)
        hours = dt / 3600.0
        p = self.patient
        if rng.random() < 1.0 - math.exp(-p.tachy_per_hour * hours):
            self.state = State.TACHYCARDIA
            self._state_left_s = rng.uniform(*TACHY_DURATION_S)
            self._target = rng.uniform(*TACHY_BPM)
        elif rng.random() < 1.0 - math.exp(-p.brady_per_hour * hours):
            self.state = State.BRADYCARDIA
            self._state_left_s = rng.uniform(*BRADY_DURATION_S)
            self._target = rng.uniform(*BRADY_BPM)
        elif rng.random() < 1.0 - math.exp(-ACTIVITY_BOUTS_PER_HOUR * hours):
            self.state = State.ACTIVE
            self._state_left_s = rng.expovariate(1.0 / ACTIVITY_MEAN_DURATION_S)
            intensity = rng.uniform(*ACTIVITY_INTENSITY)
            self._target = p.resting_bpm + intensity * (p.max_bpm - p.resting_bpm)

    def step(self, dt: float, when: datetime) -> Reading:
        """Advance the model by ``dt`` seconds and return the reading taken at ``when``."""
        if dt < 0:
            raise ValueError(f"dt must be >= 0, got {dt}")
        rng = self._rng
        self._maybe_change_state(dt)
        # Ornstein-Uhlenbeck, exact discretisation: stays stationary at any step size.
        decay = math.exp(-dt / DRIFT_TAU_S)
        self._drift = self._drift * decay + DRIFT_SD_BPM * math.sqrt(
            1.0 - decay * decay
        ) * rng.gauss(0.0, 1.0)
        # Arrhythmias switch fast; exercise and recovery follow demand with a lag.
        if self.state in (State.BRADYCARDIA, State.TACHYCARDIA):
            self._rate = self._target
        else:
            follow = 1.0 - math.exp(-dt / RESPONSE_TAU_S)
            self._rate += (self._target - self._rate) * follow
        bpm = self._rate + rng.gauss(0.0, NOISE_SD_BPM)
        if self.state in (State.REST, State.ACTIVE):
            bpm += self._drift + self._circadian(when)
        value = round(min(SENSOR_MAX_BPM, max(SENSOR_MIN_BPM, bpm)))
        return Reading(
            age=self.patient.age,
            heart_rate_bpm=value,
            sensor_id=self.patient.sensor_id,
            timestamp=when,
        )

"""The ``analysis:`` section of hospital.yaml (this module owns it)::

    analysis:
      bands: [0, 40, 60, 75]   # lower edges of the age bands, years; the last is open
      tolerance: 1.0e-3        # relative error allowed between encrypted and plaintext
      batch_size: 4096         # readings per CKKS batch (<= 4096 slots)
      window: 16               # ciphertexts in flight before waiting for the worker's ACK
      workers: 2               # processes decrypting store rows beside the CKKS work (0: none)

With ``workers`` > 0 and a large enough store, rows are read and Fernet-decrypted by a pool
of processes (:class:`~hospital.analysis.rows.ParallelRows`) while this process
CKKS-encrypts and ships the previous slices.
"""

from __future__ import annotations

from dataclasses import dataclass

from pacegate import analytics_wire as wire
from pacegate import ckks
from pacegate.configfile import ConfigSection

DEFAULT_BANDS = (0, 40, 60, 75)
DEFAULT_TOLERANCE = 1e-3
DEFAULT_WINDOW = 16
DEFAULT_WORKERS = 2
# Rows per slice handed to a decrypting process (~0.3 s of work), and the smallest store
# worth starting processes for (starting one costs about a second).
DEFAULT_CHUNK_ROWS = 16_384
DEFAULT_PARALLEL_MIN_ROWS = 50_000


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

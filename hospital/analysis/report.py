"""What an analysis found: the encrypted and plaintext statistics, checked against the
tolerance, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hospital.analysis.lanes import PlainSums
from hospital.analysis.settings import AnalysisSettings

# An error below a millionth of the statistic's unit (bpm, years, share) passes even when
# the plaintext value is ~0 (a slope or correlation of random data), where relative
# error is meaningless.
ABSOLUTE_FLOOR = 1e-6


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

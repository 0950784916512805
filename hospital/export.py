"""``pacegate hospital export -c FILE``: the decrypted readings, one per line, for clinicians
and auditors. This module owns the export's format.

Every line is one stored reading, in arrival order::

    seq, device_id, counter, age, heart_rate_bpm, sensor_id, timestamp, implausible, damage

as JSON Lines (one object per line; ``damage`` a list) or CSV (a header line; ``damage``
the kinds joined by ``;``). ``damage`` is empty for a row the chain vouches for.

The export refuses a store whose chain does not verify: its rows can no longer be trusted
as the readings that arrived. ``--allow-damaged`` exports it anyway and marks each damaged
row with what :meth:`~hospital.store.ReadingStore.verify` found (a row that does not
decrypt is a line with its ``seq``, its damage and empty fields). Damage of the store as a
whole (a removed tail, a rollback) is reported on stderr.

The output is the readings **in clear**: ``--out FILE`` is created with mode 0600 (written
beside, then renamed into place, so a refused or failed export leaves no partial file);
stdout is whatever the caller makes of it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from hospital.chain import CheckedRow, VerifyReport, format_report
from hospital.store import ReadingStore
from pacegate.errors import PacegateError
from pacegate.ingest import FLAG_IMPLAUSIBLE

FORMATS = ("jsonl", "csv")
COLUMNS = (
    "seq",
    "device_id",
    "counter",
    "age",
    "heart_rate_bpm",
    "sensor_id",
    "timestamp",
    "implausible",
    "damage",
)


class ExportRefused(PacegateError):
    """The store's chain does not verify and ``--allow-damaged`` was not given."""


def row_fields(row: CheckedRow) -> dict[str, Any]:
    """The export's fields of one checked row (None where the row does not decrypt)."""
    damage = [p.kind for p in row.problems]
    rec = row.record
    if rec is None:
        return dict.fromkeys(COLUMNS) | {"seq": row.seq, "damage": damage}
    r = rec.reading
    return {
        "seq": row.seq,
        "device_id": rec.device_id,
        "counter": rec.counter,
        "age": r.age,
        "heart_rate_bpm": r.heart_rate_bpm,
        "sensor_id": r.sensor_id,
        "timestamp": r.timestamp.isoformat(),
        "implausible": bool(rec.flags & FLAG_IMPLAUSIBLE),
        "damage": damage,
    }


def _in_period(row: CheckedRow, since: datetime | None, until: datetime | None) -> bool:
    if row.record is None:
        return True  # a row that does not decrypt has no time: always shown, marked
    ts = row.record.reading.timestamp
    return (since is None or ts >= since) and (until is None or ts < until)


class _Writer:
    def __init__(self, out: IO[str], fmt: str) -> None:
        self._out = out
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(COLUMNS)

    def write(self, fields: dict[str, Any]) -> None:
        if self._csv is None:
            self._out.write(json.dumps(fields, separators=(",", ":")) + "\n")
            return
        cells = dict(fields)
        cells["damage"] = ";".join(fields["damage"])
        if cells["implausible"] is not None:
            cells["implausible"] = int(cells["implausible"])
        self._csv.writerow(["" if cells[c] is None else cells[c] for c in COLUMNS])


@dataclass
class ExportSummary:
    exported: int = 0
    damaged: int = 0
    report: VerifyReport | None = None


def export_rows(
    store: ReadingStore,
    out: IO[str],
    *,
    fmt: str = "jsonl",
    since: datetime | None = None,
    until: datetime | None = None,
    allow_damaged: bool = False,
) -> ExportSummary:
    """Write the store's readings to ``out``; raises :class:`ExportRefused` (before writing
    anything) when the chain does not verify and ``allow_damaged`` is False."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not allow_damaged:
        # a first pass, so that nothing is written from a store that does not verify
        checked = store.verify()
        if not checked.ok:
            raise ExportRefused(_refusal(checked, store.name))
    summary = ExportSummary()
    writer = _Writer(out, fmt)
    scan = store.scan()
    for batch in scan:
        for row in batch:
            if row.problems and not allow_damaged:
                # altered between the two passes: stop here, say so
                raise ExportRefused(
                    f"row {row.seq} changed during the export "
                    f"({', '.join(p.kind for p in row.problems)}); the export is incomplete"
                )
            if _in_period(row, since, until):
                writer.write(row_fields(row))
                summary.exported += 1
                summary.damaged += bool(row.problems)
    summary.report = scan.report
    if not allow_damaged and not scan.report.ok:
        raise ExportRefused(_refusal(scan.report, store.name))
    return summary


def _refusal(report: VerifyReport, db_path: str) -> str:
    return (
        f"export refused: the chain of {db_path} does not verify.\n"
        + format_report(report, db_path)
        + "\nTo export what is there anyway, each damaged row marked, add --allow-damaged."
    )

"""The hash chain's rules, shared by every :class:`~hospital.store.ReadingStore` backend:
the head, what is wrong with a row, a head, or the database against its anchor and a head
recorded off the host, and the reports. Pure: the stores read the rows and call these.

Each row's chain value is ``HMAC(chain-key, prev chain || seq || row_key || SHA-256(pt))``
from :data:`GENESIS` on; the head (integrity-key version, last seq, last chain, and a MAC over
them) seals the end, and the anchor outside the database (:mod:`hospital.anchor`) the head.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hospital.anchor import AnchorRecord, HeadAnchor
from hospital.keyring import ChainKeys, Keyring
from hospital.rowcodec import StoredReading
from pacegate.errors import ConfigError

GENESIS = bytes(32)


# -- reports ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyProblem:
    seq: int | None
    # missing_rows | undecryptable | row_key_mismatch | chain_mismatch | head_mismatch |
    # unknown_integrity_key | anchor_missing | anchor_damaged | rolled_back | anchor_mismatch |
    # behind_recorded_head | recorded_head_mismatch (verify --expect-head)
    kind: str
    detail: str


@dataclass
class VerifyReport:
    rows: int = 0
    last_seq: int = 0
    head_chain: bytes = GENESIS
    head_version: int = 0  # the integrity-key version the chain is under
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def head_token(self) -> str:
        """``VERSION:SEQ:CHAIN`` (hex): what to record off the host, and give back to
        ``verify --expect-head`` later."""
        return f"{self.head_version}:{self.last_seq}:{self.head_chain.hex()}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "last_seq": self.last_seq,
            "head_chain": self.head_chain.hex(),
            "head": self.head_token,
            "problems": [{"seq": p.seq, "kind": p.kind, "detail": p.detail} for p in self.problems],
        }


# the kinds that compare the database with its anchor outside it
ANCHOR_PROBLEMS = frozenset({"anchor_missing", "anchor_damaged", "rolled_back", "anchor_mismatch"})


def describe_problem(p: VerifyProblem) -> str:
    where = f"row {p.seq}" if p.seq is not None else "head"
    return f"{where}: {p.kind}: {p.detail}"


@dataclass(frozen=True, slots=True)
class CheckedRow:
    """One row of a :class:`ChainScan`: the reading (None when the token does not decrypt
    or parse) and what is wrong with the row (empty when it is whole)."""

    seq: int
    record: StoredReading | None
    problems: tuple[VerifyProblem, ...] = ()


class RowScan(Protocol):
    """What :meth:`ReadingStore.scan` returns: batches of checked rows, then the report."""

    @property
    def report(self) -> VerifyReport: ...

    def __iter__(self) -> Iterator[list[CheckedRow]]: ...


def row_problems(
    keys: ChainKeys,
    prev_chain: bytes,
    seq: int,
    row_key: bytes,
    chain: bytes,
    plaintext: bytes,
    record: StoredReading,
) -> list[VerifyProblem]:
    """What is wrong with one decrypted row against its predecessor's chain value."""
    problems = []
    if keys.row_key(record.device_id, record.counter) != row_key:
        problems.append(VerifyProblem(seq, "row_key_mismatch", "token moved here from another row"))
    if keys.chain_link(prev_chain, seq, row_key, plaintext) != chain:
        problems.append(
            VerifyProblem(
                seq,
                "chain_mismatch",
                "this row or its predecessor was modified, reordered or deleted",
            )
        )
    return problems


def head_problems(
    head: Head | None, keys: ChainKeys | None, last_seq: int, last_chain: bytes
) -> list[VerifyProblem]:
    if head is None:
        return [VerifyProblem(None, "head_mismatch", "the chain head is missing or damaged")]
    if keys is None:
        return []  # already reported as unknown_integrity_key
    if not hmac.compare_digest(head.mac, keys.head_mac(head.seq, head.chain)):
        return [VerifyProblem(None, "head_mismatch", "the chain head was altered")]
    if (head.seq, head.chain) != (last_seq, last_chain):
        return [
            VerifyProblem(
                head.seq,
                "head_mismatch",
                f"the head names row {head.seq} but the last row is {last_seq}: "
                "rows were removed from the end, or the chain rewritten",
            )
        ]
    return []


def best_anchor(
    records: list[AnchorRecord], keyring: Keyring, db_version: int | None
) -> AnchorRecord | None:
    """The anchor: the valid record with the highest seq (on a tie, the one under the
    database's integrity key). Records that fail their MAC (a torn append, garbage, a
    record under a retired key) are ignored."""
    valid = [
        r
        for r in records
        if keyring.has_mac_version(r.version)
        and hmac.compare_digest(r.mac, keyring.integrity(r.version).anchor_mac(r.seq, r.chain))
    ]
    if not valid:
        return None
    return max(valid, key=lambda r: (r.seq, r.version == db_version))


def anchor_problems(
    anchor: HeadAnchor,
    records: list[AnchorRecord] | None,
    best: AnchorRecord | None,
    db_version: int | None,
    last_seq: int,
    chain_at_anchor: bytes | None,
) -> list[VerifyProblem]:
    """The database against its anchor. A database *ahead* of the anchor is fine (a crash
    between commit and anchor leaves at most that batch unanchored, and unacknowledged)."""
    fix = (
        "restore the database from a backup at least as recent as the anchor, or, if this "
        "state is known and wanted, accept it with 'pacegate hospital verify --reanchor'"
    )
    if records is None:
        return [
            VerifyProblem(
                None,
                "anchor_missing",
                f"the chain-head anchor {anchor.path} is missing: the database cannot be "
                f"checked for a rollback ({fix})",
            )
        ]
    if best is None:
        return [
            VerifyProblem(
                None, "anchor_damaged", f"{anchor.path} holds no valid head record ({fix})"
            )
        ]
    if best.seq > last_seq:
        span = f"row {best.seq}" if best.seq == last_seq + 1 else f"rows {last_seq + 1}-{best.seq}"
        return [
            VerifyProblem(
                best.seq,
                "rolled_back",
                f"the anchor {anchor.path} names row {best.seq} but the database ends at row "
                f"{last_seq}: the database or its WAL was truncated, or an older copy put "
                f"back; {span} lost ({fix})",
            )
        ]
    if best.version == db_version and chain_at_anchor != best.chain:
        return [
            VerifyProblem(
                best.seq,
                "anchor_mismatch",
                f"row {best.seq} is not the one anchored in {anchor.path}: the chain up to "
                f"it was rewritten ({fix})",
            )
        ]
    return []


@dataclass(frozen=True, slots=True)
class RecordedHead:
    """A head recorded off the host (``VERSION:SEQ:CHAIN`` from an earlier verify): the one
    anchor that a rollback of the database *and* its anchor file together cannot move."""

    version: int
    seq: int
    chain: bytes

    @classmethod
    def parse(cls, text: str) -> RecordedHead:
        parts = text.strip().split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            version, seq, chain = int(parts[0]), int(parts[1]), bytes.fromhex(parts[2])
            if version < 1 or seq < 0 or len(chain) != 32:
                raise ValueError
        except ValueError:
            raise ConfigError(
                None,
                "--expect-head",
                f"{text!r} is not VERSION:SEQ:CHAIN",
                fix="give the 'head' that an earlier 'pacegate hospital verify' printed",
            ) from None
        return cls(version, seq, chain)


def recorded_problems(
    expect: RecordedHead, version: int | None, last_seq: int, chain_at: bytes | None
) -> list[VerifyProblem]:
    if expect.seq > last_seq:
        return [
            VerifyProblem(
                expect.seq,
                "behind_recorded_head",
                f"the recorded head names row {expect.seq} but the database ends at row "
                f"{last_seq}: it was rolled back (with its anchor, if that verifies)",
            )
        ]
    # a head recorded before an integrity-key rotation can only be compared by row number
    if expect.version == version and chain_at != expect.chain:
        return [
            VerifyProblem(
                expect.seq,
                "recorded_head_mismatch",
                f"row {expect.seq} is not the one recorded: the chain up to it was rewritten",
            )
        ]
    return []


@dataclass(frozen=True, slots=True)
class Head:
    """The chain head in ``meta``: the integrity-key version the whole chain is under, the
    last row and its chain value, and the MAC over them."""

    version: int
    seq: int
    chain: bytes
    mac: bytes

    def encode(self) -> bytes:
        return self.version.to_bytes(4, "big") + self.seq.to_bytes(8, "big") + self.chain + self.mac

    @classmethod
    def decode(cls, raw: object) -> Head | None:
        """The head :meth:`encode` wrote (or schema 1's, without a version); None when
        missing or malformed."""
        if not isinstance(raw, bytes):
            return None
        if len(raw) == _LEGACY_HEAD_SIZE:
            raw = (1).to_bytes(4, "big") + raw
        if len(raw) != _HEAD_SIZE:
            return None
        return cls(
            int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:12], "big"), raw[12:44], raw[44:]
        )


_LEGACY_HEAD_SIZE = 8 + 32 + 32  # schema 1: no version (integrity key version 1)
_HEAD_SIZE = 4 + _LEGACY_HEAD_SIZE


def format_report(report: VerifyReport, db_path: Path | str) -> str:
    """What ``pacegate hospital verify`` prints about ``db_path`` (the store's name)."""
    if report.ok:
        return (
            f"verify: OK: {report.rows} rows in {db_path}, chain whole up to row "
            f"{report.last_seq} and not behind its anchor; head {report.head_token} (record "
            "it off this host: a rollback of the database *and* its anchor together shows "
            "only with 'verify --expect-head' against such a copy)"
        )
    lines = [f"verify: FAILED: {len(report.problems)} problem(s) in {db_path}:"]
    for p in report.problems:
        where = f"row {p.seq}" if p.seq is not None else "head"
        lines.append(f"  {where}: {p.kind}: {p.detail}")
    lines.append(
        "The store was altered outside pacegate: restore it from a backup and compare; "
        "do not trust readings near the reported rows."
    )
    return "\n".join(lines)

"""``pacegate hospital verify|rotate-key|export -c FILE``: the store's operator actions."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from hospital.chain import RecordedHead, format_report
from hospital.config import load_hospital_config
from hospital.export import ExportRefused, export_rows
from hospital.store import ReadingStore, open_store
from pacegate.layout import SECRET_FILE_MODE
from pacegate.reading import parse_time_option


def cli_rotate_key(args: argparse.Namespace) -> int:
    """``pacegate hospital rotate-key -c FILE``: new key, every row re-encrypted, online."""
    with open_store(load_hospital_config(args.config)) as store:
        report = store.rotate_key(
            retire_old=not getattr(args, "keep_old", False),
            integrity=getattr(args, "integrity", False),
        )
    retired = ", ".join(map(str, report.retired)) or "none"
    print(
        f"rotate-key: key version {report.new_version} now encrypts; "
        f"{report.reencrypted} rows re-encrypted; retired versions: {retired}",
        file=sys.stderr,
    )
    if report.new_mac_version is not None:
        retired_mac = ", ".join(map(str, report.retired_mac)) or "none"
        print(
            f"rotate-key: integrity key version {report.new_mac_version} now keys every row "
            f"and the chain; retired integrity versions: {retired_mac}",
            file=sys.stderr,
        )
    return 0


def cli_verify(args: argparse.Namespace) -> int:
    """``pacegate hospital verify -c FILE``: exit 0 if the chain is whole, 1 otherwise."""
    with open_store(load_hospital_config(args.config)) as store:
        if getattr(args, "reanchor", False):
            return _reanchor(store)
        recorded = getattr(args, "expect_head", None)
        report = store.verify(expect=RecordedHead.parse(recorded) if recorded else None)
    if getattr(args, "json", False):
        print(json.dumps(report.to_json()))
    else:
        print(format_report(report, store.name), file=sys.stderr)
    return 0 if report.ok else 1


def cli_export(args: argparse.Namespace) -> int:
    """``pacegate hospital export -c FILE [--since T] [--until T] [--format jsonl|csv]
    [--out FILE] [--allow-damaged]``: 0 when exported, 1 when refused."""
    since = parse_time_option(args.since, "--since")
    until = parse_time_option(args.until, "--until")
    out_path: Path | None = args.out
    with open_store(load_hospital_config(args.config)) as store:
        try:
            if out_path is None:
                summary = export_rows(
                    store,
                    sys.stdout,
                    fmt=args.format,
                    since=since,
                    until=until,
                    allow_damaged=args.allow_damaged,
                )
                sys.stdout.flush()
            else:
                with _private_output(out_path) as out:
                    summary = export_rows(
                        store,
                        out,
                        fmt=args.format,
                        since=since,
                        until=until,
                        allow_damaged=args.allow_damaged,
                    )
        except ExportRefused as exc:
            print(f"pacegate hospital export: {exc}", file=sys.stderr)
            return 1
    where = str(out_path) if out_path is not None else "stdout"
    print(
        f"export: {summary.exported} readings to {where} (clear text: keep it private)"
        + (f"; {summary.damaged} marked damaged" if summary.damaged else ""),
        file=sys.stderr,
    )
    report = summary.report
    if report is not None and not report.ok:
        store_level = [p for p in report.problems if p.seq is None or p.seq > report.last_seq]
        print(format_report(report, store.name), file=sys.stderr)
        if store_level:
            print(
                "export: damage of the store as a whole (not on any exported row): "
                + "; ".join(f"{p.kind}: {p.detail}" for p in store_level),
                file=sys.stderr,
            )
    return 0


def _reanchor(store: ReadingStore) -> int:
    report, before = store.reanchor()
    anchor = store.anchor.path if store.anchor is not None else "its anchor"
    was = max((r.seq for r in before or []), default=None)
    print(
        f"verify --reanchor: the chain inside {store.name} is whole up to row "
        f"{report.last_seq}; {anchor} now anchors that head"
        + (f" (it named row {was} before)" if was is not None else " (there was no anchor)"),
        file=sys.stderr,
    )
    return 0


@contextlib.contextmanager
def _private_output(path: Path) -> Iterator[IO[str]]:
    """A text file only the owner can read, in place only once complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    try:
        with open(fd, "w", encoding="utf-8", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

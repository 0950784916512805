"""``pacegate analyze --workdir DIR [--since T] [--until T] [--json]``: the hospital's CKKS
analysis of the work directory's store, validated against plaintext."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from console.workdir import WorkLayout
from hospital.analysis.job import run_analysis
from pacegate.reading import parse_time_option


def print_table(report: dict[str, Any]) -> None:
    """The human view: a rich table on stderr."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title=f"CKKS analysis of {report['count']} readings (blind in the cloud)")
    for col in ("statistic", "encrypted", "plaintext", "abs error", "rel error"):
        table.add_column(col, justify="left" if col == "statistic" else "right")
    for name, v in report["statistics"].items():
        table.add_row(
            name,
            f"{v['encrypted']:.9g}",
            f"{v['plaintext']:.9g}",
            f"{v['abs_error']:.2e}",
            f"{v['rel_error']:.2e}",
        )
    console.print(table)
    t = report["timings_s"]
    console.print(
        f"{report['batches']} batches, {report['bytes_sent'] / 1e6:.1f} MB sent, "
        f"{report['bytes_received'] / 1e6:.1f} MB received; "
        + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
    )
    if report.get("row_workers"):
        console.print(
            f"(rows decrypted by {report['row_workers']} processes beside the CKKS work: "
            "phases overlap; decrypt_rows is their summed time)"
        )
    scope = report.get("scope") or {}
    if scope.get("chain_verified"):
        period = ""
        if scope.get("since") or scope.get("until"):
            period = f", readings from {scope.get('since') or '-'} to {scope.get('until') or '-'}"
        console.print(
            f"covers the whole store: rows 1-{scope['store_rows']}{period}, every row checked "
            "against the hash chain and its anchor"
        )
    if report["excluded_implausible"]:
        console.print(f"{report['excluded_implausible']} implausible readings left out")
    for failure in report["failures"]:
        console.print(f"[red]OUT OF TOLERANCE[/red] {failure}")


def main(args: argparse.Namespace) -> int:
    """``pacegate analyze --workdir DIR [--since T] [--until T] [--json]``."""
    work = WorkLayout(Path(args.workdir).resolve())
    since = parse_time_option(args.since, "--since")
    until = parse_time_option(args.until, "--until")
    report = run_analysis(work.hospital_config, since=since, until=until)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    if not report["ok"]:
        print(
            "pacegate analyze: encrypted results differ from plaintext beyond the tolerance "
            f"({report['tolerance']:g} relative): " + "; ".join(report["failures"]),
            file=sys.stderr,
        )
        return 3
    return 0

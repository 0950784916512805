"""``pacegate demo``: the main job, one command, with a live view and a final report.

Steps: PKI and enrolment (kept between runs) -> start broker, cloud, hospital, gateway ->
run the simulated fleet -> wait until every accepted reading is stored -> CKKS analysis ->
stop everything -> report. ``--json`` prints the report as one JSON object on stdout; the
live view and the human report go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from console.stack import (
    DRAIN_TIMEOUT_S,
    PipelineCounts,
    Stack,
    StackError,
    pacegate_argv,
    prepare_workdir,
    running_stack,
)
from console.workdir import WorkLayout
from pacegate.layout import open_private_log

log = logging.getLogger("pacegate.demo")
LIVE_REFRESH_S = 0.5
# How long analysis may take; a demo-sized store analyses in seconds.
ANALYZE_TIMEOUT_S = 300.0


def _shown(path: str) -> str:
    """A path under the current directory as the operator would type it (``pacegate-demo``),
    not as an absolute path that names their home (and a README's author's)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def fixed4(value: float) -> str:
    """Four decimals, and no ``-0.0000``: CKKS noise makes an empty band's count -3e-9,
    which is zero at the precision shown (the abs error column keeps the noise visible)."""
    text = f"{value:,.4f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.,") else text


def _live_table(counts: PipelineCounts, fleet_elapsed: float, devices: int) -> Table:
    t = Table(title=f"pacegate demo: {devices} pacemakers, {fleet_elapsed:5.1f} s", expand=False)
    t.add_column("stage")
    t.add_column("count", justify="right")
    t.add_column("rate/s", justify="right")

    def rate(n: int) -> str:
        return f"{n / fleet_elapsed:8.1f}" if fleet_elapsed > 0 else ""

    t.add_row("received by gateway", str(counts.received), rate(counts.received))
    t.add_row("accepted (opened, fresh)", str(counts.accepted), rate(counts.accepted))
    t.add_row("forwarded over PQ channel", str(counts.forwarded), rate(counts.forwarded))
    t.add_row("stored at hospital", str(counts.stored), rate(counts.stored))
    if counts.spooled:
        t.add_row("in gateway spool", str(counts.spooled), "")
    for reason, n in sorted(counts.rejected.items()):
        t.add_row(f"rejected: {reason}", str(n), "")
    return t


def _run_fleet(stack: Stack, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    work = stack.work
    fleet_log = open_private_log(work.logs_dir / "devices.log")
    argv = pacegate_argv(
        "devices",
        "--workdir",
        str(work.root),
        "--count",
        str(args.devices),
        "--rate",
        str(args.rate),
        "--duration",
        str(args.duration),
        "--json",
        log_level="WARNING",
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=fleet_log, stdin=subprocess.DEVNULL, cwd=work.root
    )
    show_live = console.is_terminal and not args.json
    last_line = 0.0
    try:
        with Live(console=console, auto_refresh=False, transient=True) as live:
            while proc.poll() is None:
                stack.check_alive()
                counts = PipelineCounts.scrape(stack.endpoints)
                elapsed = time.monotonic() - started
                if show_live:
                    live.update(_live_table(counts, elapsed, args.devices), refresh=True)
                elif elapsed - last_line >= 5:
                    last_line = elapsed
                    console.print(
                        f"[{elapsed:5.1f} s] received {counts.received}, stored "
                        f"{counts.stored}, rejected {sum(counts.rejected.values())}"
                    )
                time.sleep(LIVE_REFRESH_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read() if proc.stdout else b""
        proc.wait()
        fleet_log.close()
    try:
        summary: dict[str, Any] = json.loads(out)
    except ValueError:
        raise StackError(
            f"the device fleet exited with code {proc.returncode} without a summary; "
            f"see {work.logs_dir / 'devices.log'}"
        ) from None
    return summary


def _drain(stack: Stack) -> PipelineCounts:
    """Wait until the hospital has stored everything the gateway accepted."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    counts = PipelineCounts.scrape(stack.endpoints)
    while time.monotonic() < deadline:
        stack.check_alive()
        counts = PipelineCounts.scrape(stack.endpoints)
        if counts.stored + counts.duplicates >= counts.accepted and counts.spooled == 0:
            return counts
        time.sleep(0.25)
    log.warning("the pipeline did not drain within %.0f s", DRAIN_TIMEOUT_S)
    return counts


def _analyze(work: WorkLayout) -> dict[str, Any]:
    argv = pacegate_argv("analyze", "--workdir", str(work.root), "--json", log_level="WARNING")
    with open_private_log(work.logs_dir / "analyze.log") as err:
        proc = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=work.root,
            timeout=ANALYZE_TIMEOUT_S,
            check=False,
        )
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise StackError(
            f"analysis exited with code {proc.returncode} without a result; "
            f"see {work.logs_dir / 'analyze.log'}"
        ) from None
    result.setdefault("ok", proc.returncode == 0)
    return result


def _analysis_covers(analysis: dict[str, Any], stored_this_run: int) -> str:
    """Whether the analysis is of this run alone or of a store that already held readings
    (``pacegate analyze`` reads the whole store, every row checked against the chain)."""
    scope = analysis.get("scope")
    if not isinstance(scope, dict) or not isinstance(scope.get("store_rows"), int):
        return ""
    rows = scope["store_rows"]
    checked = ", every row checked against the hash chain and its anchor"
    if rows == stored_this_run:
        return f"this run: the store holds only its {rows} readings{checked}"
    return (
        f"the whole store: {rows} readings, of which {stored_this_run} were stored by this "
        f"run (the work directory held earlier readings){checked}"
    )


def _print_report(console: Console, report: dict[str, Any]) -> None:
    t = Table(title="pacegate demo: final report")
    t.add_column("what")
    t.add_column("value", justify="right")
    for key in (
        "devices",
        "sent",
        "acknowledged",
        "received",
        "accepted",
        "stored",
        "duplicates_absorbed",
        "lost",
    ):
        t.add_row(key.replace("_", " "), str(report.get(key)))
    for reason, n in sorted(report["rejected"].items()):
        t.add_row(f"rejected: {reason}", str(n))
    t.add_row("whole demo (set-up to report)", f"{report['duration_s']:.1f} s")
    console.print(t)
    analysis = report.get("analysis") or {}
    stats = analysis.get("statistics") if isinstance(analysis, dict) else None
    if isinstance(stats, dict):
        a = Table(title="CKKS analysis (computed blind in the cloud) vs plaintext")
        for col in ("statistic", "encrypted", "plaintext", "abs error"):
            a.add_column(col, justify="right" if col != "statistic" else "left")
        for name, v in stats.items():
            if isinstance(v, dict) and "encrypted" in v:
                a.add_row(
                    name,
                    fixed4(v["encrypted"]),
                    fixed4(v["plaintext"]),
                    f"{v.get('abs_error', 0):.2e}",
                )
        console.print(a)
    elif "heart_rate_mean" in analysis:
        console.print(f"analysis: {json.dumps(analysis)[:2000]}")
    if report.get("analysis_covers"):
        console.print(f"the analysis covers {report['analysis_covers']}")
    verdict = "[green]OK[/green]" if report["ok"] else "[red]FAILED[/red]"
    console.print(f"{verdict}: {report['verdict']}  (work directory: {_shown(report['workdir'])})")


def run_demo(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    work = WorkLayout(args.workdir.resolve())
    if args.log_level != "DEBUG":
        # the spinner and the live view say what the stack's INFO lines would say
        logging.getLogger("pacegate.stack").setLevel(logging.WARNING)
    t0 = time.monotonic()
    with console.status("setting up the PKI and enrolling pacemakers"):
        prepare_workdir(work, args.devices)
    with console.status("starting broker, cloud worker, hospital and gateway"):
        stack_cm = running_stack(
            work, overwrite_configs=True, log_level=args.log_level, log_json=args.log_json
        )
        stack = stack_cm.__enter__()
    try:
        console.print(
            f"stack up in {time.monotonic() - t0:.1f} s; MQTTS on "
            f"{stack.endpoints.mqtt[0]}:{stack.endpoints.mqtt[1]}; "
            f"running {args.devices} pacemakers for {args.duration:g} s"
        )
        fleet = _run_fleet(stack, args, console)
        with console.status("waiting for the hospital to store every accepted reading"):
            counts = _drain(stack)
        with console.status("CKKS analysis: hospital -> cloud -> hospital"):
            analysis = _analyze(work)
    finally:
        stack_cm.__exit__(None, None, None)

    lost = int(fleet.get("acknowledged", 0)) - counts.stored - counts.duplicates
    problems = []
    if counts.stored + counts.duplicates < counts.accepted:
        problems.append(
            f"{counts.accepted - counts.stored - counts.duplicates} accepted "
            "readings were not stored"
        )
    if not analysis.get("ok", False):
        problems.append("the analysis failed validation")
    if counts.stored == 0:
        problems.append("nothing was stored")
    report: dict[str, Any] = {
        "devices": args.devices,
        "sent": fleet.get("sent", 0),
        "acknowledged": fleet.get("acknowledged", 0),
        "received": counts.received,
        "accepted": counts.accepted,
        "stored": counts.stored,
        "duplicates_absorbed": counts.duplicates,
        "lost": max(lost, 0),
        "rejected": counts.rejected,
        "fleet": fleet,
        "analysis": analysis,
        "analysis_covers": _analysis_covers(analysis, counts.stored),
        "duration_s": round(time.monotonic() - t0, 2),
        "workdir": str(work.root),
        "ok": not problems,
        "verdict": "; ".join(problems)
        if problems
        else "every reading the broker acknowledged was stored once, and the blind analysis "
        "matches the plaintext",
    }
    _print_report(console, report)
    if args.json:
        print(json.dumps(report, default=str))
    return 0 if report["ok"] else 1

"""``pacegate devices --workdir W --count N --rate HZ --duration S``: a fleet against a
running stack, with a live table on stderr and a summary (``--json``: one object on stdout)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from console.endpoints import Endpoints, parse_host_port, read_endpoints
from console.workdir import WorkLayout
from device_sim.counter import DEFAULT_BLOCK
from device_sim.device import Endpoint
from device_sim.fleet import DEFAULT_DRAIN_S, FleetProgress, run_fleet


def read_endpoint(work: WorkLayout) -> Endpoint:
    """The broker endpoint from ``endpoints.json`` (written by ``pacegate up``), or the default."""
    host, port = (read_endpoints(work) or Endpoints()).mqtt
    return Endpoint(host, port)


def broker_endpoints(work: WorkLayout, given: list[str] | None) -> list[Endpoint]:
    """``--broker HOST:PORT`` (repeatable: edge nodes, tried from each device's home node
    on), or else the work directory's broker."""
    if given:
        return [Endpoint(*parse_host_port(text, "--broker")) for text in given]
    return [read_endpoint(work)]


# -- CLI ------------------------------------------------------------------------------------
def _render(p: FleetProgress) -> Any:
    from rich.table import Table

    table = Table(title=f"pacegate devices  {p.elapsed_s:6.1f} s", show_header=True)
    for col in ("devices", "connected", "sent", "acked", "unacked", "dropped", "acks/s"):
        table.add_column(col, justify="right")
    table.add_row(
        str(p.devices),
        str(p.connected_now),
        str(p.sent),
        str(p.acknowledged),
        str(p.failed),
        str(p.dropped),
        f"{p.ack_rate:,.0f}",
    )
    return table


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    work = WorkLayout(Path(args.workdir))
    endpoints = broker_endpoints(work, getattr(args, "broker", None))
    console = Console(stderr=True)
    with Live(console=console, refresh_per_second=4, transient=False) as live:

        def show(p: FleetProgress) -> None:
            live.update(_render(p))

        summary = asyncio.run(
            run_fleet(
                work.pki,
                endpoints=endpoints,
                count=args.count,
                rate=args.rate,
                duration=args.duration,
                seed=getattr(args, "seed", 0),
                counter_block=getattr(args, "counter_block", DEFAULT_BLOCK),
                drain_s=getattr(args, "drain", DEFAULT_DRAIN_S),
                acked_log=getattr(args, "acked_log", None),
                skip=getattr(args, "skip", 0),
                progress=show,
            )
        )
    if not console.is_terminal:
        console.line()  # a non-terminal Live leaves its last frame without a newline
    data = summary.to_json()
    if args.json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        console.print(
            f"{summary.devices} devices, {summary.connected} connected: "
            f"{summary.sent} sent, {summary.acknowledged} acknowledged, "
            f"{summary.failed} failed, {summary.dropped} dropped in {summary.duration_s:.1f} s"
        )
    if summary.acknowledged == 0:
        console.print(
            "pacegate devices: no reading was acknowledged; is the broker running "
            f"(pacegate up --workdir {work.root}) and reachable at "
            f"{', '.join(f'{e.host}:{e.port}' for e in endpoints)}?"
        )
        return 1
    return 0

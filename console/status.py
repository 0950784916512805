"""``pacegate status --workdir W [--json] [--wait S]``: what of a work directory's stack runs.

Three sources, each the owner of its fact:

- the listening sockets (the kernel): a service is *up* when a process listens on the port
  ``endpoints.json`` gives it, whoever started it (``up``, or an operator one at a time);
- ``stack.json`` and the work-directory lock (:mod:`console.runstate`): which ``up`` holds
  the directory, when each service started and how often it was restarted;
- the gateway's and the hospital's Prometheus endpoints: the pipeline's counters.

Exit 0 when every service is up, 1 otherwise, so scripts can wait on it (``--wait``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import psutil

from console.endpoints import Endpoints, read_endpoints
from console.runstate import describe_process, listener_pid, lock_holder, read_state, uptime_s
from console.stack import SERVICE_ORDER, rejected_by_reason, scrape
from console.workdir import WorkLayout

WAIT_POLL_S = 0.5
SUPERVISION_NAME = "supervision.json"  # written by a supervising "pacegate up"


def _ports(ep: Endpoints) -> dict[str, tuple[str, int]]:
    return {
        "broker": ep.mqtt,
        "cloud": ep.cloud,
        "hospital": ep.hospital,
        "gateway": ep.gateway_metrics,
    }


def _pid_listening(pid: int, port: int) -> bool:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


def collect_status(work: WorkLayout) -> dict[str, Any]:
    """The status of ``work``'s stack as one JSON-ready mapping."""
    ep = read_endpoints(work) or Endpoints()
    holder = lock_holder(work)
    state = read_state(work) if holder is not None else None
    known: dict[str, Any] = (state or {}).get("services", {})
    supervision = _supervision(work) if holder is not None else {}
    services: dict[str, Any] = {}
    for name in SERVICE_ORDER:
        host, port = _ports(ep)[name]
        entry = known.get(name) if isinstance(known.get(name), dict) else None
        pid = listener_pid(port, host)
        if pid is None and entry is not None and _pid_listening(int(entry["pid"]), port):
            pid = int(entry["pid"])  # the kernel would not name another user's listener
        services[name] = {
            "up": pid is not None,
            "pid": pid,
            "host": host,
            "port": port,
            "uptime_s": round(u, 1) if pid is not None and (u := uptime_s(pid)) else None,
            "restarts": int(entry.get("restarts", 0)) if entry else None,
            "process": describe_process(pid) if pid is not None else None,
        }
        supervised = supervision.get(name)
        if isinstance(supervised, dict):
            # the supervisor's own account, where 'up' keeps one: it also knows a service
            # waiting out its restart delay, and how the last one ended
            if isinstance(supervised.get("restarts"), int):
                services[name]["restarts"] = supervised["restarts"]
            services[name]["restarting"] = bool(supervised.get("restarting"))
            services[name]["last_exit_code"] = supervised.get("last_exit_code")
    g = scrape(*ep.gateway_metrics) if services["gateway"]["up"] else {}
    h = scrape(*ep.hospital_metrics) if services["hospital"]["up"] else {}
    counters: dict[str, Any] = {}
    if g:
        counters["gateway"] = {
            "received": int(g.get("pacegate_gateway_received_total", 0)),
            "accepted": int(g.get("pacegate_gateway_accepted_total", 0)),
            "forwarded": int(g.get("pacegate_gateway_forwarded_total", 0)),
            "spooled": int(g.get("pacegate_gateway_spooled", 0)),
            "rejected": rejected_by_reason(g, "pacegate_gateway_rejected_total"),
            "mqtt_connected": bool(g.get("pacegate_gateway_mqtt_connected", 0)),
            "hospital_connected": bool(g.get("pacegate_gateway_hospital_connected", 0)),
        }
    if h:
        counters["hospital"] = {
            "stored": int(h.get("pacegate_hospital_stored_total", 0)),
            "duplicates": int(h.get("pacegate_hospital_duplicates_total", 0)),
            "rejected": rejected_by_reason(h, "pacegate_hospital_rejected_total"),
        }
    return {
        "workdir": str(work.root),
        "stack_pid": holder,
        "stack": describe_process(holder) if holder is not None else None,
        "all_up": all(s["up"] for s in services.values()),
        "services": services,
        "counters": counters,
    }


def _supervision(work: WorkLayout) -> dict[str, Any]:
    """``WORKDIR/supervision.json`` of a supervising ``up`` (its format is the stack's),
    empty when absent or unreadable."""
    try:
        data = json.loads((work.root / SUPERVISION_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _print_human(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    holder = status["stack"] or "no 'pacegate up' or 'demo' holds this work directory"
    t = Table(title=f"pacegate status: {status['workdir']}", caption=holder)
    for col in ("service", "state", "pid", "port", "uptime", "restarts"):
        t.add_column(col, justify="left" if col in ("service", "state") else "right")
    for name, s in status["services"].items():
        t.add_row(
            name,
            "[green]up[/green]"
            if s["up"]
            else ("[yellow]restarting[/yellow]" if s.get("restarting") else "[red]down[/red]"),
            str(s["pid"] or ""),
            f"{s['host']}:{s['port']}",
            _duration(s["uptime_s"]),
            "" if s["restarts"] is None else str(s["restarts"]),
        )
    console.print(t)
    g = status["counters"].get("gateway")
    if g:
        rejected = sum(g["rejected"].values())
        console.print(
            f"gateway: {g['received']} received, {g['accepted']} accepted, {g['forwarded']} "
            f"forwarded, {g['spooled']} spooled, {rejected} rejected; MQTT "
            f"{'connected' if g['mqtt_connected'] else 'DISCONNECTED'}, hospital channel "
            f"{'up' if g['hospital_connected'] else 'DOWN'}"
        )
    h = status["counters"].get("hospital")
    if h:
        console.print(
            f"hospital: {h['stored']} stored, {h['duplicates']} duplicates absorbed, "
            f"{sum(h['rejected'].values())} rejected"
        )


def cli_status(args: argparse.Namespace) -> int:
    work = WorkLayout(args.workdir.resolve())
    deadline = time.monotonic() + (args.wait or 0.0)
    status = collect_status(work)
    while not status["all_up"] and time.monotonic() < deadline:
        time.sleep(WAIT_POLL_S)
        status = collect_status(work)
    if args.json:
        sys.stdout.write(json.dumps(status) + "\n")
    else:
        _print_human(status)
    return 0 if status["all_up"] else 1

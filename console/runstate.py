"""What a running stack leaves in its work directory, and who holds a port.

``WORKDIR/.pacegate.lock``: held (``flock``) by the one ``pacegate up`` or ``demo`` running
on that directory, with its PID inside. A second ``up`` on the same directory is refused
before it starts anything (it used to start a second broker that crashed on the busy port
and wrote its traceback into the running stack's ``broker.log``).

``WORKDIR/stack.json``: the services the holder started, written each time one starts or
restarts, read by ``pacegate status``. This module owns both formats::

    {"pid": 1234, "started_at": 1764700000.0,
     "services": {"broker": {"pid": 1240, "host": "127.0.0.1", "port": 8883,
                             "started_at": 1764700001.2, "restarts": 0}, ...}}
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from console.workdir import WorkLayout
from pacegate.errors import PacegateError
from pacegate.layout import SECRET_FILE_MODE

LOCK_NAME = ".pacegate.lock"
STATE_NAME = "stack.json"


class WorkdirBusy(PacegateError):
    """Another ``pacegate up``/``demo`` holds this work directory."""


def lock_path(work: WorkLayout) -> Path:
    return work.root / LOCK_NAME


def state_path(work: WorkLayout) -> Path:
    return work.root / STATE_NAME


def _lock_holder(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def describe_process(pid: int) -> str:
    """``pacegate up --workdir W (pid 42)``, or ``pid 42 (nginx)`` for anything else."""
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"pid {pid}"
    # "python -P -m console broker -c W/broker.yaml" or ".venv/bin/pacegate up --workdir W"
    for i, arg in enumerate(cmdline[:4]):
        if Path(arg).name == "pacegate" or (arg == "console" and cmdline[i - 1 : i] == ["-m"]):
            args = cmdline[i + 1 :]
            if args[:1] == ["--log-level"]:
                args = args[2:]  # the options 'up' passes on say nothing of the service
            args = [a for a in args if a != "--log-json"]
            return f"pacegate {' '.join(args)} (pid {pid})"
    return f"pid {pid} ({name})"


@contextlib.contextmanager
def workdir_lock(work: WorkLayout) -> Iterator[Path]:
    """Hold ``WORKDIR/.pacegate.lock`` for the life of an ``up`` or a ``demo``.

    ``flock`` rather than a PID check alone: the kernel drops the lock when its holder dies,
    however it dies, so a stale file never blocks the next start."""
    work.root.mkdir(parents=True, exist_ok=True)
    path = lock_path(work)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, SECRET_FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(path)
            who = describe_process(holder) if holder else "another process"
            raise WorkdirBusy(
                f"work directory {work.root} is in use by {who} (lock {path}); "
                f"stop it first (kill {holder or 'its PID'}), or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                state_path(work).unlink()
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def hold_workdir(work: WorkLayout) -> None:
    """Take the work directory's lock for the rest of this process (``up``, ``demo``):
    released, and ``stack.json`` removed, when the process exits; the kernel releases it
    even if the process is killed."""
    held = workdir_lock(work)
    held.__enter__()
    atexit.register(held.__exit__, None, None, None)


def lock_holder(work: WorkLayout) -> int | None:
    """The PID holding the work directory, ``None`` if no ``up``/``demo`` runs on it."""
    path = lock_path(work)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass
class ServiceState:
    pid: int
    host: str
    port: int
    started_at: float
    restarts: int = 0


def write_state(work: WorkLayout, started_at: float, services: Mapping[str, ServiceState]) -> None:
    data = {
        "pid": os.getpid(),
        "started_at": started_at,
        "services": {name: vars(s) for name, s in services.items()},
    }
    tmp = state_path(work).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.chmod(SECRET_FILE_MODE)
    os.replace(tmp, state_path(work))


def read_state(work: WorkLayout) -> dict[str, Any] | None:
    """The last ``stack.json``; ``None`` if absent or unreadable (a status is best effort:
    a damaged file only loses the restart counts, the ports come from endpoints.json)."""
    try:
        data = json.loads(state_path(work).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def listener_pid(port: int, host: str | None = None) -> int | None:
    """The PID listening on TCP ``port`` (``None`` if nobody, or if the kernel will not say)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for c in conns:
        if c.status != psutil.CONN_LISTEN or c.laddr.port != port:
            continue
        if host is not None and c.laddr.ip not in (host, "0.0.0.0", "::"):
            continue
        pid: int | None = c.pid
        return pid
    return None


def who_holds_port(port: int) -> str:
    """For an 'address in use' message: ``pacegate broker -c W/broker.yaml (pid 42)``."""
    pid = listener_pid(port)
    if pid is None:
        return "another process"
    return describe_process(pid)


def uptime_s(pid: int) -> float | None:
    try:
        created: float = psutil.Process(pid).create_time()
        return max(0.0, time.time() - created)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class PortInUse(PacegateError):
    """A service's port is taken; the message names the port and, when it can, the holder."""


def port_in_use(host: str, port: int) -> bool:
    """True if something listens on ``host:port``. SO_REUSEADDR as the services set it, so
    a connection of the previous run in TIME_WAIT does not count as a holder."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def ensure_port_free(service: str, host: str, port: int, *, where: str) -> None:
    """Refuse to start ``service`` on a busy port before it starts anything (the listener's
    own failure comes late, wrapped in a library's traceback). ``where`` names the config
    key that sets the port, for the fix."""
    if port and port_in_use(host, port):
        raise PortInUse(
            f"{service}: port {port} on {host} is already in use by {who_holds_port(port)} "
            f"(fix: stop that process, or choose another port with {where})"
        )

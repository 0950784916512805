"""A local Dask cluster for the cloud front worker's Dask backend, over TLS only.

``start_cluster(dir, workers=K)`` issues the cluster's identities
(:func:`pacegate.pki.issue_cluster_identities`: the cluster's own CA, one certificate per
scheduler, worker and the front worker's client), then starts a scheduler and K workers as
separate processes, each in its own process group, logging to ``dir/logs/``. Every
listener binds to loopback, speaks ``tls://`` only (TLS 1.3, client certificates
required) and runs no dashboard (Dask's dashboard is plain HTTP). ``DaskCluster.stop()``
stops exactly the processes it started, by pid. Dask's own per-user configuration files
are not read (``DASK_CONFIG`` points into ``dir``), so nothing outside it loosens TLS.

Run from a shell::

    python -m console.dask_cluster --dir W/dask --workers 2

prints the scheduler address and the front worker's certificate paths (what
``cloud.yaml``'s ``aggregator`` section names) as JSON, and runs until SIGINT or SIGTERM.

Files in ``dir``::

    pki/ca.crt pki/ca.key                  the cluster CA (not the device CA)
    pki/<name>.crt pki/<name>.key          dask-scheduler, dask-worker-<i>, cloud-front
    scheduler.json                         written by the scheduler: its tls:// address
    logs/<name>.log                        one per process (0600)
    work/<name>/                           a worker's local directory (spill files)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pacegate.layout import DEFAULT_HOST, SECRET_DIR_MODE, create_private
from pacegate.pki import issue_cluster_identities

SCHEDULER = "dask-scheduler"
CLIENT = "cloud-front"  # the front worker's identity on the cluster
# Bounds: a laptop-sized cluster; the machine this runs on has 2 cores.
MAX_WORKERS = 16
# The scheduler, then each worker, must be up within this (a cold import of distributed
# and TenSEAL on a loaded 2-core machine takes several seconds).
DEFAULT_START_TIMEOUT_S = 120.0
# SIGTERM, then this long for a clean exit, then SIGKILL.
STOP_GRACE_S = 10.0
# A worker's threads: one, so K workers are K CPU-bound task slots.
WORKER_THREADS = 1


def worker_name(i: int) -> str:
    return f"dask-worker-{i}"


def _env(directory: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    # Dask's config may loosen TLS from files in ~/.config/dask: read none of them.
    env["DASK_CONFIG"] = str(directory / "config")
    env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] = "True"
    env["DASK_DISTRIBUTED__COMM__TLS__MIN_VERSION"] = "1.3"
    # Every scheduler and worker also starts an HTTP server (even with --no-dashboard:
    # distributed/node.py start_http_server) whose routes show workers, logs and metrics
    # to anyone on the host. Serve no route, and over TLS with the node's certificate.
    env["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"] = "[]"
    env["DASK_DISTRIBUTED__WORKER__HTTP__ROUTES"] = "[]"
    pki = directory / "pki"
    env["DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__CERT"] = str(pki / f"{name}.crt")
    env["DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__KEY"] = str(pki / f"{name}.key")
    env["DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__CA_FILE"] = str(pki / "ca.crt")
    return env


@dataclass
class DaskCluster:
    """A running local cluster; :meth:`stop` ends what :func:`start_cluster` started."""

    directory: Path
    address: str
    ca_file: Path
    client_cert: Path
    client_key: Path
    scheduler: subprocess.Popen[bytes]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    host: str = DEFAULT_HOST

    def worker_pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.workers.items() if proc.poll() is None}

    def kill_worker(self, name: str) -> int:
        """SIGKILL one worker (a chaos test's crash); returns its pid."""
        proc = self.workers[name]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_GRACE_S)
        return proc.pid

    def add_worker(self, name: str, *, timeout: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Start one more worker (or restart a killed one under its name)."""
        old = self.workers.get(name)
        if old is not None and old.poll() is None:
            raise ValueError(f"{name} is still running (pid {old.pid})")
        pki = self.directory / "pki"
        if not (pki / f"{name}.crt").exists():
            issue_cluster_identities(pki, [name], hosts=[self.host])
        proc = _start_worker(self.directory, name, self.address, self.host)
        self.workers[name] = proc
        _wait_for_log_line(proc, self.directory / "logs" / f"{name}.log", "Registered to", timeout)

    def stop(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            _stop(proc)

    def as_json(self) -> dict[str, object]:
        return {
            "scheduler": self.address,
            "ca_file": str(self.ca_file),
            "cert": str(self.client_cert),
            "key": str(self.client_key),
            "workers": self.worker_pids(),
            "scheduler_pid": self.scheduler.pid,
        }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_GRACE_S)


def _spawn(directory: Path, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    log_path = directory / "logs" / f"{name}.log"
    log_path.parent.mkdir(mode=SECRET_DIR_MODE, exist_ok=True)
    create_private(log_path)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(directory, name),
            cwd=directory,
            start_new_session=True,  # its own process group: a terminal's ^C is ours to pass
        )


def _tls_args(directory: Path, name: str) -> list[str]:
    pki = directory / "pki"
    return [
        "--tls-ca-file",
        str(pki / "ca.crt"),
        "--tls-cert",
        str(pki / f"{name}.crt"),
        "--tls-key",
        str(pki / f"{name}.key"),
    ]


def _start_worker(directory: Path, name: str, address: str, host: str) -> subprocess.Popen[bytes]:
    (directory / "work").mkdir(mode=SECRET_DIR_MODE, exist_ok=True)
    local = directory / "work" / name
    local.mkdir(mode=SECRET_DIR_MODE, exist_ok=True)
    return _spawn(
        directory,
        name,
        [
            "-m",
            "distributed.cli.dask_worker",
            address,
            "--name",
            name,
            "--host",
            host,
            "--protocol",
            "tls",
            *_tls_args(directory, name),
            "--nthreads",
            str(WORKER_THREADS),
            "--nworkers",
            "1",
            "--no-nanny",  # the worker is this pid: a SIGKILL kills the worker itself
            "--no-dashboard",
            "--dashboard-address",
            f"{host}:0",
            "--local-directory",
            str(local),
            "--death-timeout",
            "60",
        ],
    )


def _wait_for_log_line(
    proc: subprocess.Popen[bytes], path: Path, text: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    tail = path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"
    what = f"exited with {proc.returncode}" if proc.poll() is not None else "timed out"
    _stop(proc)
    raise RuntimeError(
        f"{path}: no {text!r} ({what} after {timeout:.0f} s at most); the log ends:\n{tail}"
    )


def start_cluster(
    directory: Path,
    *,
    workers: int = 2,
    host: str = DEFAULT_HOST,
    timeout: float = DEFAULT_START_TIMEOUT_S,
) -> DaskCluster:
    """Issue identities (if missing) and start a scheduler and ``workers`` workers."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be in [1, {MAX_WORKERS}], got {workers}")
    directory = Path(directory).resolve()
    directory.mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
    pki = directory / "pki"
    names = [SCHEDULER, CLIENT, *(worker_name(i) for i in range(1, workers + 1))]
    missing = [n for n in names if not (pki / f"{n}.crt").exists()]
    if missing:
        issue_cluster_identities(pki, missing, hosts=[host])
    scheduler_file = directory / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    scheduler = _spawn(
        directory,
        SCHEDULER,
        [
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            host,
            "--port",
            "0",
            "--protocol",
            "tls",
            *_tls_args(directory, SCHEDULER),
            "--no-dashboard",
            "--dashboard-address",
            f"{host}:0",
            "--scheduler-file",
            str(scheduler_file),
        ],
    )
    cluster = DaskCluster(
        directory=directory,
        address="",
        ca_file=pki / "ca.crt",
        client_cert=pki / f"{CLIENT}.crt",
        client_key=pki / f"{CLIENT}.key",
        scheduler=scheduler,
        host=host,
    )
    try:
        deadline = time.monotonic() + timeout
        while not scheduler_file.exists():
            if scheduler.poll() is not None or time.monotonic() > deadline:
                log = (directory / "logs" / f"{SCHEDULER}.log").read_text(errors="replace")
                raise RuntimeError(f"the Dask scheduler did not start; its log:\n{log[-2000:]}")
            time.sleep(0.1)
        # the scheduler writes the file non-atomically: wait for whole JSON
        while True:
            with contextlib.suppress(json.JSONDecodeError):
                cluster.address = json.loads(scheduler_file.read_text())["address"]
                break
            time.sleep(0.05)
        if not cluster.address.startswith("tls://"):
            raise RuntimeError(f"the scheduler listens on {cluster.address}, not tls://")
        for i in range(1, workers + 1):
            cluster.add_worker(worker_name(i), timeout=timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def running_cluster(directory: Path, *, workers: int = 2) -> Iterator[DaskCluster]:
    cluster = start_cluster(directory, workers=workers)
    try:
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m console.dask_cluster",
        description="Run a local Dask cluster over TLS for the cloud front worker.",
    )
    parser.add_argument("--dir", type=Path, required=True, help="cluster directory")
    parser.add_argument("--workers", type=int, default=2, help="number of workers (1-16)")
    args = parser.parse_args(argv)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with running_cluster(args.dir, workers=args.workers) as cluster:
        print(json.dumps(cluster.as_json(), indent=2), flush=True)
        while not stop and cluster.scheduler.poll() is None:
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

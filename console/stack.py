"""``pacegate up`` and ``pacegate demo``: the whole pipeline on one machine.

Every service runs as its own process (``python -m console <service> -c <config>``), as an
operator would run it, with its log in ``WORKDIR/logs/``. This module only orchestrates:
it writes default configs, starts the services in dependency order (broker, cloud,
hospital, gateway), waits for each to listen, and stops exactly the processes it started,
by their PID, on SIGINT/SIGTERM or at the end of the demo.

``pacegate up`` supervises: a service that dies is logged and restarted with backoff
(:class:`RestartPolicy`) while the others keep running; nothing is lost meanwhile, because
a device's reading is acknowledged only once it is durable downstream (docs/architecture.md).
A service that keeps dying (:data:`CRASH_LOOP_FAILURES` within :data:`CRASH_LOOP_WINDOW_S`)
is a crash loop: ``up`` says so, with the end of that service's log, stops the stack and
exits 1 rather than hide it behind restarts. Restarts and exits are counted in
``WORKDIR/supervision.json``. SIGTERM stops the device side first (:data:`STOP_ORDER`).

The demo then runs the simulated fleet (``pacegate devices --json``), watches the gateway's
and the hospital's Prometheus metrics for the live view, waits until everything the gateway
accepted is stored, runs ``pacegate analyze --json`` and prints the final report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO, TypeVar

import psutil
from prometheus_client.parser import text_string_to_metric_families

from console.endpoints import Endpoints, read_endpoints
from console.runstate import ServiceState, ensure_port_free, hold_workdir, write_state
from console.workdir import WorkLayout
from pacegate.errors import ConfigError, PacegateError
from pacegate.layout import create_private
from pacegate.ports import DEFAULT_ENDPOINTS, DEFAULT_HOST

log = logging.getLogger("pacegate.stack")

# How long a service may take to start listening. The cloud worker imports TenSEAL and
# the gateway connects to the broker first; both take a second or two on a loaded machine.
SERVICE_START_TIMEOUT_S = 60.0
# After the devices stop, how long to wait for the gateway and hospital to drain (batches in
# flight, spool). Bounded so that a broken stack ends the demo with a clear report.
DRAIN_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
SERVICE_ORDER = ("broker", "cloud", "hospital", "gateway")
# Stop the device side first: the broker stops taking publishes (devices keep what was not
# acknowledged), the gateway then hands on what it holds, the hospital, which commits what
# the gateway sends, goes last but the cloud (which holds no state).
STOP_ORDER = ("broker", "gateway", "hospital", "cloud")

# Restart delay after a service died: 0.5 s, 1 s, 2 s ... at most 10 s. A service killed
# once is back within a second; one that keeps dying does not spin the machine.
RESTART_BACKOFF_BASE_S = 0.5
RESTART_BACKOFF_CAP_S = 10.0
# A service that ran this long before dying was healthy: its backoff starts over.
STABLE_RUN_S = 30.0
# A crash loop: this many failures of one service within the window. Restarting further
# would hide a broken configuration or disk behind a flapping service; give up, loudly.
CRASH_LOOP_FAILURES = 5
CRASH_LOOP_WINDOW_S = 60.0
SUPERVISE_INTERVAL_S = 0.2
# A service with no port (port 0 in the plan) counts as started if it is still alive after
# this long: it has parsed its configuration and opened its files by then.
PORTLESS_SETTLE_S = 1.0
# ``pacegate up --broker``: the embedded amqtt broker (end-to-end acknowledgement), or
# Debian's Mosquitto with pacegate's configuration (WORKDIR/mosquitto.conf).
BROKERS = ("embedded", "mosquitto")
MOSQUITTO_CONFIG = "mosquitto.conf"


class StackError(PacegateError):
    """A service failed to start, died, or the pipeline did not drain."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def choose_endpoints(*, prefer_defaults: bool = True) -> Endpoints:
    """The default ports where they are free, otherwise free ephemeral ones (so a demo
    runs beside another pacegate, or anything else on 8883)."""
    taken: set[int] = set()

    def pick(default: int) -> tuple[str, int]:
        if prefer_defaults and default not in taken and port_is_free(DEFAULT_HOST, default):
            taken.add(default)
            return DEFAULT_HOST, default
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        return DEFAULT_HOST, port

    return Endpoints(**{e.name: pick(e.port) for e in DEFAULT_ENDPOINTS})


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(found).exists():
        raise ConfigError(
            None,
            "--broker",
            "mosquitto is not installed",
            fix="install Debian's mosquitto (./dev setup does), or use --broker embedded",
        )
    return found


def write_mosquitto_config(work: WorkLayout, ep: Endpoints, *, overwrite: bool) -> Path:
    """``WORKDIR/mosquitto.conf`` for ``pacegate up --broker mosquitto`` (kept if edited)."""
    from pacegate.pki.mosquitto import mosquitto_cannot_reach, mosquitto_conf, mosquitto_run_user

    blocked = mosquitto_cannot_reach(work.pki)
    if blocked is not None:
        # started as root, mosquitto drops to its own account before opening a certificate
        raise StackError(
            f"mosquitto runs as {mosquitto_run_user(work.pki)!r}, which cannot enter "
            f"{blocked} to reach the PKI in {work.pki.root} (fix: chmod o+x {blocked}, or "
            "use a work directory it can reach, e.g. under /srv, or --broker embedded)"
        )
    path = work.root / MOSQUITTO_CONFIG
    if overwrite or not path.exists():
        # it logs to stderr, i.e. WORKDIR/logs/broker.log
        head = ["log_dest stderr", "log_type error warning notice information"]
        body = mosquitto_conf(work.pki, host=ep.mqtt[0], port=ep.mqtt[1])
        path.write_text("\n".join([*head, body]))
    return path


def write_configs(work: WorkLayout, ep: Endpoints, *, overwrite: bool) -> None:
    """Write the four service configs for ``ep`` (keeping hand-edited ones unless asked)."""
    from broker.config import render_default_config as broker_config
    from console.workdir import cloud_config_text, gateway_config_text, hospital_config_text

    texts = {
        work.broker_config: broker_config(
            work.pki.root, host=ep.mqtt[0], port=ep.mqtt[1], config_dir=work.root
        ),
        work.cloud_config: cloud_config_text(work, host=ep.cloud[0], port=ep.cloud[1]),
        work.hospital_config: hospital_config_text(
            work,
            host=ep.hospital[0],
            port=ep.hospital[1],
            metrics_port=ep.hospital_metrics[1],
            cloud_host=ep.cloud[0],
            cloud_port=ep.cloud[1],
        ),
        work.gateway_config: gateway_config_text(
            work,
            mqtt_host=ep.mqtt[0],
            mqtt_port=ep.mqtt[1],
            hospital_host=ep.hospital[0],
            hospital_port=ep.hospital[1],
            metrics_port=ep.gateway_metrics[1],
        ),
    }
    for path, text in texts.items():
        if overwrite or not path.exists():
            path.write_text(text)
    ep.write(work)


def _listens(pid: int, port: int) -> bool:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


def wait_for_listen(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``proc`` has a listening socket on ``port``.

    We look at the process's sockets rather than connecting: a probe connection that closes
    mid-handshake is, to a zero-trust service, a refused peer, and would be logged and counted
    as one.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"exited with code {proc.returncode} before listening on {port}")
        if _listens(proc.pid, port):
            return
        time.sleep(0.1)
    raise StackError(f"did not listen on port {port} within {timeout:.0f} s")


@dataclass
class RestartPolicy:
    """When to restart a service that died, and when to give up (sans-IO: times are given).

    ``on_failure(now, ran_s)`` returns the delay before the restart, or None for a crash
    loop (:data:`CRASH_LOOP_FAILURES` failures within :data:`CRASH_LOOP_WINDOW_S`)."""

    base_s: float = RESTART_BACKOFF_BASE_S
    cap_s: float = RESTART_BACKOFF_CAP_S
    stable_s: float = STABLE_RUN_S
    loop_failures: int = CRASH_LOOP_FAILURES
    loop_window_s: float = CRASH_LOOP_WINDOW_S
    consecutive: int = 0
    recent: list[float] = field(default_factory=list)

    def on_failure(self, now: float, ran_s: float) -> float | None:
        if ran_s >= self.stable_s:
            self.consecutive = 0
        self.recent = [t for t in self.recent if now - t < self.loop_window_s] + [now]
        if len(self.recent) >= self.loop_failures:
            return None
        delay = min(self.cap_s, self.base_s * 2.0**self.consecutive)
        self.consecutive += 1
        return delay


class CrashLoop(StackError):
    """A service failed :data:`CRASH_LOOP_FAILURES` times within the window."""


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: TextIO
    started_at: float = field(default_factory=time.monotonic)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def pacegate_argv(*args: str, log_level: str | None = None, log_json: bool = False) -> list[str]:
    # -P: not the current directory on sys.path, so a folder named pacegate/ beside the
    # caller (the clone's parent, say) cannot shadow the installed package.
    argv = [sys.executable, "-P", "-m", "console"]
    if log_level:
        argv += ["--log-level", log_level]
    if log_json:
        argv.append("--log-json")
    return argv + list(args)


@dataclass
class Stack:
    """The four services of one work directory, started and stopped together."""

    work: WorkLayout
    endpoints: Endpoints
    # what 'pacegate status' reads (stack.json): when the stack and each service started
    started_at: float = field(default_factory=time.time)
    states: dict[str, ServiceState] = field(default_factory=dict)
    log_level: str = "INFO"
    log_json: bool = False
    broker: str = "embedded"  # or "mosquitto" (BROKERS)
    services: list[Service] = field(default_factory=list)
    policies: dict[str, RestartPolicy] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    last_exit: dict[str, int] = field(default_factory=dict)
    # a dead service's name -> when it is restarted (time.monotonic())
    restart_at: dict[str, float] = field(default_factory=dict)

    def _config_of(self, name: str) -> Path:
        return {
            "broker": self.work.broker_config,
            "cloud": self.work.cloud_config,
            "hospital": self.work.hospital_config,
            "gateway": self.work.gateway_config,
        }[name]

    def _port_of(self, name: str) -> tuple[str, int]:
        ep = self.endpoints
        return {
            "broker": ep.mqtt,
            "cloud": ep.cloud,
            "hospital": ep.hospital,
            "gateway": ep.gateway_metrics,
        }[name]

    def service_names(self) -> tuple[str, ...]:
        """The services, in start order (a seam: a cluster supervises more of them)."""
        return SERVICE_ORDER

    def stop_rank(self, name: str) -> int:
        """Where ``name`` comes in the stop order (:data:`STOP_ORDER`: the device side first)."""
        return STOP_ORDER.index(name) if name in STOP_ORDER else len(STOP_ORDER)

    def service_argv(self, name: str) -> list[str]:
        """The command line of service ``name`` (a seam: bench/bench_pipeline.py starts the
        same stack with its plaintext services through it)."""
        if name == "broker" and self.broker == "mosquitto":
            return [mosquitto_binary(), "-c", str(self.work.root / MOSQUITTO_CONFIG)]
        return pacegate_argv(
            name,
            "-c",
            str(self._config_of(name)),
            log_level=self.log_level,
            log_json=self.log_json,
        )

    def start(self) -> None:
        self._preflight()
        self.work.logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.service_names():
                self._start_one(name)
        except BaseException:
            self.stop()
            raise

    def _start_one(self, name: str) -> None:
        self.services = [s for s in self.services if s.name != name]
        log_path = self.work.logs_dir / f"{name}.log"
        log_file = open(log_path, "a")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            self.service_argv(name),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.work.root,
            start_new_session=True,  # our signals, not the terminal's
        )
        service = Service(name, proc, log_path, log_file)
        self.services.append(service)
        host, port = self._port_of(name)
        try:
            if port:
                wait_for_listen(port, SERVICE_START_TIMEOUT_S, proc)
            else:  # a service that listens on nothing (a follower): alive after a moment
                time.sleep(PORTLESS_SETTLE_S)
                if proc.poll() is not None:
                    raise StackError(f"exited with code {proc.returncode} at start")
        except StackError as exc:
            raise StackError(
                f"{name} failed to start: {exc}\n--- last lines of {log_path} ---\n{service.tail()}"
            ) from None
        log.info("%s listening on %s:%d (pid %d)", name, host, port, proc.pid)
        self._record_state(name, proc.pid, host, port)

    def _preflight(self) -> None:
        """Before anything starts: every port free (else name it and its holder, instead of
        a service's traceback in its log), and every log owner-only (a log names devices
        and peers; opening it for append keeps the mode made here)."""
        for name in self.service_names():
            host, port = self._port_of(name)
            if not port:
                continue
            ensure_port_free(name, host, port, where=f"{self.work.endpoints} (or delete it)")
            create_private(self.work.logs_dir / f"{name}.log")

    def _record_state(self, name: str, pid: int, host: str, port: int) -> None:
        """Tell ``pacegate status`` (through ``stack.json``) which process serves ``name``."""
        before = self.states.get(name)
        restarts = before.restarts + 1 if before is not None else 0
        self.states[name] = ServiceState(pid, host, port, time.time(), restarts)
        write_state(self.work, self.started_at, self.states)

    def check_alive(self) -> None:
        for s in self.services:
            if s.proc.poll() is not None:
                raise StackError(
                    f"{s.name} exited with code {s.proc.returncode}\n"
                    f"--- last lines of {s.log_path} ---\n{s.tail()}"
                )

    # -- supervision -----------------------------------------------------------------------
    def supervise(self, now: float | None = None) -> None:
        """One round: notice services that died, restart those whose delay is over.
        Raises :class:`CrashLoop` when one keeps dying (the caller stops the stack)."""
        now = time.monotonic() if now is None else now
        for s in list(self.services):
            if s.name in self.restart_at or s.proc.poll() is None:
                continue
            s.log_file.close()
            code = s.proc.returncode
            self.last_exit[s.name] = code
            self._failed(s.name, now, now - s.started_at, f"exited with code {code}", s)
        for name, at in list(self.restart_at.items()):
            if now < at:
                continue
            del self.restart_at[name]
            self.restarts[name] = self.restarts.get(name, 0) + 1
            log.warning("restarting %s (restart #%d)", name, self.restarts[name])
            started = time.monotonic()
            try:
                self._start_one(name)
            except StackError as exc:
                dead = next((s for s in self.services if s.name == name), None)
                if dead is not None:
                    dead.log_file.close()
                    if dead.proc.poll() is None:  # never listened: ours, by its PID
                        dead.proc.kill()
                        dead.proc.wait()
                    self.last_exit[name] = dead.proc.returncode
                now = time.monotonic()
                self._failed(name, now, now - started, str(exc).splitlines()[0], dead)
        self.write_status()

    def _failed(self, name: str, now: float, ran_s: float, why: str, s: Service | None) -> None:
        policy = self.policies.setdefault(name, RestartPolicy())
        delay = policy.on_failure(now, ran_s)
        self.write_status()
        if delay is None:
            tail = s.tail() if s is not None else ""
            log_path = self.work.logs_dir / f"{name}.log"
            raise CrashLoop(
                f"{name} is crash-looping: it failed {policy.loop_failures} times within "
                f"{policy.loop_window_s:.0f} s (last: {why}); giving up and stopping the "
                f"stack. Fix the cause, then run 'pacegate up' again.\n"
                f"--- last lines of {log_path} ---\n{tail}"
            )
        log.error(
            "%s %s after %.1f s; restarting in %.1f s (%d restarts so far)",
            name,
            why,
            ran_s,
            delay,
            self.restarts.get(name, 0),
        )
        self.restart_at[name] = now + delay

    def write_status(self) -> None:
        """``WORKDIR/supervision.json``: each service's pid, restarts and last exit code."""
        status = {
            name: {
                "pid": next(
                    (s.proc.pid for s in self.services if s.name == name and s.proc.poll() is None),
                    None,
                ),
                "restarts": self.restarts.get(name, 0),
                "last_exit_code": self.last_exit.get(name),
                "restarting": name in self.restart_at,
            }
            for name in self.service_names()
        }
        path = self.work.root / "supervision.json"
        tmp = path.with_suffix(".json.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(status, indent=2) + "\n")
            os.replace(tmp, path)

    def stop(self) -> None:
        """SIGTERM our services, the device side first (:data:`STOP_ORDER`), each waited
        for in turn; SIGKILL any that outstays the grace."""
        self.restart_at.clear()
        for s in sorted(self.services, key=lambda s: self.stop_rank(s.name)):
            was_running = s.proc.poll() is None
            if was_running:
                with contextlib.suppress(ProcessLookupError):
                    s.proc.send_signal(signal.SIGTERM)
            asked = time.monotonic()
            deadline = asked + STOP_GRACE_S
            while s.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if s.proc.poll() is None:
                log.warning(
                    "%s did not stop within %.0f s; killing pid %d",
                    s.name,
                    STOP_GRACE_S,
                    s.proc.pid,
                )
                s.proc.kill()
                s.proc.wait()
            elif was_running:
                log.info(
                    "%s stopped in %.2f s (exit code %d)",
                    s.name,
                    time.monotonic() - asked,
                    s.proc.returncode,
                )
            s.log_file.close()
        self.services.clear()
        self.write_status()  # every pid gone


def scrape(host: str, port: int) -> dict[str, float]:
    """Read a Prometheus text endpoint into ``{"name{label=value}": value}``."""
    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def rejected_by_reason(metrics: dict[str, float], prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    head = f"{prefix}{{reason="
    for key, value in metrics.items():
        if key.startswith(head) and value:
            out[key[len(head) : -1]] = int(value)
    return out


@dataclass
class PipelineCounts:
    received: int = 0
    accepted: int = 0
    forwarded: int = 0
    spooled: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    @classmethod
    def scrape(cls, ep: Endpoints) -> PipelineCounts:
        g = scrape(*ep.gateway_metrics)
        h = scrape(*ep.hospital_metrics)
        rejected = rejected_by_reason(g, "pacegate_gateway_rejected_total")
        for reason, n in rejected_by_reason(h, "pacegate_hospital_rejected_total").items():
            rejected[f"hospital_{reason}"] = n
        return cls(
            received=int(g.get("pacegate_gateway_received_total", 0)),
            accepted=int(g.get("pacegate_gateway_accepted_total", 0)),
            forwarded=int(g.get("pacegate_gateway_forwarded_total", 0)),
            spooled=int(g.get("pacegate_gateway_spooled", 0)),
            stored=int(h.get("pacegate_hospital_stored_total", 0)),
            duplicates=int(h.get("pacegate_hospital_duplicates_total", 0)),
            rejected=rejected,
        )


def prepare_workdir(work: WorkLayout, device_count: int) -> list[str]:
    """Create the PKI if missing and enrol ``device_count`` simulated pacemakers."""
    from pacegate import pki

    work.root.mkdir(parents=True, exist_ok=True)
    if not work.pki.ca_cert.exists():
        log.info("creating the PKI in %s", work.pki.root)
        pki.init_pki(work.pki.root)
    wanted = [f"pm-{i:04d}" for i in range(1, device_count + 1)]
    missing = [d for d in wanted if not work.pki.device_cert(d).exists()]
    if missing:
        log.info("enrolling %d simulated pacemakers", len(missing))
        pki.enroll_devices(work.pki.root, missing)
    return wanted


@contextlib.contextmanager
def running_stack(
    work: WorkLayout,
    *,
    overwrite_configs: bool,
    log_level: str = "INFO",
    log_json: bool = False,
    broker: str = "embedded",
    stack_type: type[Stack] = Stack,
) -> Iterator[Stack]:
    """The stack of ``work`` started on its endpoints, stopped on exit (``stack_type``: a
    subclass that starts other commands, as bench/bench_pipeline.py's plaintext stack)."""
    if broker not in BROKERS:
        raise ConfigError(None, "--broker", f"unknown broker {broker!r}", fix="embedded|mosquitto")
    ep = read_endpoints(work) if not overwrite_configs else None
    if ep is None or overwrite_configs:
        ep = choose_endpoints()
    write_configs(work, ep, overwrite=overwrite_configs)
    if broker == "mosquitto":
        write_mosquitto_config(work, ep, overwrite=overwrite_configs)
    stack = stack_type(work, ep, log_level=log_level, log_json=log_json, broker=broker)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


T = TypeVar("T")


class Supervised(Protocol):
    def supervise(self) -> None: ...


def supervise_until_signalled(
    running: contextlib.AbstractContextManager[T],
    supervised: Callable[[T], Supervised],
    banner: Callable[[T], str],
    *,
    stopping: str,
) -> int:
    """``pacegate up`` and ``pacegate cluster up``: enter ``running``, print its banner,
    supervise (restart what dies, :class:`CrashLoop` ends it) until SIGINT/SIGTERM, then
    leave it (which stops every service in order). 0 on a signal, 1 on a crash loop."""
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        with running as value:
            print(banner(value), file=sys.stderr)
            target = supervised(value)
            while True:
                target.supervise()
                time.sleep(SUPERVISE_INTERVAL_S)
    except CrashLoop as exc:
        print(f"pacegate: {exc}", file=sys.stderr)
        return 1
    except _Stop as stop:
        print(f"pacegate: {stop}, {stopping}", file=sys.stderr)
        return 0


def cli_up(args: argparse.Namespace) -> int:
    work = WorkLayout(args.workdir.resolve())
    if not work.pki.ca_cert.exists():
        raise ConfigError(
            work.pki.ca_cert,
            "",
            "no PKI in this work directory",
            fix=f"run 'pacegate pki init --dir {work.pki.root}' and enroll devices, "
            "or run 'pacegate demo' which does it for you",
        )
    hold_workdir(work)  # a second 'up' on this directory is refused before it starts anything

    def banner(stack: Stack) -> str:
        ep = stack.endpoints
        return (
            f"pacegate is up in {work.root}: MQTTS {ep.mqtt[0]}:{ep.mqtt[1]}, hospital "
            f"{ep.hospital[1]}, cloud {ep.cloud[1]}, gateway metrics "
            f"http://{ep.gateway_metrics[0]}:{ep.gateway_metrics[1]}/metrics; logs in "
            f"{work.logs_dir}. Ctrl-C stops."
        )

    return supervise_until_signalled(
        running_stack(
            work,
            overwrite_configs=False,
            log_level=args.log_level,
            log_json=args.log_json,
            broker=getattr(args, "broker", "embedded"),
        ),
        lambda stack: stack,
        banner,
        stopping="stopping services",
    )


def cli_demo(args: argparse.Namespace) -> int:
    from console.demo import run_demo

    if getattr(args, "chaos", False) and not getattr(args, "cluster", False):
        raise ConfigError(None, "--chaos", "needs --cluster", fix="pacegate demo --cluster --chaos")
    if getattr(args, "cluster", False):
        from console.cluster import run_cluster_demo

        return run_cluster_demo(args)
    hold_workdir(WorkLayout(args.workdir.resolve()))
    return run_demo(args)

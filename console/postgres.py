"""A throwaway PostgreSQL server for tests, benchmarks and the one-machine cluster: its own
data directory under the caller's work directory, listening on TCP loopback only, started
and stopped by its postmaster's pid (never by name: other PostgreSQL servers on the machine
are left alone).

Authentication: ``scram-sha-256`` with a random password, on loopback TCP only (initdb's
``pg_hba.conf`` lines for 127.0.0.1/32 and ::1/128; the Unix socket lives in a directory of
the server's own, and ``listen_addresses`` is 127.0.0.1). Not ``trust``: on loopback any local
user, any process of any other engineer or service on the host, could connect as the
superuser. The password is written to ``DIR/password`` (mode 0600) and is part of
:attr:`PostgresServer.dsn`. TLS between hospital nodes and PostgreSQL is the production
setting (see docs/scaling.md); on loopback it adds nothing a local attacker could not read
from the process.

``initdb`` refuses to run as root, so as root the server runs as Debian's ``postgres``
system user (``runuser -u postgres``) and its directories are handed to that user; as any
other user it runs as that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pacegate.errors import PacegateError

# The system user a root caller runs the server as (Debian's postgresql package creates it).
SERVER_USER = "postgres"
SUPERUSER = "pacegate"
# initdb plus the first start take ~2-4 s on an idle 2-core machine; a loaded one is slower.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


class PostgresError(PacegateError):
    """The throwaway PostgreSQL could not be set up, started or stopped."""


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway server: what :func:`stop` needs, and how to connect."""

    directory: Path
    port: int
    pid: int
    password: str

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname={dbname} user={SUPERUSER} "
            f"password={self.password}"
        )


def bin_dir() -> Path:
    """Debian installs the server binaries off PATH, per major version; the newest wins."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4])
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresError(
        "PostgreSQL's initdb was not found (looked in /usr/lib/postgresql/*/bin and PATH): "
        "run './dev setup', which installs Debian's postgresql package"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresError(
            f"running as root, and there is no '{SERVER_USER}' user to run PostgreSQL as "
            "(initdb refuses root): run './dev setup', which installs Debian's postgresql"
        ) from None
    return ["runuser", "-u", SERVER_USER, "--"]


def _hand_over(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVER_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if proc.returncode != 0:
        raise PostgresError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def start(directory: Path, port: int | None = None, *, durable: bool = True) -> PostgresServer:
    """initdb a fresh cluster in ``directory`` (which must not hold one) and start it on
    127.0.0.1:``port`` (a free one when None). ``durable=False`` turns fsync off: for tests
    whose subject is not a power cut; benchmarks and deployments keep it on."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    data, sock = directory / "data", directory / "socket"
    if data.exists():
        raise PostgresError(f"{data} exists: give start() a fresh directory")
    runas = _as_server_user()
    if runas:
        # the server user must reach the directory; /tmp/pytest-of-root and most homes are 0700
        probe = subprocess.run([*runas, "test", "-x", str(directory.parent)], check=False)
        if probe.returncode != 0:
            raise PostgresError(
                f"{directory.parent}: the '{SERVER_USER}' user cannot enter this directory; "
                "put the PostgreSQL directory where it can (e.g. under a fresh "
                "tempfile.mkdtemp())"
            )
    _hand_over(directory)
    for d in (data, sock):
        d.mkdir(mode=0o700)
        _hand_over(d)
    password = secrets.token_urlsafe(24)
    pwfile = directory / "initdb-password"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    _hand_over(pwfile)
    bindir = bin_dir()
    try:
        _run(
            [
                *runas,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            "initdb",
        )
    finally:
        pwfile.unlink(missing_ok=True)
    (directory / "password").write_text(password + "\n")
    (directory / "password").chmod(0o600)
    port = port if port is not None else free_port()
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    log = directory / "server.log"
    log.touch()
    _hand_over(log)
    _run(
        [
            *runas,
            str(bindir / "pg_ctl"),
            *("-D", str(data), "-l", str(log), "-w", "-t", str(int(START_TIMEOUT_S))),
            *("-o", options, "start"),
        ],
        f"pg_ctl start (see {log})",
    )
    pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    return PostgresServer(directory, port, pid, password)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def stop(server: PostgresServer) -> None:
    """Fast shutdown by the postmaster's pid (SIGINT: roll back open transactions, close
    connections), SIGKILL past :data:`STOP_TIMEOUT_S`. Only the postmaster recorded at start
    is signalled, and only while it still is that server's (its pid file names it)."""
    pidfile = server.data_dir / "postmaster.pid"
    with contextlib.suppress(FileNotFoundError, ValueError):
        if int(pidfile.read_text().split("\n", 1)[0]) != server.pid:
            return  # not ours any more (already stopped, pid reused)
    if not _alive(server.pid):
        return
    os.kill(server.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(server.pid):
        if time.monotonic() > deadline:
            os.kill(server.pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT_S
        time.sleep(0.05)


@contextlib.contextmanager
def running(
    directory: Path, port: int | None = None, *, durable: bool = True
) -> Iterator[PostgresServer]:
    server = start(directory, port, durable=durable)
    try:
        yield server
    finally:
        stop(server)

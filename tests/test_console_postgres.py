"""The throwaway PostgreSQL of tests, benchmarks and the one-machine cluster: loopback only,
a password (not trust), and stopped by its own pid without touching any other server."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from console import postgres

pytestmark = pytest.mark.integration


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="pacegate-pg-test-"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_throwaway_server_listens_on_loopback_with_a_password_and_stops_by_its_pid(
    reachable_dir: Path, pg_server: postgres.PostgresServer
) -> None:
    server = postgres.start(reachable_dir / "pg", durable=False)
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as c:
            assert c.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            assert c.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
            hba = c.execute(
                "SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type <> 'local'"
            ).fetchall()
            assert hba == [("scram-sha-256",)]
        password_file = reachable_dir / "pg" / "password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert password_file.read_text().strip() == server.password
        no_password = server.dsn().replace(f"password={server.password}", "password=")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(no_password, connect_timeout=10)
    finally:
        postgres.stop(server)
    assert not postgres._alive(server.pid)
    # the session's server (another PostgreSQL on this machine) is untouched
    assert postgres._alive(pg_server.pid)
    with psycopg.connect(pg_server.dsn(), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    postgres.stop(server)  # a second stop is a no-op, not a signal to a reused pid


def test_start_refuses_a_directory_that_already_holds_a_cluster(reachable_dir: Path) -> None:
    (reachable_dir / "pg" / "data").mkdir(parents=True)
    with pytest.raises(postgres.PostgresError, match="fresh directory"):
        postgres.start(reachable_dir / "pg")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_directory_the_server_user_cannot_enter_is_named_with_the_fix(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(postgres.PostgresError, match="cannot enter this directory") as info:
        postgres.start(private / "inner" / "pg")
    assert str(private / "inner") in str(info.value)

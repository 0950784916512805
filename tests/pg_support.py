"""A real, throwaway PostgreSQL for the tests: one server per test session (started by
:mod:`console.postgres` on loopback, stopped by its pid), one fresh database per test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from console import postgres


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.PostgresServer]:
    try:
        postgres.bin_dir()
    except postgres.PostgresError as exc:
        pytest.fail(str(exc))  # ./dev setup installs it: a missing server is a setup bug
    # pytest's tmp_path sits in a 0700 directory the server user cannot enter
    root = Path(tempfile.mkdtemp(prefix="pacegate-pg-"))
    root.chmod(0o711)
    try:
        # fsync off: no test here is about a power cut, and it spares the shared disk
        with postgres.running(root / "cluster", durable=False) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server: postgres.PostgresServer) -> Iterator[str]:
    """The DSN of a database of its own for this test, dropped after it."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_server.dsn(name)
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

"""Shared fixtures: a fresh PKI, and the real brokers (embedded amqtt and Debian mosquitto)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacegate.layout import PkiLayout

# the throwaway PostgreSQL (pg_server for the session, pg_dsn a database per test)
from tests.pg_support import pg_dsn, pg_server  # noqa: F401
from tests.support import (
    BrokerHandle,
    close_leftover_clients,
    embedded_broker,
    have_mosquitto,
    mosquitto_broker,
)

DEVICE_IDS = ("pm-0001", "pm-0002", "pm-0003")


@pytest.fixture(autouse=True)
def _fresh_security_event_limiter() -> None:
    """Each test starts with an empty rate limiter: the security events of earlier tests in
    this process must not suppress the ones a test counts."""
    from pacegate.log import event_limiter

    event_limiter().reset()


@pytest.fixture(scope="session")
def pki_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PKI made for the session (a CA, ML-DSA and EC keys: about 0.3 s), never used
    directly: each test gets its own copy from :func:`pki_dir`."""
    from pacegate.pki import enroll_devices, init_pki

    root = tmp_path_factory.mktemp("pki-template") / "pki"
    init_pki(root)
    enroll_devices(root, DEVICE_IDS)
    return root


@pytest.fixture
def pki_dir(tmp_path: Path, pki_template: Path) -> Path:
    """The test's own PKI directory (CA, broker, gateway, PQ identities) with
    pm-0001..pm-0003: a copy of the session's, with its owners and modes (the mosquitto
    account owns what 'pki init' gave it), and the Mosquitto configuration, the one file
    that names absolute paths, written again for the copy."""
    from pacegate.pki.mosquitto import mosquitto_conf

    root = tmp_path / "pki"
    shutil.copytree(pki_template, root, symlinks=True)
    for path in (root, *root.rglob("*")):
        original = pki_template / path.relative_to(root)
        st = original.lstat()
        if (path.lstat().st_uid, path.lstat().st_gid) != (st.st_uid, st.st_gid):
            os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    conf = PkiLayout(root).mosquitto_dir / "pacegate.conf"
    conf.write_text(mosquitto_conf(PkiLayout(root)))
    return root


@pytest.fixture
def pki(pki_dir: Path) -> PkiLayout:
    return PkiLayout(pki_dir)


@pytest.fixture(autouse=True)
def _close_leftover_mqtt_clients() -> Iterator[None]:
    """A paho client a test left open reconnects for ever in its thread: close it here."""
    yield
    close_leftover_clients()


@pytest.fixture
def embedded_broker_fixture(pki_dir: Path, tmp_path: Path) -> Iterator[BrokerHandle]:
    with embedded_broker(pki_dir, tmp_path / "embedded") as handle:
        yield handle


@pytest.fixture
def mosquitto_broker_fixture(pki_dir: Path, tmp_path: Path) -> Iterator[BrokerHandle]:
    if not have_mosquitto():
        pytest.skip("Debian's mosquitto is not installed (./dev setup installs it)")
    with mosquitto_broker(pki_dir, tmp_path / "mosquitto") as handle:
        yield handle


@pytest.fixture(name="embedded_broker")
def _embedded_broker(embedded_broker_fixture: BrokerHandle) -> BrokerHandle:
    return embedded_broker_fixture


@pytest.fixture(name="mosquitto_broker")
def _mosquitto_broker(mosquitto_broker_fixture: BrokerHandle) -> BrokerHandle:
    return mosquitto_broker_fixture


@pytest.fixture(
    params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)],
)
def broker(request: pytest.FixtureRequest) -> BrokerHandle:
    """The same test against both brokers: ``broker.kind`` says which one runs."""
    name = "embedded_broker_fixture" if request.param == "embedded" else "mosquitto_broker_fixture"
    handle: BrokerHandle = request.getfixturevalue(name)
    return handle


# -- the integration marker, enforced ---------------------------------------------------------
# Every test that starts a process or a server, or connects to one, carries
# @pytest.mark.integration, so that '-m "not integration"' is a loop of seconds. A test
# without the marker that does any of these fails, naming what it did (set
# PACEGATE_INTEGRATION_REPORT=FILE to list such tests in FILE instead of failing them).
_activity: list[str] | None = None
# Threads alive when the test began: a thread an earlier (integration) test left behind,
# e.g. a client still reconnecting to a server that is gone, is not this test's doing.
_threads_before: frozenset[int] = frozenset()


def _record(what: str) -> None:
    if _activity is None or len(_activity) >= 3:
        return
    if threading.get_ident() in _threads_before:
        leaked = os.environ.get("PACEGATE_LEAKED_THREAD_REPORT")
        if leaked:
            with open(leaked, "a") as f:
                f.write(f"{threading.current_thread().name}\t{what}\n")
        return
    _activity.append(what)


def _install_activity_probes() -> None:
    import multiprocessing.process
    import socket
    import subprocess

    def wrap(owner: Any, name: str, label: Callable[..., str]) -> None:
        original = getattr(owner, name)

        def probe(self: Any, *args: Any, **kwargs: Any) -> Any:
            _record(label(self, *args, **kwargs))
            return original(self, *args, **kwargs)

        setattr(owner, name, probe)

    def address(sock: Any, addr: Any = None, *_: Any, **__: Any) -> str:
        return f"socket connect to {addr!r}"

    wrap(socket.socket, "connect", address)
    wrap(socket.socket, "connect_ex", address)
    wrap(
        socket.socket, "listen", lambda sock, *_a, **_k: f"socket listen on {sock.getsockname()!r}"
    )
    wrap(subprocess.Popen, "__init__", lambda p, args, *_a, **_k: f"subprocess {args!r:.80}")
    wrap(multiprocessing.process.BaseProcess, "start", lambda p: "a multiprocessing worker")


def pytest_configure(config: pytest.Config) -> None:
    _install_activity_probes()
    if "not integration" in (config.getoption("markexpr", "") or ""):
        _configure_inner_loop()


def _configure_inner_loop() -> None:
    """``-m "not integration"``, the loop run after each edit: the property tests run
    :data:`tests.support.INNER_LOOP_EXAMPLES` examples each (the whole suite, CI's, runs the
    full counts), and jsonschema goes without the optional IRI grammar, whose import costs
    about 3 s (rfc3987_syntax builds a Lark parser; only the "iri" formats use it, which
    pacegate's gateway schema does not, and the SBOM test that does is an integration test)."""
    import sys

    from hypothesis import settings

    from tests import support

    support.INNER_LOOP = True
    # the 10,000-run ML-KEM known-answer test (about 2 minutes) is the whole suite's; the
    # inner loop keeps the 100-run one
    os.environ["PACEGATE_FULL_KAT"] = "0"
    settings.register_profile("inner-loop", max_examples=support.INNER_LOOP_EXAMPLES)
    settings.load_profile("inner-loop")
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    global _activity, _threads_before
    _activity = [] if item.get_closest_marker("integration") is None else None
    _threads_before = frozenset(
        t.ident for t in threading.enumerate() if t is not threading.main_thread() and t.ident
    )
    try:
        return (yield)
    finally:
        item.stash[_ACTIVITY] = _activity or []
        _activity = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    global _activity
    _activity = item.stash.get(_ACTIVITY, None)
    if item.get_closest_marker("integration") is not None:
        _activity = None
    try:
        result = yield
    finally:
        seen, _activity = _activity, None
    if seen:
        report = os.environ.get("PACEGATE_INTEGRATION_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(f"{item.nodeid}\t{seen[0]}\n")
        else:
            pytest.fail(
                f"{item.nodeid} starts or reaches a process or server ({'; '.join(seen)}) "
                "but is not marked @pytest.mark.integration (fix: mark it, so the inner "
                "loop '-m \"not integration\"' stays fast)",
                pytrace=False,
            )
    return result


_ACTIVITY = pytest.StashKey[list[str]]()

"""Shared fixtures: a fresh PKI, and the real brokers (embedded amqtt and Debian mosquitto)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pacegate.layout import PkiLayout
from tests.support import BrokerHandle, embedded_broker, have_mosquitto, mosquitto_broker

DEVICE_IDS = ("pm-0001", "pm-0002", "pm-0003")


@pytest.fixture(autouse=True)
def _fresh_security_event_limiter() -> Iterator[None]:
    """Each test starts with an empty rate limiter: the security events of earlier tests in
    this process must not suppress the ones a test counts."""
    from pacegate.log import event_limiter

    event_limiter().reset()
    yield


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    """A fresh PKI directory (CA, broker, gateway, PQ identities) with pm-0001..pm-0003."""
    from pacegate.pki import enroll_devices, init_pki

    root = tmp_path / "pki"
    init_pki(root)
    enroll_devices(root, DEVICE_IDS)
    return root


@pytest.fixture
def pki(pki_dir: Path) -> PkiLayout:
    return PkiLayout(pki_dir)


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

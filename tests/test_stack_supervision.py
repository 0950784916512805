"""``pacegate up`` supervises, and acknowledged means stored.

The "done when" test of issue 10: simulated pacemakers run against ``pacegate up`` (a
subprocess, every service its own process); the gateway, the hospital and the broker are
each killed with SIGKILL in turn; nobody restarts anything by hand. Afterwards every
(device, counter) a device saw acknowledged (``pacegate devices --acked-log``) is in
``pacegate hospital export`` exactly once. The restart policy is also tested as pure logic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.bench_ack_loss import exported_pairs
from console.stack import (
    CRASH_LOOP_FAILURES,
    RestartPolicy,
    choose_endpoints,
    prepare_workdir,
    write_configs,
)
from console.workdir import WorkLayout
from device_sim.fleet import read_acked_log
from tests.support import wait_until

DEVICES = 20
RATE_HZ = 2
DURATION_S = 40
UP_READY = "pacegate is up in"
WAIT = 90.0


# -- the restart policy, as pure logic ------------------------------------------------------
def test_a_dead_service_is_restarted_with_growing_backoff() -> None:
    policy = RestartPolicy(loop_failures=100)
    delays = [policy.on_failure(now=i * 100.0, ran_s=1.0) for i in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_a_service_that_ran_long_enough_starts_its_backoff_over() -> None:
    policy = RestartPolicy()
    policy.on_failure(now=0.0, ran_s=1.0)
    policy.on_failure(now=100.0, ran_s=1.0)
    assert policy.on_failure(now=200.0, ran_s=3600.0) == 0.5


def test_rapid_failures_are_a_crash_loop_and_supervision_gives_up() -> None:
    policy = RestartPolicy()
    results = [policy.on_failure(now=float(i), ran_s=0.2) for i in range(CRASH_LOOP_FAILURES)]
    assert all(d is not None for d in results[:-1])
    assert results[-1] is None  # the fifth failure within the window: give up


def test_failures_spread_over_time_are_not_a_crash_loop() -> None:
    policy = RestartPolicy()
    spaced = [policy.on_failure(now=i * 61.0, ran_s=0.2) for i in range(CRASH_LOOP_FAILURES * 2)]
    assert None not in spaced


# -- the whole stack, for real -----------------------------------------------------------------
def _status(work: WorkLayout) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((work.root / "supervision.json").read_text())
    except (OSError, ValueError):
        return {}
    return data


def _service_pid(work: WorkLayout, name: str) -> int | None:
    pid = _status(work).get(name, {}).get("pid")
    return int(pid) if pid else None


def _restarted(work: WorkLayout, name: str, times: int) -> bool:
    entry = _status(work).get(name, {})
    return entry.get("restarts", 0) >= times and bool(entry.get("pid"))


def _kill_and_wait_for_restart(work: WorkLayout, name: str, up_log: Path) -> None:
    pid = _service_pid(work, name)
    assert pid is not None, (name, _status(work), up_log.read_text()[-2000:])
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _restarted(work, name, 1), WAIT), (
        name,
        _status(work),
        up_log.read_text()[-3000:],
    )


def _stored_pairs(work: WorkLayout) -> list[tuple[str, int]]:
    from hospital.keyring import Keyring
    from hospital.store import SqliteReadingStore

    store = SqliteReadingStore(
        work.hospital_dir / "readings.db", Keyring.load(work.hospital_dir / "keyring.json")
    )
    try:
        return [(r.device_id, r.counter) for batch in store.iter_records() for r in batch]
    finally:
        store.close()


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_every_acknowledged_reading_is_stored_once_while_gateway_hospital_and_broker_are_killed(
    tmp_path: Path,
) -> None:
    work = WorkLayout(tmp_path / "work")
    prepare_workdir(work, DEVICES)
    write_configs(work, choose_endpoints(prefer_defaults=False), overwrite=True)
    up_log = tmp_path / "up.log"
    acked_log = tmp_path / "acked.jsonl"
    with open(up_log, "w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "console", "up", "--workdir", str(work.root)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    devices: subprocess.Popen[str] | None = None
    try:
        assert wait_until(lambda: UP_READY in up_log.read_text(), WAIT), up_log.read_text()
        with open(tmp_path / "devices.err", "w") as devices_err:
            devices = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "console",
                    "devices",
                    "--workdir",
                    str(work.root),
                    "--count",
                    str(DEVICES),
                    "--rate",
                    str(RATE_HZ),
                    "--duration",
                    str(DURATION_S),
                    "--drain",
                    "60",
                    "--acked-log",
                    str(acked_log),
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=devices_err,
                text=True,
            )
        time.sleep(6)  # pacing, not an assertion: let readings flow before each kill
        for name in ("gateway", "hospital", "broker"):
            _kill_and_wait_for_restart(work, name, up_log)
            time.sleep(4)
        summary_text, _ = devices.communicate(timeout=DURATION_S + 180)
        assert summary_text.strip(), (tmp_path / "devices.err").read_text()[-3000:]
        summary = json.loads(summary_text)
        acked = read_acked_log(acked_log)
        assert len(acked) == summary["acknowledged"]
        assert len(acked) > DEVICES * RATE_HZ * DURATION_S // 2, summary
        # the hospital commits what the gateway spooled or holds once it drains
        assert wait_until(lambda: set(acked) <= set(_stored_pairs(work)), WAIT), (
            f"{len(set(acked) - set(_stored_pairs(work)))} acknowledged readings not stored"
        )
        stored = Counter(exported_pairs(work))  # `pacegate hospital export`, chain verified
        assert [p for p, n in stored.items() if n > 1] == []  # exactly once
        assert set(acked) <= set(stored)
        status = _status(work)
        assert {n: status[n]["restarts"] for n in ("gateway", "hospital", "broker")} == {
            "gateway": 1,
            "hospital": 1,
            "broker": 1,
        }
        assert status["cloud"]["restarts"] == 0  # the others kept running
        children = psutil.Process(up.pid).children()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
        # each service stopped on its SIGTERM, none needed the SIGKILL after the grace,
        # the device side first: broker, gateway, hospital, cloud
        text = up_log.read_text()
        assert "did not stop within" not in text
        order = [text.index(f"{name} stopped in") for name in ("broker", "gateway", "hospital")]
        assert order == sorted(order), text[-2000:]
    finally:
        for proc in (devices, up):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_crash_looping_service_is_reported_and_up_gives_up(tmp_path: Path) -> None:
    """A hospital whose configuration is broken dies at every start: ``up`` restarts it a few
    times, then says it is crash-looping, names its log, stops everything and exits 1."""
    work = WorkLayout(tmp_path / "work")
    prepare_workdir(work, 1)
    write_configs(work, choose_endpoints(prefer_defaults=False), overwrite=True)
    up_log = tmp_path / "up.log"
    with open(up_log, "w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "console", "up", "--workdir", str(work.root)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until(lambda: UP_READY in up_log.read_text(), WAIT), up_log.read_text()
        children = psutil.Process(up.pid).children()
        work.hospital_config.write_text("not: [valid yaml for the hospital\n")
        pid = _service_pid(work, "hospital")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert up.wait(timeout=200) == 1
        text = up_log.read_text()
        assert "hospital is crash-looping" in text
        assert str(work.logs_dir / "hospital.log") in text
        assert _status(work)["hospital"]["restarts"] == CRASH_LOOP_FAILURES - 1
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


@pytest.mark.integration
@pytest.mark.mosquitto
@pytest.mark.timeout(420)
def test_on_mosquitto_acknowledged_readings_are_stored_once_while_gateway_and_hospital_die(
    tmp_path: Path,
) -> None:
    """The same under ``pacegate up --broker mosquitto``, without the broker kill: there a
    PUBACK means Mosquitto owns the message, and its loss under kill -9 is measured
    (bench/bench_ack_loss.py, docs/pki-and-broker.md), not promised."""
    from bench.bench_ack_loss import run
    from tests.support import have_mosquitto, let_others_through

    if not have_mosquitto():
        pytest.skip("Debian's mosquitto is not installed (./dev setup installs it)")
    let_others_through(tmp_path)  # as root, mosquitto drops to its own account
    result = run(tmp_path, broker="mosquitto", kills=("gateway", "hospital"), duration=30.0)
    assert result["acknowledged"] > DEVICES * RATE_HZ * 30 // 2, result["fleet_summary"]
    assert result["lost"] == []
    assert result["stored_twice"] == []
    assert result["restarts"]["gateway"] == result["restarts"]["hospital"] == 1
    assert result["restarts"]["broker"] == 0
    assert result["up_exit_code"] == 0
    assert not result["up_log_killed_after_grace"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mosquitto drops privileges only as root")
def test_up_with_mosquitto_refuses_a_work_directory_its_account_cannot_enter(
    tmp_path: Path,
) -> None:
    """Started as root, mosquitto drops to its own account before it opens a certificate;
    behind a 0700 directory it would die with "Unable to load CA certificates". The stack
    names the directory and the fix instead, and passes once the directory lets it through."""
    from console.stack import StackError, choose_endpoints, write_mosquitto_config
    from console.workdir import WorkLayout
    from pacegate.pki import init_pki
    from pacegate.pki.mosquitto import mosquitto_cannot_reach

    if not have_mosquitto_account():
        pytest.skip("no 'mosquitto' account (./dev setup installs Debian's mosquitto)")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    work = WorkLayout(home / "work")
    init_pki(work.pki.root)
    ep = choose_endpoints(prefer_defaults=False)
    assert mosquitto_cannot_reach(work.pki) is not None
    with pytest.raises(StackError, match=r"cannot enter .*\(fix: chmod o\+x"):
        write_mosquitto_config(work, ep, overwrite=True)
    from tests.support import let_others_through

    let_others_through(work.root)
    assert mosquitto_cannot_reach(work.pki) is None
    assert "user mosquitto" in write_mosquitto_config(work, ep, overwrite=True).read_text()


def have_mosquitto_account() -> bool:
    import pwd

    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return False
    return True

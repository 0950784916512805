"""Every error an operator can cause is a line or two on stderr, with a non-zero exit and no
traceback: what, where (file:line and key, or the flag) and the fix.

The stateful cases run against one real stack (``pacegate up`` on loopback, real PKI, real
SQLite, real TenSEAL) that a small fleet has fed; the flag cases need nothing running, and
prove it by leaving no work directory behind.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console.workdir import WorkLayout
from tests.support import run_pacegate, wait_until

UP_START_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 300.0


def pacegate(
    *args: str, cwd: Path | None = None, timeout: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return run_pacegate(*args, cwd=cwd, timeout=timeout)


def assert_one_clear_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    err = proc.stderr
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


# -- flags, checked before anything starts ---------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "flag", "said"),
    [
        (["demo", "--devices", "0"], "--devices", "got 0"),
        (["demo", "--duration", "0"], "--duration", "got 0"),
        (["demo", "--rate", "-1"], "--rate", "got -1"),
        (["demo", "--rate", "inf"], "--rate", "got inf"),
        (["demo", "--rate", "nan"], "--rate", "got nan"),
        (["demo", "--devices", "many"], "--devices", "whole number"),
        (["devices", "--counter-block", "0"], "--counter-block", "got 0"),
        (["devices", "--rate", "inf"], "--rate", "got inf"),
        (["devices", "--count", "-3"], "--count", "got -3"),
    ],
)
def test_bad_flag_is_refused_before_anything_starts(
    tmp_path: Path, args: list[str], flag: str, said: str
) -> None:
    work = tmp_path / "work"
    proc = pacegate(*args[:1], "--workdir", str(work), *args[1:], timeout=60)
    err = assert_one_clear_error(proc, flag, said, "--help")
    assert proc.returncode == 2, err
    assert not work.exists(), "a refused demo built nothing (no PKI, no services)"


@pytest.mark.integration
def test_analyze_on_an_empty_work_directory_names_it_and_not_a_flag_never_given(
    tmp_path: Path,
) -> None:
    proc = pacegate("analyze", "--workdir", str(tmp_path), timeout=60)
    err = assert_one_clear_error(proc, "hospital.yaml", "not a pacegate work directory", "fix:")
    assert "-c" not in err.replace("--workdir", "")


@pytest.mark.integration
def test_broker_without_a_config_here_points_at_the_work_directory(tmp_path: Path) -> None:
    proc = pacegate("broker", cwd=tmp_path, timeout=60)
    assert_one_clear_error(proc, "broker.yaml", "--workdir W", "-c FILE")
    proc = pacegate("hospital", cwd=tmp_path, timeout=60)
    assert_one_clear_error(proc, "-c/--config is required")


@pytest.mark.integration
def test_yaml_missing_colon_points_at_the_line_of_the_mistake(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("mqtt:\n  host: 127.0.0.1\n  port 8883\n  client_id: gateway\n")
    proc = pacegate("config", "check", str(cfg), "--schema-only", timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"{cfg}:3: YAML syntax error: a key without its ':'" in proc.stderr
    proc = pacegate("gateway", "-c", str(cfg), timeout=60)
    assert_one_clear_error(proc, f"{cfg}:3:", "fix:")


@pytest.mark.integration
def test_unclosed_quote_points_at_where_the_quote_opened(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text('mqtt:\n  host: "127.0.0.1\n  port: 8883\n')
    proc = pacegate("gateway", "-c", str(cfg), timeout=60)
    assert_one_clear_error(proc, f"{cfg}:2:", "YAML syntax error")


@pytest.mark.integration
def test_port_held_by_another_program_is_named_with_its_holder(tmp_path: Path) -> None:
    from console.stack import choose_endpoints, write_configs
    from pacegate.pki import init_pki

    work = WorkLayout(tmp_path / "work")
    init_pki(work.pki.root)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ep = choose_endpoints(prefer_defaults=False)
        ep = type(ep)(**{**vars(ep), "cloud": ("127.0.0.1", port)})
        write_configs(work, ep, overwrite=True)
        proc = pacegate("cloud", "-c", str(work.cloud_config), timeout=120)
        assert_one_clear_error(proc, f"port {port}", "already in use", "listen.port", "fix:")
        # 'up' checks each port before it starts the service, and stops what it started
        proc = pacegate("up", "--workdir", str(work.root), timeout=180)
        assert_one_clear_error(proc, "cloud", f"port {port}", "already in use")
    assert not (work.root / "stack.json").exists()


# -- a running stack -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def running_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkLayout, int]]:
    """``pacegate up`` on a fresh work directory (free ports), fed by a short fleet."""
    from console.stack import choose_endpoints, write_configs
    from pacegate.pki import enroll_devices, init_pki

    work = WorkLayout(tmp_path_factory.mktemp("up") / "work")
    init_pki(work.pki.root)
    enroll_devices(work.pki.root, [f"pm-{i:04d}" for i in range(1, 4)])
    write_configs(work, choose_endpoints(prefer_defaults=False), overwrite=True)
    out = open(work.root / "up.out", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "console", "up", "--workdir", str(work.root)],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_until(
            lambda: (
                (work.root / "stack.json").exists()
                and len(json.loads((work.root / "stack.json").read_text())["services"]) == 4
            ),
            timeout=UP_START_TIMEOUT_S,
        ), (work.root / "up.out").read_text()
        fleet = pacegate(
            "devices",
            *("--workdir", str(work.root), "--count", "3", "--duration", "2", "--rate", "3"),
            "--json",
        )
        assert fleet.returncode == 0, fleet.stderr
        (work.root / "devices.err").write_text(fleet.stderr)
        (work.root / "devices.json").write_text(fleet.stdout)
        yield work, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.close()


@pytest.mark.integration
def test_second_up_on_the_same_work_directory_is_refused_with_the_holders_pid(
    running_up: tuple[WorkLayout, int],
) -> None:
    work, pid = running_up
    broker_log = work.logs_dir / "broker.log"
    before = broker_log.read_text()
    proc = pacegate("up", "--workdir", str(work.root), timeout=60)
    assert_one_clear_error(proc, "in use by pacegate up", f"pid {pid}", ".pacegate.lock")
    assert broker_log.read_text() == before, "the refused up wrote nothing into the stack's logs"


@pytest.mark.integration
def test_service_started_on_a_port_the_stack_holds_names_the_pacegate_holder(
    running_up: tuple[WorkLayout, int],
) -> None:
    work, _ = running_up
    state = json.loads((work.root / "stack.json").read_text())["services"]
    proc = pacegate("broker", "--workdir", str(work.root), timeout=120)
    assert_one_clear_error(
        proc,
        f"port {state['broker']['port']}",
        f"pacegate broker -c {work.broker_config}",
        f"pid {state['broker']['pid']}",
    )
    proc = pacegate("gateway", "-c", str(work.gateway_config), timeout=120)
    assert_one_clear_error(proc, "metrics.port", f"pid {state['gateway']['pid']}")


@pytest.mark.integration
def test_analyze_json_into_a_reader_that_left_ends_quietly(
    running_up: tuple[WorkLayout, int],
) -> None:
    work, _ = running_up
    proc = subprocess.Popen(
        [sys.executable, "-m", "console", "analyze", "--workdir", str(work.root), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # 'head -c 0': the reader is gone before the first byte
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=COMMAND_TIMEOUT_S) == 141, err
    assert "Traceback" not in err, err
    assert "BrokenPipe" not in err, err


@pytest.mark.integration
def test_devices_final_table_shows_who_connected_and_the_average_rate(
    running_up: tuple[WorkLayout, int],
) -> None:
    work, _ = running_up
    err = (work.root / "devices.err").read_text()
    final_row = [line for line in err.splitlines() if line.startswith("│")][-1]
    cells = [c.strip() for c in final_row.strip("│").split("│")]
    devices, connected, sent, acked = (int(c) for c in cells[:4])
    assert devices == connected == 3, final_row
    assert acked == sent > 0
    assert float(cells[6].replace(",", "")) > 0, "acks/s of the whole run, not of its last instant"


@pytest.mark.integration
def test_logs_and_replay_windows_are_owner_only(running_up: tuple[WorkLayout, int]) -> None:
    work, _ = running_up
    paths = [*work.logs_dir.glob("*.log"), work.gateway_dir / "replay.db"]
    assert len(paths) >= 5
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.integration
def test_status_reports_each_service_pid_port_uptime_and_counters(
    running_up: tuple[WorkLayout, int],
) -> None:
    from console.endpoints import read_endpoints

    work, pid = running_up
    acked = json.loads((work.root / "devices.json").read_text())["acknowledged"]
    assert acked > 0

    def status_now() -> dict[str, Any]:
        proc = pacegate("status", "--workdir", str(work.root), "--json", timeout=60)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def drained() -> bool:
        c = status_now()["counters"]
        return bool(c["hospital"]["stored"] == c["gateway"]["accepted"] >= acked)

    # the broker may acknowledge a reading before the hospital stores it: wait for the drain
    assert wait_until(drained, timeout=60)
    status = status_now()
    state = json.loads((work.root / "stack.json").read_text())["services"]
    ep = read_endpoints(work)
    assert ep is not None
    assert status["all_up"] is True
    assert status["stack_pid"] == pid
    assert {n: s["port"] for n, s in status["services"].items()} == {
        "broker": ep.mqtt[1],
        "cloud": ep.cloud[1],
        "hospital": ep.hospital[1],
        "gateway": ep.gateway_metrics[1],
    }
    for name, s in status["services"].items():
        assert s["up"], name
        assert s["pid"] == state[name]["pid"], name
        assert s["uptime_s"] > 0
        assert s["restarts"] == 0
    g, h = status["counters"]["gateway"], status["counters"]["hospital"]
    # every reading a device saw acknowledged was received, accepted, forwarded and stored
    assert g["accepted"] == g["forwarded"] == h["stored"] >= acked
    assert g["mqtt_connected"]
    assert g["hospital_connected"]
    assert g["rejected"] == {}
    human = pacegate("status", "--workdir", str(work.root), timeout=60)
    assert human.returncode == 0, human.stdout
    assert f"{h['stored']} stored" in human.stdout, human.stdout


@pytest.mark.integration
def test_corrupt_database_is_named_as_corruption_with_integrity_checks_answer(
    running_up: tuple[WorkLayout, int], tmp_path: Path
) -> None:
    import shutil

    work, _ = running_up
    # a copy of the stack's work directory, taken after the fleet: then damage one page
    copy = WorkLayout(tmp_path / "copy")
    shutil.copytree(work.root, copy.root, ignore=shutil.ignore_patterns(".pacegate.lock"))
    db = copy.hospital_dir / "readings.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row into the main file
    raw = bytearray(db.read_bytes())
    page = 4096
    raw[page : page + 64] = bytes((b * 7 + 13) & 0xFF for b in raw[page : page + 64])
    db.write_bytes(bytes(raw))
    proc = pacegate("hospital", "verify", "-c", str(copy.hospital_config), timeout=120)
    assert_one_clear_error(proc, str(db), "corrupt", "PRAGMA integrity_check says", "backup")
    assert "keyring does not belong" not in proc.stderr


@pytest.mark.integration
def test_status_of_a_stopped_stack_says_down_and_exits_1(tmp_path: Path) -> None:
    from console.stack import choose_endpoints
    from pacegate.pki import init_pki

    work = WorkLayout(tmp_path)
    init_pki(work.pki.root)
    choose_endpoints(prefer_defaults=False).write(work)
    proc = pacegate("status", "--workdir", str(tmp_path), "--json", "--wait", "1", timeout=60)
    assert proc.returncode == 1
    status = json.loads(proc.stdout)
    assert status["stack_pid"] is None
    assert not any(s["up"] for s in status["services"].values())


@pytest.mark.integration
def test_bad_time_flag_names_the_flag_not_a_placeholder_file(
    running_up: tuple[WorkLayout, int],
) -> None:
    work, _ = running_up
    proc = pacegate("analyze", "--workdir", str(work.root), "--since", "yesterday", timeout=60)
    err = assert_one_clear_error(proc, "--since: 'yesterday' is not an ISO 8601 timestamp", "fix:")
    assert "<config>" not in err

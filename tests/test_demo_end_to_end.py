"""The main job, run as a user runs it: ``pacegate demo``, ``pacegate up``, ``pacegate capture``.

Every part is real and started as its own process: the embedded broker with mTLS, the
gateway, the hospital with its SQLite store, the CKKS cloud worker, the simulated fleet.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from console.workdir import WorkLayout
from hospital.keyring import Keyring
from hospital.store import SqliteReadingStore
from pacegate.reading import Reading
from tests.support import run_pacegate

DEMO_DEVICES = 6
DEMO_DURATION = "4"
RUN_TIMEOUT = 420


def pacegate(
    *args: str, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return run_pacegate(*args, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[WorkLayout, dict[str, Any]]:
    work = WorkLayout(tmp_path_factory.mktemp("demo"))
    proc = pacegate(
        "--log-json",
        "demo",
        "--workdir",
        str(work.root),
        "--devices",
        str(DEMO_DEVICES),
        "--duration",
        DEMO_DURATION,
        "--rate",
        "2",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, json.loads(proc.stdout)


def stored_readings(work: WorkLayout) -> list[Reading]:
    store = SqliteReadingStore(
        work.hospital_dir / "readings.db", Keyring.load(work.hospital_dir / "keyring.json")
    )
    try:
        return [r for batch in store.iter_readings() for r in batch]
    finally:
        store.close()


@pytest.mark.integration
def test_demo_stores_every_sent_reading_exactly_once(
    demo_run: tuple[WorkLayout, dict[str, Any]],
) -> None:
    work, report = demo_run
    assert report["devices"] == DEMO_DEVICES
    assert report["sent"] > 0
    assert report["acknowledged"] == report["sent"]
    assert report["received"] == report["accepted"] == report["sent"]
    assert report["stored"] == report["sent"]
    assert report["lost"] == 0
    assert report["rejected"] == {}
    readings = stored_readings(work)
    assert len(readings) == report["sent"]
    assert len({(r.sensor_id, r.timestamp) for r in readings}) == len(readings)


@pytest.mark.integration
def test_demo_report_includes_the_validated_blind_analysis(
    demo_run: tuple[WorkLayout, dict[str, Any]],
) -> None:
    _, report = demo_run
    analysis = report["analysis"]
    assert analysis["ok"] is True
    assert analysis["count"] == report["stored"]
    mean = analysis["heart_rate_mean"]
    assert abs(mean["encrypted"] - mean["plaintext"]) == pytest.approx(mean["abs_error"])
    assert mean["abs_error"] <= 1e-3 * abs(mean["plaintext"])


@pytest.mark.integration
def test_no_file_in_the_work_directory_holds_a_reading_in_clear(
    demo_run: tuple[WorkLayout, dict[str, Any]],
) -> None:
    work, _ = demo_run
    readings = stored_readings(work)
    assert readings
    needles = {r.to_bytes() for r in readings}
    needles |= {json.dumps(r.to_json()).encode() for r in readings}
    needles |= {r.timestamp.isoformat().encode() for r in readings}
    needles |= {b"heart_rate_bpm"}
    offenders = []
    for path in work.root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        offenders += [f"{path}: {n[:40]!r}" for n in needles if n in data]
    assert offenders == []


@pytest.mark.integration
def test_service_logs_are_json_lines_and_hold_no_secret(
    demo_run: tuple[WorkLayout, dict[str, Any]],
) -> None:
    work, _ = demo_run
    secrets = [work.pki.device_psk(d).read_bytes() for d in ("pm-0001", "pm-0002")]
    needles = [s.hex().encode() for s in secrets] + [base64.b64encode(s) for s in secrets]
    needles.append(b"PRIVATE KEY")
    for service in ("broker", "gateway", "hospital", "cloud"):
        raw = (work.logs_dir / f"{service}.log").read_bytes()
        assert [n for n in needles if n in raw] == [], service
        lines = raw.decode().splitlines()
        assert lines, service
        for line in lines:
            record = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= record.keys()
            if record["logger"] == "pacegate.security":
                assert {"event", "component", "reason"} <= record.keys()


@pytest.mark.integration
def test_demo_secrets_are_private_files(demo_run: tuple[WorkLayout, dict[str, Any]]) -> None:
    work, _ = demo_run
    secrets = [
        work.pki.ca_key,
        work.pki.gateway_key,
        work.pki.psk_store_key,
        work.pki.device_psk("pm-0001"),
        work.pki.device_key("pm-0001"),
        work.pki.channel_key("hospital"),
        work.hospital_dir / "keyring.json",
    ]
    for path in secrets:
        assert path.stat().st_mode & 0o077 == 0, path


@pytest.mark.integration
def test_demo_rerun_in_the_same_workdir_keeps_counting_without_nonce_reuse(
    demo_run: tuple[WorkLayout, dict[str, Any]],
) -> None:
    work, first = demo_run
    proc = pacegate(
        "demo", "--workdir", str(work.root), "--devices", "2", "--duration", "2", "--json"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    second = json.loads(proc.stdout)
    assert second["stored"] == second["sent"] > 0
    assert second["rejected"] == {}  # a reused counter would be rejected as a replay
    assert len(stored_readings(work)) == first["stored"] + second["stored"]
    assert first["analysis_covers"].startswith("this run")
    assert second["analysis_covers"].startswith(
        f"the whole store: {first['stored'] + second['stored']} readings, of which "
        f"{second['stored']} were stored by this run"
    )


@pytest.mark.integration
def test_up_serves_until_sigterm_and_stops_every_service_it_started(tmp_path: Path) -> None:
    from pacegate.pki import init_pki

    work = WorkLayout(tmp_path)
    init_pki(work.pki.root)
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "console", "up", "--workdir", str(tmp_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and len(children) < 4:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            children = psutil.Process(proc.pid).children()
            time.sleep(0.2)
        assert len(children) == 4
        for cfg in ("broker.yaml", "gateway.yaml", "hospital.yaml", "cloud.yaml"):
            assert (tmp_path / cfg).exists()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.integration
def test_up_without_a_pki_says_how_to_create_one(tmp_path: Path) -> None:
    proc = pacegate("up", "--workdir", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "pacegate pki init" in proc.stderr


needs_capture = pytest.mark.skipif(
    shutil.which("dumpcap") is None or os.geteuid() != 0,
    reason="capturing on lo needs dumpcap (Debian tshark) and root; ./dev setup installs it",
)


@pytest.mark.integration
@pytest.mark.tshark
@needs_capture
def test_capture_around_a_demo_shows_tls_client_certs_and_sealed_payloads(tmp_path: Path) -> None:
    out = tmp_path / "demo.pcapng"
    proc = pacegate(
        "capture",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--duration",
        "4",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert report["tls_handshakes"] >= 1
    assert set(report["tls_versions"]) <= {"TLS 1.2", "TLS 1.3"}
    assert report["certificate_requests"] == report["tls_handshakes"]
    assert report["client_certificates"] >= report["tls_handshakes"]
    assert report["mqtt_publishes_decrypted"] > 0
    assert report["mqtt_payloads_sealed"] == report["mqtt_publishes_decrypted"]
    assert report["mqtt_payloads_opened_with_psk"] == report["mqtt_publishes_decrypted"]
    assert report["readings_searched"] > 0
    assert report["plaintext_findings"] == []
    assert report["pq_channel_bytes"] > 0
    assert out.exists()
    assert Path(report["keylog"]).exists()
    assert report["pcap_with_keys"]
    assert Path(report["pcap_with_keys"]).exists()

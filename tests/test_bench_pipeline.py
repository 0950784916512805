"""The end-to-end benchmark runs and reports what it promises (never its timings), and its
plaintext run replaces each crypto layer by an identity that carries the same bytes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.bench_pipeline import NullKeyring, latency_percentiles, null_open, null_seal
from pacegate.reading import Reading
from pacegate.sealed import SEALED_SIZE_V2, SealedReadingError, open_reading, seal_reading

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_pipeline.py"
READING = Reading(age=71, heart_rate_bpm=64, sensor_id=3, timestamp=datetime.now(UTC))
PSK = bytes(range(32))


def test_null_seal_carries_the_same_bytes_as_a_seal_and_opens_to_the_same_reading() -> None:
    sealed = seal_reading(PSK, "pm-0001", 9, READING, epoch=bytes(8))
    nulled = null_seal(PSK, "pm-0001", 9, READING)
    assert len(nulled) == len(sealed) == SEALED_SIZE_V2
    assert nulled[:17] == sealed[:17]  # same header: version, epoch and counter
    assert null_open(PSK, "pm-0001", nulled) == open_reading(PSK, "pm-0001", sealed)


def test_a_real_seal_is_not_mistaken_for_a_null_seal() -> None:
    # the plaintext gateway would otherwise count sealed readings as plaintext ones
    with pytest.raises(SealedReadingError):
        null_open(PSK, "pm-0001", seal_reading(PSK, "pm-0001", 9, READING, epoch=bytes(8)))


def test_null_keyring_stores_rows_in_clear_and_stays_idempotent(tmp_path: Path) -> None:
    from hospital.store import SqliteReadingStore
    from pacegate.ingest import IngestItem

    store = SqliteReadingStore(tmp_path / "db.sqlite", NullKeyring.create(tmp_path / "k.json"))
    try:
        items = [IngestItem("pm-0001", c, READING) for c in (1, 2, 3)]
        assert store.store_batch(items).stored == 3
        again = store.store_batch(items)
        assert (again.stored, again.duplicates) == (0, 3)
        assert store.count() == 3
    finally:
        store.close()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("db.sqlite*"))
    assert b'"heart_rate_bpm":64' in on_disk  # the identity keyring really stores clear rows


@pytest.mark.integration
def test_quick_bench_completes_and_reports_positive_consistent_figures(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("SSLKEYLOGFILE", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    t, h, c = r["throughput"], r["handshake"], r["cpu"]
    assert r["readings_per_repeat"] == r["devices"] * (r["readings_per_repeat"] // r["devices"])
    for key in ("secured", "plaintext"):
        runs = t[f"{key}_runs_readings_per_s"]
        assert len(runs) == r["repeats"]
        assert all(x > 0 for x in runs)
        assert t[f"{key}_readings_per_s"] in runs  # the median of the repeats
    ratio = t["secured_readings_per_s"] / t["plaintext_readings_per_s"]
    assert t["secured_over_plaintext"] == pytest.approx(ratio, abs=2e-3)
    pairs = [
        s / p
        for s, p in zip(
            t["secured_runs_readings_per_s"], t["plaintext_runs_readings_per_s"], strict=True
        )
    ]
    assert t["secured_over_plaintext_paired"] == pytest.approx(statistics.median(pairs), abs=2e-3)
    assert 1 <= t["readings_per_batch"] <= r["readings_per_repeat"]
    for name in ("pq_channel", "tls13_mtls", "tcp_connect"):
        assert h[name]["median_ms"] > 0
        assert h[name]["mean_ms"] > 0
    assert r["broker"] == "embedded"
    for key in ("latency_ms", "latency_ms_plaintext"):  # publish -> committed, steady load
        lat = r[key]
        assert lat["readings"] > 0
        assert lat["offered_readings_per_s"] > 0
        assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"]
    assert h["pq_over_tls13"] > 0
    sec = c["secured_cpu_s_per_1000_readings"]
    plain = c["plaintext_cpu_s_per_1000_readings"]
    assert set(sec) == set(plain) == {"broker", "gateway", "hospital", "devices"}
    assert all(v >= 0 for v in (*sec.values(), *plain.values()))
    assert sum(sec.values()) > 0
    assert sum(plain.values()) > 0
    assert all(v > 0 for v in c["op_costs_us"].values())
    assert set(c["crypto_share_op_count"]) == {"gateway", "hospital"}
    # no process the bench started outlives it (their configs live under tmp_path)
    assert _processes_mentioning(str(tmp_path)) == []


def _processes_mentioning(text: str) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if any(text in arg for arg in p.cmdline()):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def test_latency_is_read_from_the_published_and_stored_curves_in_order() -> None:
    published = [0.0, 0.1, 0.2, 0.3]
    stored = [(0.05, 0), (0.15, 2), (0.25, 2), (0.5, 4)]
    lat = latency_percentiles(published, stored)
    assert lat == pytest.approx([0.15, 0.05, 0.3, 0.2])  # k-th reading: first sample >= k
    assert latency_percentiles(published, [(0.15, 2)]) == pytest.approx([0.15, 0.05])


def test_plaintext_doubles_sit_behind_production_seams_without_monkeypatching() -> None:
    """The plaintext run is the production stack with seams overridden: the stack is
    ``pacegate up``'s own ``Stack`` (no second copy of start, readiness and stop), the gateway
    overrides ``_open_sealed`` and ``_secure`` only, and nothing reassigns another module's
    names at run time."""
    import ast

    from bench.bench_pipeline import PlainStack
    from console.stack import Stack
    from gateway.service import Gateway

    assert issubclass(PlainStack, Stack)
    assert set(vars(PlainStack)) - {"__module__", "__doc__", "__qualname__"} == {"service_argv"}
    tree = ast.parse(BENCH.read_text())
    imported = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    # an attribute assigned on an imported module or class, or through sys.modules
    rebinds = [
        ast.unparse(target)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute)
        and isinstance(target.value, ast.Name)
        and (target.value.id in imported or target.value.id == "module")
    ]
    setattrs = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"setattr", "delattr"}
    ]
    assert not setattrs
    assert not rebinds
    assert "sys.modules" not in BENCH.read_text()
    gateway_seams = {"_open_sealed", "_secure"}
    assert gateway_seams <= set(vars(Gateway))

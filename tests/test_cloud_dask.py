"""The cloud front worker's Dask backend: a real Dask cluster (scheduler and workers as
separate processes) over TLS on loopback, real TenSEAL, driven through the front worker's
session protocol exactly as the hospital drives it."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
from distributed import Client

from cloud.aggregator import InProcessAggregator, fold_batch
from cloud.dask_aggregator import (
    ChunkRefused,
    DaskBackend,
    DaskSettings,
    aggregate_chunk,
    cluster_security,
    held_contexts,
)
from cloud.worker import CloudSession, SessionState, WorkerStats
from console.dask_cluster import DaskCluster, start_cluster, worker_name
from pacegate import analytics_wire as wire
from pacegate import ckks
from pacegate.errors import ConfigError
from pacegate.layout import PkiLayout

BANDS = 1
LANES = wire.lanes(BANDS)
FloatArray = ckks.FloatArray


@pytest.fixture(scope="module")
def context() -> ts.Context:
    return ckks.create_context()


@pytest.fixture(scope="module")
def public_bytes(context: ts.Context) -> bytes:
    return ckks.public_context_bytes(context)


def make_batches(count: int, seed: int) -> list[list[FloatArray]]:
    """``count`` batches of plaintext lanes: heart rate, age, out-of-range, one band."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        hr = rng.integers(40, 180, ckks.SLOTS).astype(float)
        age = rng.integers(18, 90, ckks.SLOTS).astype(float)
        out.append([hr, age, (hr > 120).astype(float), np.ones(ckks.SLOTS)])
    return out


def encrypt(context: ts.Context, batches: list[list[FloatArray]]) -> list[list[bytes]]:
    return [[ckks.encrypt_vector(context, lane) for lane in batch] for batch in batches]


def plaintext_sums(batches: list[list[FloatArray]]) -> dict[str, FloatArray]:
    sums: dict[str, FloatArray] = {}
    for spec in wire.accumulator_plan(BANDS):
        total = np.zeros(ckks.SLOTS)
        for batch in batches:
            term = batch[spec.lane]
            total = total + (term if spec.other is None else term * batch[spec.other])
        sums[spec.name] = total
    return sums


def send_batches(session: CloudSession, public_bytes: bytes, cts: list[list[bytes]]) -> None:
    assert isinstance(
        wire.decode(session.handle(wire.encode(wire.Open(BANDS, public_bytes)))), wire.Ready
    )
    for b, batch in enumerate(cts):
        for lane, data in enumerate(batch):
            reply = wire.decode(session.handle(wire.encode(wire.Ciphertext(b, lane, data))))
            assert reply == wire.Ack(b, lane), reply


def fetch_all(session: CloudSession, context: ts.Context, batches: int) -> dict[str, FloatArray]:
    out: dict[str, FloatArray] = {}
    for spec in wire.accumulator_plan(BANDS):
        reply = wire.decode(session.handle(wire.encode(wire.Fetch(batches, spec.name))))
        assert isinstance(reply, wire.Result), reply
        assert reply.batches == batches
        out[spec.name] = ckks.decrypt_vector(context, reply.data, degree=spec.degree)
    return out


def assert_matches(got: dict[str, FloatArray], want: dict[str, FloatArray]) -> None:
    assert set(got) == set(want)
    for name in want:
        # CKKS noise is far below 1; one batch counted twice or missed is >= 1 per slot
        err = float(np.max(np.abs(got[name] - want[name])))
        assert err < 0.05, f"{name}: off by {err}"


# --- pure: the task function is the in-process arithmetic ---------------------------------


def test_dask_task_partials_add_up_to_the_in_process_fold(
    context: ts.Context, public_bytes: bytes
) -> None:
    plain = make_batches(4, seed=3)
    cts = encrypt(context, plain)
    plan = wire.accumulator_plan(BANDS)
    halves = [
        aggregate_chunk(public_bytes, plan, cts[:2]),
        aggregate_chunk(public_bytes, plan, cts[2:]),
    ]
    acc: dict[str, ts.CKKSVector] = {}
    pub = ckks.load_public_context(public_bytes)
    for half in halves:
        assert isinstance(half, dict)
        for spec in plan:
            vec = ckks.load_ciphertext(pub, half[spec.name], degree=spec.degree)
            if spec.name in acc:
                acc[spec.name].add_(vec)
            else:
                acc[spec.name] = vec
    whole: dict[str, ts.CKKSVector] = {}
    for batch in cts:
        fold_batch(whole, plan, [ckks.load_ciphertext(pub, d) for d in batch])
    for spec in plan:
        a = ckks.decrypt_vector(context, acc[spec.name].serialize(), degree=spec.degree)
        b = ckks.decrypt_vector(context, whole[spec.name].serialize(), degree=spec.degree)
        assert float(np.max(np.abs(a - b))) < 0.05


def test_fold_keeps_two_sums_of_one_lane_apart(context: ts.Context, public_bytes: bytes) -> None:
    # the first batch's lanes become the sums themselves (no copy): two sums of the same
    # lane must still not share one vector, or each add_ would count twice
    pub = ckks.load_public_context(public_bytes)
    plan = (wire.Accumulator("a", 0), wire.Accumulator("b", 0), wire.Accumulator("sq", 0, 0))
    acc: dict[str, ts.CKKSVector] = {}
    for values in ([1.0, 2.0], [10.0, 20.0], [100.0, 200.0]):
        fold_batch(acc, plan, [ckks.load_ciphertext(pub, ckks.encrypt_vector(context, values))])
    for name, want in (("a", [111.0, 222.0]), ("b", [111.0, 222.0]), ("sq", [10101.0, 40404.0])):
        degree = 2 if name == "sq" else 1
        got = ckks.decrypt_vector(context, acc[name].serialize(), degree=degree)[:2]
        assert np.allclose(got, want, atol=0.05), (name, got)


def test_dask_task_refuses_a_context_with_a_secret_key(context: ts.Context) -> None:
    secret = context.serialize(save_secret_key=True)
    cts = encrypt(context, make_batches(1, seed=4))
    got = aggregate_chunk(secret, wire.accumulator_plan(BANDS), cts)
    assert isinstance(got, ChunkRefused)
    assert got.reason == "secret_key_in_context"


def test_dask_task_refuses_a_mangled_ciphertext(context: ts.Context, public_bytes: bytes) -> None:
    cts = encrypt(context, make_batches(1, seed=5))
    bad = bytearray(cts[0][1])
    bad[10:60] = b"\xff" * 50
    cts[0][1] = bytes(bad)
    got = aggregate_chunk(public_bytes, wire.accumulator_plan(BANDS), cts)
    assert isinstance(got, ChunkRefused)
    assert got.reason == "bad_ciphertext"


def test_dask_settings_refuse_a_plain_tcp_scheduler(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls://"):
        DaskSettings(
            scheduler="tcp://127.0.0.1:8786",
            ca_file=tmp_path / "ca.crt",
            cert=tmp_path / "c.crt",
            key=tmp_path / "c.key",
        )


# --- a real cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    running = start_cluster(tmp_path_factory.mktemp("dask"), workers=2)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def backend(cluster: DaskCluster) -> Iterator[DaskBackend]:
    made = DaskBackend(
        DaskSettings(
            scheduler=cluster.address,
            ca_file=cluster.ca_file,
            cert=cluster.client_cert,
            key=cluster.client_key,
            batches_per_task=2,
        )
    )
    try:
        yield made
    finally:
        made.close()


def wait_for_scheduler_log(cluster: DaskCluster, text: str) -> None:
    """The scheduler logged the refusal, with its reason (the log is written as it goes)."""
    log = cluster.directory / "logs" / "dask-scheduler.log"
    deadline = time.monotonic() + 60
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{log}: no {text!r}"
        time.sleep(0.1)


@pytest.mark.integration
def test_cluster_listens_on_loopback_tls_only_and_keys_are_private(cluster: DaskCluster) -> None:
    assert cluster.address.startswith("tls://127.0.0.1:")
    for key in (cluster.directory / "pki").glob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key


@pytest.mark.integration
def test_dask_aggregate_decrypts_to_the_in_process_result_and_the_plaintext(
    context: ts.Context, public_bytes: bytes, backend: DaskBackend
) -> None:
    plain = make_batches(7, seed=1)  # 7 batches, 2 per task: 4 tasks, the last one short
    cts = encrypt(context, plain)
    local = CloudSession(aggregator=InProcessAggregator)
    send_batches(local, public_bytes, cts)
    local_sums = fetch_all(local, context, len(cts))
    spread = CloudSession(aggregator=backend)
    send_batches(spread, public_bytes, cts)
    dask_sums = fetch_all(spread, context, len(cts))
    assert_matches(dask_sums, local_sums)
    assert_matches(dask_sums, plaintext_sums(plain))


@pytest.mark.integration
def test_dask_workers_hold_only_the_public_context(
    context: ts.Context, public_bytes: bytes, backend: DaskBackend
) -> None:
    cts = encrypt(context, make_batches(4, seed=2))
    session = CloudSession(aggregator=backend)
    send_batches(session, public_bytes, cts)
    fetch_all(session, context, len(cts))
    held = backend.client.run(held_contexts)
    contexts = [ctx for per_worker in held.values() for ctx in per_worker]
    assert contexts, "no worker parsed a context"
    assert all(not c["is_private"] and not c["has_secret_key"] for c in contexts), held


@pytest.mark.integration
def test_secret_context_is_refused_before_any_task_reaches_the_cluster(
    context: ts.Context, backend: DaskBackend
) -> None:
    stats = WorkerStats()
    session = CloudSession(aggregator=backend, stats=stats)
    reply = wire.decode(
        session.handle(wire.encode(wire.Open(BANDS, context.serialize(save_secret_key=True))))
    )
    assert isinstance(reply, wire.Error)
    assert reply.code == "secret_key_in_context"
    assert session.state is SessionState.FAILED
    assert stats.refused["secret_key_in_context"] == 1
    # and a task handed a secret context anyway refuses it on the worker
    refused = backend.client.submit(
        aggregate_chunk,
        context.serialize(save_secret_key=True),
        wire.accumulator_plan(BANDS),
        encrypt(context, make_batches(1, seed=6)),
        pure=False,
    ).result(timeout=120)
    assert isinstance(refused, ChunkRefused)
    assert refused.reason == "secret_key_in_context"


@pytest.mark.integration
def test_worker_killed_mid_analysis_still_yields_the_plaintext_result(
    context: ts.Context, public_bytes: bytes, cluster: DaskCluster, backend: DaskBackend
) -> None:
    plain = make_batches(32, seed=7)  # 16 tasks of 2 batches
    cts = encrypt(context, plain)
    victim = worker_name(1)
    victim_address = next(
        addr
        for addr, info in backend.client.scheduler_info()["workers"].items()
        if info["name"] == victim
    )
    session = CloudSession(aggregator=backend)
    opened = wire.decode(session.handle(wire.encode(wire.Open(BANDS, public_bytes))))
    assert isinstance(opened, wire.Ready)
    killed_after: int | None = None
    try:
        for b, batch in enumerate(cts):
            for lane, data in enumerate(batch):
                reply = wire.decode(session.handle(wire.encode(wire.Ciphertext(b, lane, data))))
                assert reply == wire.Ack(b, lane), reply
            # SIGKILL the victim while the scheduler has a task running on it, with the
            # session half sent: its running task and the results it holds are lost
            if killed_after is None and backend.client.processing().get(victim_address):  # type: ignore[no-untyped-call]
                cluster.kill_worker(victim)
                killed_after = b + 1
        assert killed_after is not None, "the victim never ran a task while batches came in"
        assert killed_after < len(cts), "the kill came after the last batch"
        sums = fetch_all(session, context, len(cts))
        assert_matches(sums, plaintext_sums(plain))  # a double count would be >= 1 off
        assert session.state is SessionState.RECEIVING
        wait_for_scheduler_log(cluster, f"Remove worker addr: {victim_address}")
    finally:
        if cluster.workers[victim].poll() is not None:
            cluster.add_worker(victim)


@pytest.mark.integration
def test_client_without_a_certificate_is_refused_by_the_scheduler(cluster: DaskCluster) -> None:
    host, port = cluster.address.removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    ctx.check_hostname = False

    def speak_without_a_certificate() -> None:
        with (
            socket.create_connection((host, int(port)), timeout=30) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"\x00" * 8)
            # TLS 1.3 checks the client's certificate after the client's side of the
            # handshake: the refusal is the server's alert on the first read
            if not tls.recv(1):
                raise ConnectionResetError("closed by the scheduler")

    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        speak_without_a_certificate()
    wait_for_scheduler_log(cluster, "peer did not return a certificate")


@pytest.mark.integration
def test_device_certificate_from_the_device_ca_cannot_join_the_cluster(
    cluster: DaskCluster, pki: PkiLayout
) -> None:
    device = "pm-0001"
    security = cluster_security(cluster.ca_file, pki.device_cert(device), pki.device_key(device))
    with pytest.raises((OSError, TimeoutError)):
        Client(cluster.address, security=security, timeout=5, set_as_default=False)  # type: ignore[no-untyped-call]
    wait_for_scheduler_log(cluster, "certificate verify failed")


async def analyse_over_the_channel(
    tmp_path: Path, backend: DaskBackend, readings: int
) -> tuple[Any, WorkerStats]:
    """The hospital's real analysis (store, Fernet, CKKS, PQ channel) against a front
    worker that folds on the Dask cluster; readings in batches of 300."""
    from cloud.config import load_cloud_config
    from cloud.worker import start_worker
    from console.workdir import hospital_config_text
    from hospital.analysis.job import run_analysis_async
    from hospital.analysis.settings import AnalysisSettings
    from tests.test_analysis_channel import T0, fill_store, make_workdir

    work = make_workdir(tmp_path)
    stats = WorkerStats()
    server = await start_worker(
        load_cloud_config(work.cloud_config), stats=stats, aggregator=backend
    )
    port = server.sockets[0].getsockname()[1]
    work.hospital_config.write_text(
        hospital_config_text(work, port=0, metrics_port=0, cloud_port=port)
    )
    try:
        fill_store(work, readings)
        report = await run_analysis_async(
            work.hospital_config,
            since=T0,
            until=T0 + timedelta(minutes=readings),
            settings=AnalysisSettings(bands=(0, 50), batch_size=300),
        )
    finally:
        server.close()
        await server.wait_closed()
    return report, stats


@pytest.mark.integration
async def test_hospital_analysis_over_the_pq_channel_runs_on_the_dask_cluster(
    tmp_path: Path, backend: DaskBackend
) -> None:
    before = backend.stats.tasks_folded
    report, stats = await analyse_over_the_channel(tmp_path, backend, 1500)
    assert report.failures() == []  # the decrypted aggregates match the plaintext ones
    assert report.plain.n == 1500
    assert report.encrypted["count"] == pytest.approx(1500, abs=1e-3)
    assert stats.batches == 5
    assert not stats.refused
    assert backend.stats.tasks_folded - before == 3  # 5 batches, 2 per task: the cluster summed


@pytest.mark.integration
async def test_hospital_analysis_with_a_dask_worker_killed_mid_analysis_matches_plaintext(
    tmp_path: Path, cluster: DaskCluster, backend: DaskBackend
) -> None:
    victim = worker_name(2)
    address = next(
        addr
        for addr, info in backend.client.scheduler_info()["workers"].items()
        if info["name"] == victim
    )
    killed = threading.Event()
    done = threading.Event()
    folded_before = backend.stats.tasks_folded
    folded_at_kill: list[int] = []

    def kill_when_it_has_work() -> None:
        # a task running on it, or a result it holds that the front worker has not yet
        # collected: either is lost with it
        while not done.is_set():
            busy = backend.client.processing().get(address)  # type: ignore[no-untyped-call]
            held = backend.client.has_what().get(address)  # type: ignore[no-untyped-call]
            if busy or held:
                folded_at_kill.append(backend.stats.tasks_folded - folded_before)
                cluster.kill_worker(victim)
                killed.set()
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_when_it_has_work, daemon=True)
    killer.start()
    try:
        report, stats = await analyse_over_the_channel(tmp_path, backend, 6000)
    finally:
        done.set()
        killer.join(timeout=30)
        if cluster.workers[victim].poll() is not None:
            cluster.add_worker(victim)
    assert killed.is_set(), "the victim never had work while the analysis ran"
    # 20 batches, 2 per task: the kill came before the front worker had folded them all
    assert folded_at_kill[0] < 10 == backend.stats.tasks_folded - folded_before
    assert report.failures() == []  # every statistic matches the plaintext one
    assert report.plain.n == 6000
    assert report.encrypted["count"] == pytest.approx(6000, abs=1e-3)
    assert stats.batches == 20
    assert not stats.refused


@pytest.mark.integration
def test_tasks_stay_under_dasks_large_graph_size_whatever_the_band_count(
    context: ts.Context, public_bytes: bytes, backend: DaskBackend
) -> None:
    bands = wire.MAX_BANDS  # 19 lanes: ~5 MB a batch, so one batch per task
    rng = np.random.default_rng(9)
    plain = [[rng.integers(0, 2, ckks.SLOTS).astype(float) for _ in range(wire.lanes(bands))]]
    plain = plain * 3
    before = backend.stats.tasks_submitted
    session = CloudSession(aggregator=backend)
    assert isinstance(
        wire.decode(session.handle(wire.encode(wire.Open(bands, public_bytes)))), wire.Ready
    )
    for b, batch in enumerate(plain):
        for lane, values in enumerate(batch):
            data = ckks.encrypt_vector(context, values)
            reply = wire.decode(session.handle(wire.encode(wire.Ciphertext(b, lane, data))))
            assert reply == wire.Ack(b, lane)
    reply = wire.decode(session.handle(wire.encode(wire.Fetch(3, "band15_n"))))
    assert isinstance(reply, wire.Result), reply
    got = ckks.decrypt_vector(context, reply.data)
    assert float(np.max(np.abs(got - 3 * plain[0][wire.LANE_FIRST_BAND + 15]))) < 0.05
    # 3 tasks of one batch each, not one of 3 (~15 MB, over Dask's 10 MB warning, which
    # pytest turns into an error here)
    assert backend.stats.tasks_submitted - before == 3


@pytest.mark.integration
def test_unreachable_scheduler_is_an_error_naming_the_address_and_the_fix(
    cluster: DaskCluster,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once it is closed
    address = f"tls://127.0.0.1:{port}"
    settings = DaskSettings(
        scheduler=address,
        ca_file=cluster.ca_file,
        cert=cluster.client_cert,
        key=cluster.client_key,
        connect_timeout_s=3,
    )
    with pytest.raises(ConfigError, match=r"aggregator\.scheduler") as err:
        DaskBackend(settings)
    assert address in str(err.value)
    assert "console.dask_cluster" in str(err.value)


def test_missing_cluster_key_file_is_an_error_naming_the_file_and_the_key(
    tmp_path: Path,
) -> None:
    from pacegate.pki import issue_cluster_identities

    made = issue_cluster_identities(tmp_path, ["cloud-front"])
    cert, key = made["cloud-front"]
    key.unlink()
    with pytest.raises(ConfigError, match=r"aggregator\.key") as err:
        cluster_security(tmp_path / "ca.crt", cert, key)
    assert str(key) in str(err.value)


def test_cluster_identities_come_from_a_ca_of_their_own_with_server_and_client_usage(
    tmp_path: Path, pki: PkiLayout
) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from pacegate.pki import issue_cluster_identities

    made = issue_cluster_identities(tmp_path / "cluster", ["dask-scheduler", "dask-worker-1"])
    cluster_ca = x509.load_pem_x509_certificate((tmp_path / "cluster" / "ca.crt").read_bytes())
    device_ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert cluster_ca.subject != device_ca.subject
    assert cluster_ca.public_key() != device_ca.public_key()
    for cert_path, key_path in made.values():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(cluster_ca)
        with pytest.raises(ValueError, match="subject does not match"):
            cert.verify_directly_issued_by(device_ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert key_path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cluster" / "ca.key").stat().st_mode & 0o777 == 0o600
    # a second call reuses the CA: an added worker joins the same cluster
    again = issue_cluster_identities(tmp_path / "cluster", ["dask-worker-2"])
    cert = x509.load_pem_x509_certificate(again["dask-worker-2"][0].read_bytes())
    cert.verify_directly_issued_by(cluster_ca)


def test_cloud_yaml_aggregator_mistakes_name_the_key_and_the_fix(tmp_path: Path) -> None:
    from cloud.config import load_cloud_config
    from tests.test_analysis_channel import make_workdir

    work = make_workdir(tmp_path)
    base = work.cloud_config.read_text()
    cases = {
        "aggregator:\n  backend: spark\n": ("aggregator.backend", "in_process or dask"),
        "aggregator:\n  backend: dask\n  scheduler: tcp://127.0.0.1:8786\n": (
            "aggregator.scheduler",
            "tls://",
        ),
        "aggregator:\n  backend: dask\n  scheduler: tls://127.0.0.1:8786\n": (
            "aggregator.ca_file",
            "",
        ),
        "aggregator:\n  backend: in_process\n  scheduler: tls://x:1\n": ("scheduler", ""),
    }
    for extra, (key, fix) in cases.items():
        work.cloud_config.write_text(base + extra)
        with pytest.raises(ConfigError, match=key) as info:
            load_cloud_config(work.cloud_config)
        assert fix in str(info.value)
    work.cloud_config.write_text(base)
    assert load_cloud_config(work.cloud_config).dask is None  # the default: in this process


@pytest.mark.integration
async def test_cloud_yaml_backend_dask_makes_the_cloud_service_sum_on_the_cluster(
    tmp_path: Path, cluster: DaskCluster
) -> None:
    """`aggregator: {backend: dask, ...}` in cloud.yaml, read by the service's own
    `cloud.worker.run`, which connects to the cluster itself: the hospital's analysis over
    the PQ channel matches plaintext."""
    from cloud.config import load_cloud_config
    from cloud.worker import run
    from console.workdir import hospital_config_text
    from hospital.analysis.job import run_analysis_async
    from hospital.analysis.settings import AnalysisSettings
    from tests.support import free_port
    from tests.test_analysis_channel import T0, fill_store, make_workdir

    work = make_workdir(tmp_path)
    port = free_port()
    text = work.cloud_config.read_text()
    text = re.sub(r"(?m)^  port: \d+$", f"  port: {port}", text, count=1)
    work.cloud_config.write_text(
        text
        + "aggregator:\n  backend: dask\n"
        + f"  scheduler: {cluster.address}\n  ca_file: {cluster.ca_file}\n"
        + f"  cert: {cluster.client_cert}\n  key: {cluster.client_key}\n  batches_per_task: 2\n"
    )
    cfg = load_cloud_config(work.cloud_config)
    assert cfg.dask is not None
    assert cfg.dask.scheduler == cluster.address
    work.hospital_config.write_text(
        hospital_config_text(work, port=0, metrics_port=0, cloud_port=port)
    )
    fill_store(work, 1500)
    stop = asyncio.Event()
    service = asyncio.create_task(run(cfg, stop))
    try:
        from tests.support import wait_for_port

        await asyncio.to_thread(wait_for_port, "127.0.0.1", port)
        report = await run_analysis_async(
            work.hospital_config,
            since=T0,
            until=T0 + timedelta(minutes=1500),
            settings=AnalysisSettings(bands=(0, 50), batch_size=300),
        )
    finally:
        stop.set()
        await service
    assert report.failures() == []
    assert report.plain.n == 1500

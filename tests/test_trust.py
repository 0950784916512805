"""Trust material between nodes with no shared filesystem: an edge node installs a CRL or a
PSK store only if it is genuine and newer, and a revocation made at the CA's node closes the
device's sessions on every edge node that follows it."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509

from console.trust import READY_MARK, Follower, edge_node_files, provision_edge_node
from pacegate.keystore import PskStore, generation_path
from pacegate.layout import PkiLayout
from pacegate.pki import init_pki, revoke_device
from pacegate.trust import TrustUpdateRefused, judge_crl, judge_psk_store
from tests.support import embedded_broker, free_port, try_connect, wait_until

REPO = Path(__file__).resolve().parents[1]


def _trust_server(pki: PkiLayout, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`pacegate trust serve` for ``pki`` on loopback ``port``, its output in ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "console", "trust", "serve", "--dir", str(pki.root)),
                *("--listen", f"127.0.0.1:{port}"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def _ca(pki: PkiLayout) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())


def test_a_newer_crl_signed_by_the_ca_is_installed_and_an_older_one_refused(
    pki: PkiLayout,
) -> None:
    before = pki.crl.read_bytes()
    revoke_device(pki.root, "pm-0002")
    after = pki.crl.read_bytes()
    newer = judge_crl(before, after, _ca(pki))
    assert newer.install
    assert newer.version > judge_crl(None, before, _ca(pki)).version
    assert not judge_crl(after, after, _ca(pki)).install  # the same CRL: nothing to do
    with pytest.raises(TrustUpdateRefused) as refused:
        judge_crl(after, before, _ca(pki))  # replayed by whoever sits on the path
    assert refused.value.reason == "rolled_back"


def test_a_crl_of_another_ca_or_garbage_is_refused(pki: PkiLayout, tmp_path: Path) -> None:
    other = PkiLayout(tmp_path / "other")
    init_pki(other.root)
    with pytest.raises(TrustUpdateRefused) as refused:
        judge_crl(pki.crl.read_bytes(), other.crl.read_bytes(), _ca(pki))
    # both CAs may carry the same name: then the signature is what fails
    assert refused.value.reason in {"wrong_issuer", "bad_signature"}
    for garbage in (b"", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", b"\x00" * 64):
        with pytest.raises(TrustUpdateRefused) as refused:
            judge_crl(None, garbage, _ca(pki))
        assert refused.value.reason == "not_a_crl"


def test_edge_node_gets_no_ca_key_and_no_device_secret(pki: PkiLayout, tmp_path: Path) -> None:
    node = PkiLayout(tmp_path / "edge")
    written = provision_edge_node(pki, node)
    names = {p.relative_to(node.root).as_posix() for p in written}
    assert "ca.key" not in names
    assert not any(n.startswith("devices/") for n in names)
    assert {p.relative_to(pki.root).as_posix() for p in edge_node_files(pki)} == names
    for path in written:
        secret = path.suffix == ".key" or path.parent == node.keystore_dir
        assert (path.stat().st_mode & 0o777) == (0o600 if secret else 0o644), path


def test_a_newer_psk_store_is_installed_and_an_older_or_foreign_one_refused(
    pki: PkiLayout, tmp_path: Path
) -> None:
    node = PkiLayout(tmp_path / "edge")
    provision_edge_node(pki, node)
    old_store = pki.psk_store.read_bytes()
    revoke_device(pki.root, "pm-0002")
    new_store = pki.psk_store.read_bytes()
    verdict = judge_psk_store(new_store, node.psk_store, node.psk_store_key)
    assert verdict.install
    # what the follower does with it: the store, then its generation
    node.psk_store.write_bytes(new_store)
    generation_path(node.psk_store_key).write_text(f"{verdict.version}\n")
    assert PskStore.load(node.psk_store, node.psk_store_key).get("pm-0002").revoked  # type: ignore[union-attr]
    with pytest.raises(TrustUpdateRefused) as refused:
        judge_psk_store(old_store, node.psk_store, node.psk_store_key)
    assert refused.value.reason == "rolled_back"  # the older store would re-activate pm-0002
    other = PkiLayout(tmp_path / "other")
    init_pki(other.root)
    with pytest.raises(TrustUpdateRefused) as refused:
        judge_psk_store(other.psk_store.read_bytes(), node.psk_store, node.psk_store_key)
    assert refused.value.reason in {"bad_psk_store", "rolled_back"}


def _device_connects(edge: PkiLayout, host: str, port: int, master: PkiLayout) -> object:
    outcome, client = try_connect(
        host,
        port,
        ca=edge.ca_cert,
        cert=master.device_cert("pm-0002"),
        key=master.device_key("pm-0002"),
        client_id="pm-0002",
    )
    assert outcome.connected, outcome
    assert client is not None, outcome
    return client


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_revocation_reaches_every_edge_node_and_closes_the_device_wherever_it_is(
    pki: PkiLayout, tmp_path: Path
) -> None:
    """`pacegate trust serve` at the CA's node; two edge nodes with their own copies of the
    PKI (no shared file), each running the embedded broker and a follower; pm-0002 connected
    to both. `pacegate pki revoke` at the CA's node: both edge brokers close pm-0002's
    session, and both edge copies of the PSK store mark it revoked."""
    port = free_port()
    serve_log = tmp_path / "serve.log"
    server = _trust_server(pki, port, serve_log)
    nodes = [PkiLayout(tmp_path / f"edge-{i}") for i in (1, 2)]
    brokers = []
    clients = []
    stop = threading.Event()
    followers = []
    threads = []
    try:
        assert wait_until(lambda: READY_MARK in serve_log.read_text(), 30), serve_log.read_text()
        for i, node in enumerate(nodes, 1):
            provision_edge_node(pki, node)
            ctx = embedded_broker(node.root, tmp_path / f"broker-{i}")
            brokers.append((ctx, ctx.__enter__()))
            follower = Follower(f"http://127.0.0.1:{port}", node)
            followers.append(follower)
            thread = threading.Thread(target=follower.run, args=(stop, 0.5), daemon=True)
            thread.start()
            threads.append(thread)
        for node, (_ctx, handle) in zip(nodes, brokers, strict=True):
            clients.append(_device_connects(node, handle.host, handle.port, pki))
        assert all(not c.disconnected.is_set() for c in clients)  # type: ignore[attr-defined]
        revoke_device(pki.root, "pm-0002")
        for client in clients:
            assert wait_until(lambda c=client: c.disconnected.is_set(), 60), "still connected"  # type: ignore[attr-defined]
        for node, follower in zip(nodes, followers, strict=True):
            assert follower.stats.installed["crl"] >= 1
            assert wait_until(lambda n=node: _revoked_in_store(n), 30)
            assert not follower.stats.refused
            assert not (node.root / "ca.key").exists()
            assert PskStore.load(node.psk_store, node.psk_store_key).get("pm-0002") is not None
    finally:
        stop.set()
        for client in clients:
            client.close()  # type: ignore[attr-defined]
        for ctx, _handle in brokers:
            ctx.__exit__(None, None, None)
        server.terminate()
        server.wait(10)
        for thread in threads:
            thread.join(10)


def _revoked_in_store(node: PkiLayout) -> bool:
    key = PskStore.load(node.psk_store, node.psk_store_key).get("pm-0002")
    return key is not None and key.revoked


@pytest.mark.integration
def test_trust_server_serves_only_its_two_documents(pki: PkiLayout, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    port = free_port()
    log = tmp_path / "serve.log"
    server = _trust_server(pki, port, log)
    try:
        assert wait_until(lambda: READY_MARK in log.read_text(), 30), log.read_text()
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/crl.pem", timeout=5) as resp:  # noqa: S310
            assert resp.read() == pki.crl.read_bytes()
        for path in ("/ca.key", "/../ca.key", "/registry.json", "/"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=5)  # noqa: S310
            assert err.value.code == 404
            err.value.close()
    finally:
        server.terminate()
        server.wait(10)

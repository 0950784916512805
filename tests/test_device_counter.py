"""The device's nonce counter: never repeats, across restarts and crashes; damage is loud."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from device_sim.counter import CounterStore
from pacegate import counterfile
from pacegate.errors import ConfigError


def _enrolled(tmp_path: Path, device_id: str = "pm-0001") -> Path:
    """The counter file as enrolment writes it (ceiling 0: the first counter is 1)."""
    path = tmp_path / "counter.state"
    counterfile.write(path, device_id, counterfile.first_ceiling(0))
    return path


def test_counters_strictly_increase_from_one(tmp_path: Path) -> None:
    store = CounterStore(_enrolled(tmp_path), "pm-0001", block=4)
    assert [store.next() for _ in range(10)] == list(range(1, 11))


def test_ceiling_is_persisted_before_a_counter_of_its_block_is_used(tmp_path: Path) -> None:
    path = _enrolled(tmp_path)
    store = CounterStore(path, "pm-0001", block=8)
    for _ in range(9):
        c = store.next()
        # what a crash right now would leave on disk must cover every counter used
        assert CounterStore(path, "pm-0001", block=8).ceiling >= c


def test_restart_resumes_above_every_counter_used(tmp_path: Path) -> None:
    path = _enrolled(tmp_path)
    first = CounterStore(path, "pm-0001", block=16)
    used = [first.next() for _ in range(5)]
    second = CounterStore(path, "pm-0001", block=16)  # "crash": first is never closed
    assert second.next() > max(used)
    assert second.last == 17  # the rest of the first block (6..16) is skipped, never reused


def test_file_is_private(tmp_path: Path) -> None:
    path = _enrolled(tmp_path)
    CounterStore(path, "pm-0001").next()
    assert path.stat().st_mode & 0o777 == 0o600


def test_reservation_is_one_write_per_block(tmp_path: Path) -> None:
    store = CounterStore(_enrolled(tmp_path), "pm-0001", block=100)
    for _ in range(250):
        store.next()
    assert store.reservations == 3


def test_damaged_counter_file_is_refused_and_the_only_fix_offered_is_rekeying(
    tmp_path: Path,
) -> None:
    path = _enrolled(tmp_path)
    CounterStore(path, "pm-0001").next()
    path.write_text(path.read_text().replace("1024", "1025"))
    with pytest.raises(ConfigError, match="checksum") as err:
        CounterStore(path, "pm-0001")
    assert "pacegate pki rekey-device pm-0001 --dir" in str(err.value)
    assert "backup" not in str(err.value)  # a backup holds an older, lower ceiling
    assert str(path) in str(err.value)


def test_missing_counter_file_is_fatal_never_a_restart_at_one(tmp_path: Path) -> None:
    path = tmp_path / "counter.state"
    with pytest.raises(ConfigError, match="counter file not found") as err:
        CounterStore(path, "pm-0001")
    assert "pacegate pki rekey-device pm-0001" in str(err.value)
    assert not path.exists()  # nothing was created behind the operator's back


def test_counter_file_copied_from_another_device_is_refused(tmp_path: Path) -> None:
    path = _enrolled(tmp_path)
    CounterStore(path, "pm-0001").next()
    with pytest.raises(ConfigError, match="belongs to 'pm-0001'"):
        CounterStore(path, "pm-0002")


def test_garbage_counter_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "counter.state"
    path.write_bytes(b"\xff\x00 not a counter")
    with pytest.raises(ConfigError):
        CounterStore(path, "pm-0001")


_CHILD = """
import sys
from pathlib import Path
from device_sim.counter import CounterStore
store = CounterStore(Path(sys.argv[1]), "pm-0001", block=7)
while True:
    print(store.next(), flush=True)
"""


@pytest.mark.integration
def test_process_killed_mid_block_never_reuses_a_counter(tmp_path: Path) -> None:
    path = _enrolled(tmp_path)
    seen: list[int] = []
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            assert proc.stdout is not None
            run = [int(proc.stdout.readline()) for _ in range(50)]
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        seen.extend(run)
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen)


# -- the whole device: deleted, corrupted and rolled-back counter files ---------------------
def _boot_and_seal(pki_dir: Path, device_id: str, readings: int) -> list[bytes]:
    """One device boot as the fleet does it (bundle, counter file, a SimulatedDevice), taking
    ``readings`` readings; returns the sealed payloads it queued."""
    import asyncio
    import random
    from datetime import UTC, datetime

    from device_sim.device import Backoff, Endpoint, SimulatedDevice
    from device_sim.fleet import load_bundle
    from device_sim.model import HeartModel
    from pacegate.layout import PkiLayout
    from pacegate.tlsconf import client_context

    pki = PkiLayout(pki_dir)
    bundle = load_bundle(pki, device_id)
    store = CounterStore(pki.device_counter(device_id), device_id, block=8)
    device = SimulatedDevice(
        device_id=device_id,
        psk=bundle.psk,
        ssl_context=client_context(pki.ca_cert, bundle.cert, bundle.key),
        endpoints=[Endpoint("127.0.0.1", 1)],
        counter=store,
        model=HeartModel(device_id, seed=1),
        connect_gate=asyncio.Semaphore(1),
        backoff=Backoff(random.Random(1)),
    )
    for _ in range(readings):
        device.take_reading(1.0, datetime.now(UTC))
    return [item.payload for item in device._pending]


def test_deleted_corrupted_and_rolled_back_counter_files_never_repeat_a_key_and_nonce(
    tmp_path: Path,
) -> None:
    from pacegate.layout import PkiLayout
    from pacegate.pki import enroll_device, init_pki, rekey_device
    from pacegate.sealed import epoch_key, open_reading, parse_header

    did = "pm-0001"
    layout = init_pki(tmp_path / "pki")
    enroll_device(layout.root, did)
    state = PkiLayout(layout.root).device_counter(did)
    assert state.exists()  # written at enrolment, not by the device
    used: list[tuple[bytes, bytes]] = []  # (AEAD key, nonce) of every reading sealed
    counters: list[int] = []

    def boot(readings: int) -> None:
        psk = PkiLayout(layout.root).device_psk(did).read_bytes()
        for payload in _boot_and_seal(layout.root, did, readings):
            header = parse_header(payload)
            assert header.version == 2
            assert header.epoch is not None
            assert open_reading(psk, did, payload)[0] == header.counter  # the gateway opens it
            key = epoch_key(psk, did, header.epoch)
            used.append((key, bytes([2, 0, 0, 0]) + header.counter.to_bytes(8, "big")))
            counters.append(header.counter)

    boot(5)
    old_copy = state.read_bytes()  # an operator's "backup"
    boot(20)
    # deleted: fatal, with the re-key as the fix
    state.unlink()
    with pytest.raises(ConfigError, match="counter file not found") as err:
        _boot_and_seal(layout.root, did, 1)
    assert f"pacegate pki rekey-device {did}" in str(err.value)
    # corrupted: fatal, same fix
    state.write_bytes(old_copy.replace(b"pacegate-counter v1", b"pacegate-counter v1 "))
    with pytest.raises(ConfigError, match=r"rekey-device"):
        _boot_and_seal(layout.root, did, 1)
    # an old copy restored: the device cannot tell, its counters go back...
    state.write_bytes(old_copy)
    boot(20)
    assert len(set(counters)) < len(counters)  # the rollback really repeated counters
    # ...and the re-key (the recovery offered) starts a new key above every old counter
    before = PkiLayout(layout.root).device_psk(did).read_bytes()
    rekey_device(layout.root, did)
    assert PkiLayout(layout.root).device_psk(did).read_bytes() != before
    boot(10)
    assert min(counters[-10:]) > max(counters[:-10])
    # no (key, nonce) pair was ever used twice, across every boot
    assert len(used) == 55
    assert len(set(used)) == len(used)

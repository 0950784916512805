"""The device's nonce counter: never repeats, across restarts and crashes; damage is loud."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from device_sim.counter import CounterStore
from pacegate.errors import ConfigError


def test_counters_strictly_increase_from_one(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "counter.state", "pm-0001", block=4)
    assert [store.next() for _ in range(10)] == list(range(1, 11))


def test_ceiling_is_persisted_before_a_counter_of_its_block_is_used(tmp_path: Path) -> None:
    path = tmp_path / "counter.state"
    store = CounterStore(path, "pm-0001", block=8)
    for _ in range(9):
        c = store.next()
        # what a crash right now would leave on disk must cover every counter used
        assert CounterStore(path, "pm-0001", block=8).ceiling >= c


def test_restart_resumes_above_every_counter_used(tmp_path: Path) -> None:
    path = tmp_path / "counter.state"
    first = CounterStore(path, "pm-0001", block=16)
    used = [first.next() for _ in range(5)]
    second = CounterStore(path, "pm-0001", block=16)  # "crash": first is never closed
    assert second.next() > max(used)
    assert second.last == 17  # the rest of the first block (6..16) is skipped, never reused


def test_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "counter.state"
    CounterStore(path, "pm-0001").next()
    assert path.stat().st_mode & 0o777 == 0o600


def test_reservation_is_one_write_per_block(tmp_path: Path) -> None:
    store = CounterStore(tmp_path / "counter.state", "pm-0001", block=100)
    for _ in range(250):
        store.next()
    assert store.reservations == 3


def test_damaged_counter_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "counter.state"
    CounterStore(path, "pm-0001").next()
    path.write_text(path.read_text().replace("1024", "1025"))
    with pytest.raises(ConfigError, match="checksum") as err:
        CounterStore(path, "pm-0001")
    assert "never reset a counter" in str(err.value)
    assert str(path) in str(err.value)


def test_counter_file_copied_from_another_device_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "counter.state"
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


def test_process_killed_mid_block_never_reuses_a_counter(tmp_path: Path) -> None:
    path = tmp_path / "counter.state"
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

"""The one file watcher behind every live reload (pacegate.filewatch), on a real file system."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pacegate.filewatch import RACY_RECHECK_S, RACY_WINDOW_S, FileWatch, ticks


def _changes(watch: FileWatch, looks: int = 3) -> int:
    return sum(watch.changed() for _ in range(looks))


def test_a_rewrite_in_place_is_seen_once(tmp_path: Path) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(b"one")
    watch = FileWatch(path)
    ino = path.stat().st_ino
    with path.open("r+b") as f:  # same inode, new content and size
        f.write(b"second")
    assert path.stat().st_ino == ino
    assert _changes(watch) == 1


def test_a_same_size_rewrite_with_its_mtime_set_back_is_seen_once(tmp_path: Path) -> None:
    """How an older file is put back (cp -p, tar x): only ctime tells."""
    path = tmp_path / "psk-store.json"
    path.write_bytes(b"newer")
    old = path.stat()
    watch = FileWatch(path, wall_clock=lambda: old.st_mtime + RACY_WINDOW_S + 1)  # not racy
    path.write_bytes(b"older")
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert _changes(watch) == 1


def test_an_atomic_replace_is_seen_once(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(b"one")
    watch = FileWatch(path)
    tmp = tmp_path / "keyring.json.tmp"
    tmp.write_bytes(b"two")
    os.replace(tmp, path)
    assert _changes(watch) == 1


def test_a_delete_and_re_create_is_seen_once_and_a_missing_file_is_no_change(
    tmp_path: Path,
) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(b"one")
    watch = FileWatch(path)
    path.unlink()
    assert _changes(watch) == 0
    assert watch.missing
    path.write_bytes(b"two")
    assert _changes(watch) == 1
    assert not watch.missing


def test_a_file_that_appears_later_is_one_change(tmp_path: Path) -> None:
    path = tmp_path / "late.pem"
    watch = FileWatch(path)
    assert watch.stamp is None
    assert not watch.changed()
    path.write_bytes(b"here")
    assert _changes(watch) == 1


class _CoarseClock:
    """A file system whose timestamps all fall in one tick: stat reports a fixed mtime and
    ctime (the real inode and size), as two writes within one jiffy (or one FAT 2 s) do."""

    def __init__(self, tick: float) -> None:
        self.tick_ns = int(tick * 1e9)
        self.now = tick

    def stat(self, path: Path) -> os.stat_result:
        st = os.stat(path)
        fields = list(st)
        fields[8] = fields[9] = int(self.tick_ns // 10**9)  # st_mtime, st_ctime (seconds)
        result = os.stat_result(fields, {"st_mtime_ns": self.tick_ns, "st_ctime_ns": self.tick_ns})
        return result


def test_a_same_size_rewrite_within_one_timestamp_tick_is_seen_once(tmp_path: Path) -> None:
    path = tmp_path / "psk-store.json"
    path.write_bytes(b"AAAA")
    fs = _CoarseClock(1_000_000.0)
    watch = FileWatch(path, stat=fs.stat, wall_clock=lambda: fs.now)
    with path.open("r+b") as f:
        f.write(b"BBBB")  # same inode, same size, same tick: an identical stamp
    assert watch.stamp == FileWatch(path, stat=fs.stat, wall_clock=lambda: fs.now).stamp
    fs.now += 2 * RACY_RECHECK_S  # (float: exactly one interval may fall a hair short)
    assert _changes(watch) == 1
    # a last same-tick write just before the stamp settles is caught by the settling look
    with path.open("r+b") as f:
        f.write(b"CCCC")
    fs.now += RACY_WINDOW_S
    assert _changes(watch) == 1
    # settled: the stamp alone decides, the content is not read again (a real write now
    # gets a newer tick; this fake file system keeps the old one, so only a read would tell)
    with path.open("r+b") as f:
        f.write(b"DDDD")
    assert _changes(watch) == 0


def test_a_racy_stamp_is_reread_at_most_every_recheck_interval(tmp_path: Path) -> None:
    path = tmp_path / "psk-store.json"
    path.write_bytes(b"AAAA")
    fs = _CoarseClock(1_000_000.0)
    watch = FileWatch(path, stat=fs.stat, wall_clock=lambda: fs.now)
    path.write_bytes(b"BBBB")
    assert _changes(watch, looks=50) == 0  # within one recheck interval: not read again
    fs.now += 2 * RACY_RECHECK_S  # (float: exactly one interval may fall a hair short)
    assert _changes(watch) == 1


def test_a_file_the_reader_refused_is_reported_again_after_retry(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(b"one")
    watch = FileWatch(path)
    path.write_bytes(b"half-written")
    assert watch.changed()
    watch.retry()
    assert watch.changed()
    assert not watch.changed()


def test_reset_takes_our_own_write_as_seen(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(b"one")
    watch = FileWatch(path)
    path.write_bytes(b"ours, saved")
    watch.reset()
    assert _changes(watch) == 0


def test_ticks_end_when_stop_is_set_and_refuse_a_zero_interval() -> None:
    async def main() -> int:
        stop = asyncio.Event()
        n = 0
        async for _ in ticks(0.01, stop):
            n += 1
            if n == 3:
                stop.set()
        return n

    async def first_of_zero() -> None:
        async for _ in ticks(0):
            pass

    assert asyncio.run(main()) == 3
    with pytest.raises(ValueError, match="interval"):
        asyncio.run(first_of_zero())

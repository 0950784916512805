"""Has a file changed since it was last looked at: the one answer behind every live reload
(the broker's CRL, the gateway's PSK store and gateway.yaml, the hospital's keyring).

A file is looked at with one ``stat``; it counts as changed when any of these differs:

- ``st_ino``: an atomic replace (write a temporary file, ``rename`` it over) makes a new
  inode, even with the same size and a copied mtime;
- ``st_size`` and ``st_mtime_ns``: a rewrite in place;
- ``st_ctime_ns``: a rewrite in place whose mtime was set back (``cp -p``, ``tar x``,
  ``touch -d`` or ``os.utime`` onto the existing file). That is how an *older* file is put
  back, e.g. a PSK store from a backup that still lists revoked devices, often with the same
  size; the kernel sets ctime to the present on every write and every ``utime``, and nothing
  short of changing the clock sets it back.

ctime does not help with a second rewrite within the same timestamp tick: mtime and ctime
come from the same coarse kernel clock (updated once a jiffy, a few ms; 1 s on ext3 or HFS+,
2 s on FAT), so two same-size writes in one tick leave identical stamps (the kernel's
Documentation/filesystems/multigrain-ts.rst: "any change that happens within that jiffy will
end up with the same timestamp"). Since Linux 6.13 ("multigrain timestamps", on ext4, xfs,
btrfs and tmpfs) a file whose timestamps were just read by a ``stat`` gets a fine-grained
stamp at its next change, which closes the gap there (measured on 6.18/ext4: 0 of 2,000
same-size rewrites between two stats left an identical stamp); Debian 12's 6.1, FAT and
NFS do not have it.

So, as for git's "racily clean" index entries, a stamp taken less than :data:`RACY_WINDOW_S`
after the file's last change is not trusted alone: the watcher also keeps a digest of the
content, and while the stamp stays racy, an equal stamp is confirmed by reading the file
again (at most every :data:`RACY_RECHECK_S`). Once the stamp is older than the window, any
later write gets a newer tick, and the stamp alone decides.

A missing file is not a change: a reader keeps what it holds (mid-replace the path can be
absent for a moment, and a deleted CRL must not un-revoke anything), and when the file is
back, with a new stamp, that is one change. So a rewrite in place, an atomic replace, and a
delete followed by a re-create are each seen once.

:class:`FileWatch` is synchronous and cheap (one ``stat`` a call); the clock and ``stat``
are injectable. :func:`ticks` is the one polling loop the services run it in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# The coarsest timestamp granularity of a Linux file system pacegate may run on (FAT's 2 s;
# ext3 and HFS+ have 1 s, ext4/xfs/tmpfs a jiffy): a stamp younger than this could be shared
# by a later same-size write.
RACY_WINDOW_S: Final = 2.0
# While a stamp is racy, its content is re-read at most this often: the gateway looks at the
# PSK store on every message from an unknown device id, and a flood of those must not turn
# into a file read each.
RACY_RECHECK_S: Final = 0.2
# A racy file larger than this is not digested (every file watched here is a few KB to a
# few MB): its stamp alone decides, as before the racy check existed.
MAX_DIGEST_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True)
class FileStamp:
    """What a ``stat`` says about a file's identity and last change."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def changed_ns(self) -> int:
        return max(self.mtime_ns, self.ctime_ns)


class FileWatch:
    """Answers :meth:`changed` for one path; the first look happens at construction."""

    def __init__(
        self,
        path: os.PathLike[str] | str,
        *,
        stat: Callable[[Path], os.stat_result] = os.stat,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._stat = stat
        self._wall_clock = wall_clock
        self._stamp: FileStamp | None = None
        self._digest: bytes | None = None  # kept while the stamp is racy
        self._digest_checked = 0.0
        self.missing = False  # the last look found no file (the previous stamp is kept)
        self.reset()

    @property
    def stamp(self) -> FileStamp | None:
        """The stamp last seen (None: the file has never been seen)."""
        return self._stamp

    def reset(self) -> None:
        """Take the file as it is now as seen (after writing it ourselves, or loading it)."""
        stamp = self._look()
        if stamp is not None:
            self._remember(stamp)

    def retry(self) -> None:
        """The reader could not use what it saw (a half-written or refused file): report
        the file as changed again at the next look, until a load succeeds."""
        self._stamp = None
        self._digest = None

    def changed(self) -> bool:
        """True once for each change since the last look; False while the file is missing."""
        stamp = self._look()
        if stamp is None:
            return False
        if stamp != self._stamp:
            self._remember(stamp)
            return True
        if self._digest is None:
            return False
        now = self._wall_clock()
        if now - stamp.changed_ns / 1e9 >= RACY_WINDOW_S:
            # settled: any later write has a newer tick; one last comparison covers a
            # write that landed since the previous one
            digest = self._read_digest()
            held, self._digest = self._digest, None
            return digest is not None and digest != held
        if now - self._digest_checked < RACY_RECHECK_S:
            return False
        digest = self._read_digest()
        self._digest_checked = now
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        return True

    # -- internals ---------------------------------------------------------------------
    def _look(self) -> FileStamp | None:
        try:
            stamp = FileStamp.of(self._stat(self.path))
        except FileNotFoundError:
            self.missing = True
            return None
        except OSError:
            return None  # unreadable directory, etc.: the reader's load reports it
        self.missing = False
        return stamp

    def _remember(self, stamp: FileStamp) -> None:
        self._stamp = stamp
        now = self._wall_clock()
        if now - stamp.changed_ns / 1e9 < RACY_WINDOW_S and stamp.size <= MAX_DIGEST_BYTES:
            self._digest = self._read_digest()
            self._digest_checked = now
        else:
            self._digest = None

    def _read_digest(self) -> bytes | None:
        with contextlib.suppress(OSError):
            return hashlib.sha256(self.path.read_bytes()).digest()
        return None


async def ticks(interval: float, stop: asyncio.Event | None = None) -> AsyncIterator[None]:
    """Yield every ``interval`` seconds until ``stop`` is set (forever without one)."""
    if not interval > 0:
        raise ValueError(f"a polling interval must be > 0 seconds, got {interval!r}")
    while stop is None or not stop.is_set():
        if stop is None:
            await asyncio.sleep(interval)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
        yield

"""The one way pacegate reads a secret file (a private key, a PSK, a store or spool key, the
hospital's keyring): :func:`read_secret`.

The writers are :func:`pacegate.layout.write_secret` (mode 0600 from the first byte). A
secret another local user may read or replace is refused, not merely warned about: a key
that others can read is already disclosed, and one they can write is theirs. Every refusal
is a :class:`~pacegate.errors.ConfigError` that names the file and the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pacegate.errors import ConfigError
from pacegate.layout import SECRET_FILE_MODE

# No secret pacegate writes comes near this (the keyring, the largest, holds a few keys per
# rotation); a bound stops a wrong path (a database, a device node) being read into memory.
MAX_SECRET_FILE_BYTES = 1 << 20


def read_secret(
    path: str | Path,
    what: str,
    *,
    missing_fix: str,
    key: str = "",
    max_bytes: int = MAX_SECRET_FILE_BYTES,
) -> bytes:
    """The bytes of the secret file ``path`` (``what`` names it in errors, ``key`` is the
    config key that pointed at it, if any).

    Refused, each with the file and the fix: a missing file (``missing_fix``), a mode wider
    than 0600 (any group or other bit, or the owner's execute bit), anything but a regular
    file, a file larger than ``max_bytes``, and an unreadable one."""
    data, _ = read_secret_and_stat(
        path, what, missing_fix=missing_fix, key=key, max_bytes=max_bytes
    )
    return data


def read_secret_and_stat(
    path: str | Path,
    what: str,
    *,
    missing_fix: str,
    key: str = "",
    max_bytes: int = MAX_SECRET_FILE_BYTES,
) -> tuple[bytes, os.stat_result]:
    """:func:`read_secret`, and the ``stat`` of the file it read (to notice a later change).

    The checks run on the opened descriptor, so the file judged is the file read."""
    p = Path(path)
    try:
        # O_NONBLOCK: a FIFO put in a key's place must not hang the service at open
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(p, key, f"{what} not found", fix=missing_fix) from None
    except OSError as exc:
        raise ConfigError(
            p, key, f"cannot read the {what}: {exc.strerror}", fix="check the path and its owner"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(p, key, f"the {what} is not a regular file", fix="check the path")
        mode = stat.S_IMODE(st.st_mode)
        if mode & ~SECRET_FILE_MODE:
            raise ConfigError(
                p,
                key,
                f"mode {mode:04o} lets other users read or change the {what} "
                f"(a secret is {SECRET_FILE_MODE:04o} at most)",
                fix=f"chmod 600 {p}",
            )
        if st.st_size > max_bytes:
            raise ConfigError(
                p, key, f"the {what} is larger than {max_bytes} bytes", fix="check the path"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(
            p, key, f"cannot read the {what}: {exc.strerror}", fix="check the path and its owner"
        ) from None
    finally:
        os.close(fd)
    if size > max_bytes:  # it grew after the fstat
        raise ConfigError(
            p, key, f"the {what} is larger than {max_bytes} bytes", fix="check the path"
        )
    return b"".join(chunks), st

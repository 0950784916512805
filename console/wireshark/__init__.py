"""pacegate's Wireshark dissectors (Lua, shipped as package data) and where Wireshark finds them.

- ``pacegate_sealed.lua``: the sealed reading inside MQTT PUBLISH (``pacegate.sealed.*``).
- ``pacegate_channel.lua``: the post-quantum channel on its TCP ports (``pacegate.channel.*``).

``pacegate wireshark install`` copies both into the personal Lua plugins folder that tshark
reports (``tshark -G folders``: "Personal Lua Plugins", ``~/.local/lib/wireshark/plugins`` on
Wireshark 4.0; Lua plugins are not version-specific, unlike the C plugins' ``.../plugins/4.0``).
:func:`tshark_lua_args` gives the ``-X lua_script:`` options that load them without installing,
as ``pacegate capture`` does. docs/wireshark.md lists the fields and filters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from pacegate.errors import PacegateError

LUA_FILES = ("pacegate_sealed.lua", "pacegate_channel.lua")
PLUGIN_FILE_MODE = 0o644  # dissectors are code Wireshark runs, not secrets: readable, not writable
TSHARK_FOLDERS_TIMEOUT_S = 60.0  # `tshark -G folders` loads every dissector: seconds, not minutes
_PERSONAL_LUA = "Personal Lua Plugins:"
# Wireshark's own default when tshark cannot be asked (wsutil/filesystem.c, 4.0).
FALLBACK_PLUGINS_DIR = Path("~/.local/lib/wireshark/plugins")


class WiresharkError(PacegateError):
    """tshark is missing or a dissector could not be installed."""


def lua_dir() -> Path:
    """The folder holding the shipped Lua files (inside the installed package)."""
    return Path(str(resources.files(__name__)))


def lua_paths() -> list[Path]:
    base = lua_dir()
    return [base / name for name in LUA_FILES]


def tshark_lua_args() -> list[str]:
    """tshark options that load pacegate's dissectors from the package."""
    out: list[str] = []
    for path in lua_paths():
        out += ["-X", f"lua_script:{path}"]
    return out


def _ask_tshark(exe: str, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            [exe, *args],
            capture_output=True,
            text=True,
            timeout=TSHARK_FOLDERS_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def personal_lua_plugins_dir(tshark: str | None = None) -> Path:
    """Where this machine's Wireshark looks for personal Lua plugins (asked of tshark)."""
    exe = tshark or shutil.which("tshark")
    out = _ask_tshark(exe, "-G", "folders") if exe is not None else None
    for line in (out or "").splitlines():
        if line.startswith(_PERSONAL_LUA):
            return Path(line[len(_PERSONAL_LUA) :].strip())
    return FALLBACK_PLUGINS_DIR.expanduser()


def install_warnings(tshark: str | None = None) -> list[str]:
    """What may stop Wireshark from loading the installed dissectors."""
    exe = tshark or shutil.which("tshark")
    if exe is None:
        return [
            "tshark not found: installed in Wireshark's default folder "
            f"{FALLBACK_PLUGINS_DIR}; install Debian's 'tshark' package to check it"
        ]
    version = _ask_tshark(exe, "-v") or ""
    if "without Lua" in version:
        return ["this Wireshark was built without Lua: it cannot load the dissectors"]
    return []


def install(target: Path) -> list[Path]:
    """Copy the Lua dissectors into ``target`` (created if needed); return the files written."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WiresharkError(
            f"cannot create {target}: {exc.strerror} (fix: choose another folder with --dir)"
        ) from None
    written = []
    for src in lua_paths():
        dest = target / src.name
        try:
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(src, tmp)
            tmp.chmod(PLUGIN_FILE_MODE)
            os.replace(tmp, dest)  # Wireshark never sees half a file
        except OSError as exc:
            raise WiresharkError(
                f"cannot write {dest}: {exc.strerror} (fix: check the folder's permissions "
                "or choose another with --dir)"
            ) from None
        written.append(dest)
    return written


def cli_install(args: argparse.Namespace) -> int:
    """``pacegate wireshark install [--dir DIR] [--json]``."""
    target: Path = args.dir.expanduser() if args.dir else personal_lua_plugins_dir()
    files = install(target)
    for warning in install_warnings():
        print(f"pacegate wireshark: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"dir": str(target), "files": [str(f) for f in files]}))
    else:
        for f in files:
            print(f"installed {f}", file=sys.stderr)
        print(
            f"pacegate dissectors installed in {target}; restart Wireshark, then filter with "
            "e.g. pacegate.sealed.counter > 100 or pacegate.channel.type == 0x17 "
            "(docs/wireshark.md)",
            file=sys.stderr,
        )
        print(target)
    return 0

"""The README's "Operating pacegate" section runs as written.

Each ``sh`` block of that section is extracted and run by bash, copy-pasted as a user would,
in a fresh directory with the venv's ``pacegate`` first on PATH: the real PKI, the real
stack (``up`` in the background), the real fleet, analysis, capture. Any failing line fails
the block (``set -e``), and whatever the block left running is stopped by PID at the end.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# Generous: the fleet runs 10 s, analysis and capture a few more, on a loaded 2-core machine.
BLOCK_TIMEOUT_S = 600
# Run before each block: fail at the first failing line, say which, and stop what the
# block started in the background if it fails half-way (by PID: only our jobs).
PREAMBLE = "set -euo pipefail\nset -x\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"


def operating_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Operating pacegate") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def run_block(block: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("SSLKEYLOGFILE", None)
    return subprocess.run(
        ["bash", "-c", PREAMBLE + block],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )


def test_readme_names_the_blocks_it_promises() -> None:
    blocks = operating_blocks()
    assert len(blocks) == 3, "the operating section has its three runnable blocks"
    joined = "\n".join(blocks)
    for command in ("pki enroll --count", "up --workdir", "status --workdir", "capture"):
        assert command in joined
    assert "sudo" not in joined, "root-only machines have no sudo"
    assert "/work/" not in README.read_text(), "no developer's path in the README"


@pytest.mark.integration
@pytest.mark.timeout(3 * BLOCK_TIMEOUT_S)
def test_readme_operating_section_runs_as_written(tmp_path: Path) -> None:
    # a pacegate/ folder in the current directory must not shadow the installed package
    (tmp_path / "pacegate").mkdir()
    for i, block in enumerate(operating_blocks()):
        proc = run_block(block, tmp_path)
        assert proc.returncode == 0, (
            f"README block {i + 1} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
        )
        assert "Traceback" not in proc.stderr
    work = tmp_path / "work"
    # the fleet of 100 ran against the 100 bulk-enrolled devices, and the stack counted it
    status = (work / "status.json").read_text()
    assert '"all_up": true' in status
    assert '"stored": ' in status
    assert '"stored": 0,' not in status
    # everything 'up' started is gone: the lock is free, stack.json removed
    assert not (work / "stack.json").exists()
    # logs and the gateway's replay windows are the owner's only
    for path in [*(work / "logs").iterdir(), work / "gateway" / "replay.db"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert (tmp_path / "work-capture" / "pacegate.pcapng").stat().st_size > 0

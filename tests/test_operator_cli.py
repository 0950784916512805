"""Operator commands: bulk enrolment, the work-directory lock, the numbers the reports show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from console.workdir import WorkLayout
from pacegate.layout import PkiLayout
from tests.support import run_pacegate


def pacegate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_pacegate(*args, cwd=cwd, timeout=300)


def registry(root: Path) -> dict[str, dict[str, str]]:
    devices: dict[str, dict[str, str]] = json.loads(PkiLayout(root).registry.read_text())["devices"]
    return devices


@pytest.mark.integration
def test_enroll_count_issues_a_hundred_bundles_in_one_call(tmp_path: Path) -> None:
    from pacegate.keystore import PskStore
    from pacegate.pki import init_pki

    root = tmp_path / "pki"
    init_pki(root)
    proc = pacegate("pki", "enroll", "--count", "100", "--dir", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "enrolled 100 devices, pm-0001 .. pm-0100" in proc.stderr
    ids = sorted(registry(root))
    assert ids == [f"pm-{i:04d}" for i in range(1, 101)]
    layout = PkiLayout(root)
    store = PskStore.load(layout.psk_store, layout.psk_store_key)
    assert all(did in store for did in ids)
    assert len({layout.device_psk(did).read_bytes() for did in ids}) == 100, "a fresh PSK each"
    # several names in one call, then --count continues after the highest number taken
    proc = pacegate("pki", "enroll", "ward-a", "ward-b", "--dir", str(root))
    assert proc.returncode == 0, proc.stderr
    proc = pacegate("pki", "enroll", "--count", "2", "--prefix", "pm-", "--dir", str(root))
    assert proc.returncode == 0, proc.stderr
    assert {"ward-a", "ward-b", "pm-0101", "pm-0102"} <= set(registry(root))


@pytest.mark.integration
def test_enroll_refuses_the_whole_batch_when_one_id_is_bad(tmp_path: Path) -> None:
    from pacegate.pki import init_pki

    root = tmp_path / "pki"
    init_pki(root)
    for bad in (["pm-0001", "pm 2"], ["pm-0001", "pm-0001"]):
        proc = pacegate("pki", "enroll", *bad, "--dir", str(root))
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert registry(root) == {}, "nothing of a refused batch is enrolled"
        assert not PkiLayout(root).device_dir("pm-0001").exists()
    proc = pacegate("pki", "enroll", "--dir", str(root))
    assert proc.returncode != 0
    assert "--count N" in proc.stderr


def test_workdir_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path: Path) -> None:
    from console.runstate import WorkdirBusy, lock_holder, workdir_lock

    work = WorkLayout(tmp_path)
    assert lock_holder(work) is None
    with workdir_lock(work):
        # flock locks are per open file description: a second open in this process
        # conflicts just as another process's would
        assert lock_holder(work) is not None
        with (
            pytest.raises(WorkdirBusy, match=r"in use by .*pid \d+.*\.pacegate\.lock"),
            workdir_lock(work),
        ):
            pass
    assert lock_holder(work) is None
    with workdir_lock(work):
        pass  # a stale lock file from a dead holder never blocks


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (-3e-9, "0.0000"),
        (-0.0, "0.0000"),
        (0.0, "0.0000"),
        (-0.0688, "-0.0688"),
        (1234.5, "1,234.5000"),
    ],
)
def test_report_never_shows_negative_zero(value: float, shown: str) -> None:
    from console.demo import fixed4

    assert fixed4(value) == shown


def test_children_are_started_so_a_local_pacegate_folder_cannot_shadow_the_package() -> None:
    from console.stack import pacegate_argv

    argv = pacegate_argv("demo")
    assert argv[:4] == [sys.executable, "-P", "-m", "console"]


@pytest.mark.integration
def test_child_pacegate_started_beside_a_pacegate_folder_imports_the_package(
    tmp_path: Path,
) -> None:
    from console.stack import pacegate_argv

    # what crashed capture: 'python -m console' with ./pacegate/ first on sys.path
    (tmp_path / "pacegate").mkdir()
    proc = subprocess.run(
        pacegate_argv("--version"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pacegate ")

"""requirements.lock: every Python dependency pinned with hashes, and what runs is what it pins."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked(path: Path) -> dict[str, tuple[str, int]]:
    """{normalised name: (version, number of sha256 hashes)} from a uv/pip-compile lock."""
    out: dict[str, tuple[str, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        pin = _PIN.match(line)
        if pin:
            current = _normal(pin.group(1))
            out[current] = (pin.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, n = out[current]
            out[current] = (version, n + 1)
    return out


def _requirement_names(specs: list[str]) -> set[str]:
    return {_normal(re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0]) for s in specs}


def test_every_dependency_of_pyproject_is_pinned_with_hashes_in_the_lock() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = _requirement_names(
        project["project"]["dependencies"]
        + project["project"]["optional-dependencies"]["test"]
        + project["build-system"]["requires"]
    )
    locked = _locked(REPO / "requirements.lock")
    missing = sorted(wanted - set(locked))
    assert not missing, f"not in requirements.lock (run ./dev lock): {missing}"
    unhashed = sorted(name for name, (_, hashes) in locked.items() if hashes == 0)
    assert not unhashed, f"pinned without a hash: {unhashed}"
    sslyze = _locked(REPO / "requirements-sslyze.lock")
    assert "sslyze" in sslyze
    assert all(n > 0 for _, n in sslyze.values())


def test_the_virtualenv_running_the_tests_is_exactly_the_lock() -> None:
    """./dev installs the lock into a fresh virtualenv: every locked package is installed
    at its locked version, and nothing else is there but pacegate itself."""
    locked = _locked(REPO / "requirements.lock")
    installed = {_normal(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {n: (v, installed.get(n)) for n, (v, _) in locked.items() if installed.get(n) != v}
    assert not wrong, f"installed differs from requirements.lock (./dev setup): {wrong}"
    extra = sorted(set(installed) - set(locked) - {"pacegate"})
    assert not extra, f"installed but not locked: {extra}"

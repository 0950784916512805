"""The three layers (docs/architecture.md) hold: the operator layer (console) imports the
components, the components import only the shared core (pacegate) and never each other,
and the core imports none of them. The contract lives in pyproject.toml; import-linter
checks it here, so CI fails on an arrow that runs the wrong way."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ROOT_PACKAGES: list[str] = PYPROJECT["tool"]["importlinter"]["root_packages"]


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first on sys.path: the tree given, not the installed (editable) one
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy_tree(dest: Path) -> Path:
    for package in ROOT_PACKAGES:
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_every_installed_package_is_under_the_layer_contract() -> None:
    found = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in found) == sorted(ROOT_PACKAGES)


@pytest.mark.integration
def test_the_tree_keeps_the_layer_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.integration
@pytest.mark.parametrize(
    ("module", "arrow"),
    [
        ("pacegate/errors.py", "import gateway.config"),  # the core reaching up
        ("gateway/metrics.py", "import hospital.config"),  # a component reaching sideways
        ("hospital/anchor.py", "import console.workdir"),  # a component reaching up
    ],
)
def test_an_arrow_the_wrong_way_breaks_the_contract(
    tmp_path: Path, module: str, arrow: str
) -> None:
    tree = _copy_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{arrow}  # the wrong way\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {arrow.split()[1]}" in result.stdout

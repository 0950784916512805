"""The store seam: ``ReadingStore`` is the only store type outside the store modules, and
every backend implements the whole protocol with the protocol's signatures. Pure: the
classes are inspected, and one SQLite store (a file in tmp_path) is opened."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from hospital.pgstore import PostgresReadingStore
from hospital.store import ReadingStore, SqliteReadingStore

ROOT = Path(__file__).resolve().parent.parent
# the code a user runs (tests and benchmarks may name a backend: they compare them)
PACKAGES = ("pacegate", "console", "device_sim", "broker", "gateway", "hospital", "cloud")
# which modules may name each backend class: its own, and the factory's
BACKENDS = {
    "SqliteReadingStore": {"hospital/store.py"},
    "PostgresReadingStore": {"hospital/pgstore.py", "hospital/store.py"},
}


def _protocol_members() -> list[str]:
    members = [
        name
        for name, value in vars(ReadingStore).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    ]
    return sorted([*members, "__enter__", "__exit__"])


def _parameters(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_the_protocol_covers_what_service_analysis_verify_rotation_and_export_call() -> None:
    assert {
        "name",
        "anchor",
        "store_batch",
        "count",
        "iter_records",
        "iter_reading_values",
        "seq_bounds",
        "check_head",
        "verify",
        "scan",
        "reanchor",
        "rotate_key",
        "close",
    } <= set(_protocol_members())


@pytest.mark.parametrize("backend", [SqliteReadingStore, PostgresReadingStore])
def test_every_backend_implements_each_protocol_method_with_its_signature(
    backend: type,
) -> None:
    for name in _protocol_members():
        wanted = getattr(ReadingStore, name)
        if isinstance(wanted, property):
            continue  # an attribute: checked on a live store below (SQLite) and by mypy
        have = getattr(backend, name, None)
        assert callable(have), f"{backend.__name__} lacks {name}"
        proto = _parameters(wanted)
        impl = _parameters(have)
        # the protocol's parameters, in order, same kind and default; extra ones optional
        assert impl[: len(proto)] == proto, f"{backend.__name__}.{name}: {impl} vs {proto}"
        for pname, kind, default in impl[len(proto) :]:
            assert default is not inspect.Parameter.empty or kind in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            ), f"{backend.__name__}.{name}: extra parameter {pname} is required"


def test_an_open_sqlite_store_is_a_reading_store_at_runtime(tmp_path: Path) -> None:
    with SqliteReadingStore.open(tmp_path / "readings.db", tmp_path / "keyring.json") as store:
        assert isinstance(store, ReadingStore)
        assert store.name == str(tmp_path / "readings.db")
        assert store.anchor is not None
        assert store.anchor.exists()


def test_no_module_outside_the_store_modules_names_a_store_backend() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            text = path.read_text()
            for cls, allowed in BACKENDS.items():
                if rel not in allowed and re.search(rf"\b{cls}\b", text):
                    offenders.append(f"{rel}: {cls}")
    assert offenders == [], "use hospital.store.open_store and the ReadingStore protocol"

"""``./dev mutate``: a curated mutation run over pacegate's security-critical code.

Each mutant in ``tools/mutants.toml`` names the security property it breaks, one or more
exact edits (file, original snippet, replacement) and the test files that guard that
property. For each mutant, this script copies the repository (tracked and untracked,
non-ignored files) into a temporary directory, applies the edits there (the worktree is
never touched), and runs the mutant's test files with ``pytest -x`` in the copy, with the
copy first on ``PYTHONPATH``. A mutant is *killed* if a test fails, *survived* if every test
passes, *timeout* if the run exceeds ``--timeout`` (counted as killed, as mutation tools
do), *error* if pytest could not run (exit codes 2-5) and *stale* if an original snippet is
no longer found exactly once (the code moved: fix the data file).

It reports each result, every survivor with the property it breaks, and the kill rate
(killed + timeout over killed + timeout + survived), and writes a JSON report with
``--json``. Not part of CI: one run takes tens of minutes on two cores. Run niced.

    ./dev mutate [--only ID ...] [--list] [--check] [--json FILE] [--timeout S] [--no-baseline]

``--check`` only verifies that every original snippet is still found exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tools" / "mutants.toml"
# A mutant run longer than this is stopped and counted as killed (a hang the tests notice).
DEFAULT_TIMEOUT_S = 600.0
KILLED, SURVIVED, TIMEOUT, ERROR, STALE = "killed", "survived", "timeout", "error", "stale"


@dataclass(frozen=True)
class Edit:
    file: str
    original: str
    mutant: str


@dataclass(frozen=True)
class Mutant:
    id: str
    property: str
    tests: tuple[str, ...]
    edits: tuple[Edit, ...]


def load_mutants(path: Path = DATA) -> list[Mutant]:
    data = tomllib.loads(path.read_text())
    out = []
    seen: set[str] = set()
    for i, m in enumerate(data.get("mutant", [])):
        where = f"{path}: mutant[{i}]"
        for key in ("id", "property", "tests", "edit"):
            if key not in m:
                raise SystemExit(f"{where}: missing key {key!r}")
        if m["id"] in seen:
            raise SystemExit(f"{where}: duplicate id {m['id']!r}")
        seen.add(m["id"])
        edits = tuple(Edit(e["file"], e["original"], e["mutant"]) for e in m["edit"])
        if any(e.original == e.mutant for e in edits):
            raise SystemExit(f"{where} ({m['id']}): an edit changes nothing")
        out.append(Mutant(m["id"], m["property"], tuple(m["tests"]), edits))
    return out


def _repo_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return [f for f in listed.decode().split("\0") if f and (ROOT / f).is_file()]


def copy_repo(dest: Path) -> None:
    for rel in _repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def apply(copy: Path, mutant: Mutant) -> str | None:
    """Apply the edits in ``copy``; the reason it cannot, or None."""
    for e in mutant.edits:
        path = copy / e.file
        if not path.is_file():
            return f"{e.file}: no such file"
        text = path.read_text()
        n = text.count(e.original)
        if n != 1:
            return f"{e.file}: original snippet found {n} times (expected once)"
        path.write_text(text.replace(e.original, e.mutant))
    return None


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")]),
        "PACEGATE_FULL_KAT": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return TIMEOUT, time.monotonic() - start, ""
    elapsed = time.monotonic() - start
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode == 0:
        return SURVIVED, elapsed, lines[-1] if lines else ""
    if proc.returncode == 1:
        # the short summary (-ra) names the test that noticed the mutant
        failed = [ln.split(" - ")[0] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
        return KILLED, elapsed, "; ".join(failed) or (lines[-1] if lines else "")
    return ERROR, elapsed, "\n".join(lines[-3:])


def _check_copy_is_imported(copy: Path) -> None:
    """The editable install must not shadow the copy, or every mutant would 'survive'."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pacegate, gateway, device_sim, hospital, cloud, tests;"
            "print(pacegate.__file__, gateway.__file__, tests.__file__)",
        ],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if any(not Path(p).resolve().is_relative_to(copy.resolve()) for p in out.split()):
        raise SystemExit(f"mutate: the copy is not what Python imports ({out.strip()})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="./dev mutate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument(
        "--check", action="store_true", help="only check every snippet still applies, and exit"
    )
    ap.add_argument("--json", type=Path, help="write the report to this file")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip the unmutated run of the test files"
    )
    args = ap.parse_args(argv)
    mutants = load_mutants()
    if args.only:
        unknown = set(args.only) - {m.id for m in mutants}
        if unknown:
            raise SystemExit(f"mutate: unknown mutant id(s): {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.id in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.id:32} {m.property}")
        return 0
    if args.check:
        stale = 0
        for m in mutants:
            for e in m.edits:
                n = (
                    (ROOT / e.file).read_text().count(e.original)
                    if (ROOT / e.file).is_file()
                    else 0
                )
                if n != 1:
                    stale += 1
                    print(f"STALE {m.id}: {e.file}: original snippet found {n} times")
        print(f"{len(mutants)} mutants, {stale} stale edit(s)")
        return 1 if stale else 0

    results: list[dict[str, object]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pacegate-mutate-") as tmp:
        if not args.no_baseline:
            base = Path(tmp) / "baseline"
            copy_repo(base)
            _check_copy_is_imported(base)
            files = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            print(f"baseline: {len(files)} test files, unmutated ...", flush=True)
            outcome, elapsed, tail = run_tests(base, files, args.timeout * 2)
            if outcome != SURVIVED:  # "survived" = every test passed
                print(f"baseline FAILED ({outcome}, {elapsed:.0f} s):\n{tail}", file=sys.stderr)
                return 2
            print(f"baseline: green in {elapsed:.0f} s", flush=True)
            shutil.rmtree(base)
        for n, m in enumerate(mutants, 1):
            copy = Path(tmp) / m.id
            copy_repo(copy)
            problem = apply(copy, m)
            if problem is not None:
                outcome, elapsed, tail = STALE, 0.0, problem
            else:
                outcome, elapsed, tail = run_tests(copy, m.tests, args.timeout)
            shutil.rmtree(copy, ignore_errors=True)
            results.append(
                {
                    "id": m.id,
                    "property": m.property,
                    "result": outcome,
                    "seconds": round(elapsed, 1),
                    "tests": list(m.tests),
                    "detail": tail,
                }
            )
            print(f"[{n}/{len(mutants)}] {outcome:8} {elapsed:6.0f} s  {m.id}", flush=True)
            if outcome == KILLED:
                print(f"        by {tail}", flush=True)

    counts = {
        k: sum(r["result"] == k for r in results) for k in (KILLED, SURVIVED, TIMEOUT, ERROR, STALE)
    }
    judged = counts[KILLED] + counts[TIMEOUT] + counts[SURVIVED]
    rate = (counts[KILLED] + counts[TIMEOUT]) / judged if judged else 0.0
    print()
    print(
        f"kill rate: {counts[KILLED] + counts[TIMEOUT]}/{judged} = {rate:.0%} "
        f"(killed {counts[KILLED]}, timeout {counts[TIMEOUT]}, survived {counts[SURVIVED]}, "
        f"error {counts[ERROR]}, stale {counts[STALE]}) in {time.monotonic() - started:.0f} s"
    )
    for r in results:
        if r["result"] in (SURVIVED, ERROR, STALE):
            print(f"  {r['result'].upper():8} {r['id']}: {r['property']}")
            if r["result"] != SURVIVED:
                print(f"           {r['detail']}")
    if args.json:
        args.json.write_text(
            json.dumps({"kill_rate": rate, "counts": counts, "mutants": results}, indent=1) + "\n"
        )
    return 0 if counts[SURVIVED] == counts[ERROR] == counts[STALE] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

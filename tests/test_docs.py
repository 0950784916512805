"""The documentation keeps its promises: every threat-model row names tests that exist, and
the README's two commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _table_rows(markdown: str) -> list[str]:
    rows = []
    for line in markdown.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        rows.append(line)
    return rows


def test_every_threat_model_row_names_a_test_that_exists() -> None:
    doc = (ROOT / "docs" / "threat-model.md").read_text()
    rows = _table_rows(doc)
    headers = {r for r in rows if "proved by" in r}
    body = [r for r in rows if r not in headers]
    assert len(body) >= 20
    missing = []
    for row in body:
        refs = TEST_REF.findall(row)
        assert refs, f"threat-model row names no test: {row[:80]}"
        for path, name in refs:
            source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
            if not re.search(rf"^(async )?def {name}\(", source, re.MULTILINE):
                missing.append(f"{path}::{name}")
    assert missing == []


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./dev demo" in readme
    assert "./dev test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec \./dev test$", ci, re.MULTILINE)


def test_every_doc_linked_from_the_readme_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[\w./-]+\.md)\)", readme)
    assert links
    assert [link for link in links if not (ROOT / link).exists()] == []

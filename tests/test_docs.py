"""The documentation agrees with the code: links lead somewhere, and the README's retention
table names keys the code really writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.contract import Keys

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE_RE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_LINK_RE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def links(path: Path) -> list[str]:
    """The targets of the Markdown links and images of a file (code blocks left out)."""
    text = _FENCE_RE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return _LINK_RE.findall(text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    text = _FENCE_RE.sub("", path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        while slug in found:
            slug += "-1"
        found.add(slug)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_existing_files_and_anchors(doc: Path) -> None:
    """Every relative link of README.md and docs/*.md names a file that exists, and an anchor
    (`#section`) names a heading of the Markdown file it points into."""
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, broken


def test_link_checker_finds_links() -> None:
    """(The checker itself: it sees the README's links, anchors included.)"""
    targets = links(ROOT / "README.md")
    assert "docs/deployment.md#behind-a-reverse-proxy" in targets
    assert "personal-data" in anchors(ROOT / "README.md")


def retention_table() -> list[tuple[str, list[str]]]:
    """The README's table of stored copies: (what, [key patterns])."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Personal data", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    table = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        table.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return table


def code_keys() -> set[str]:
    """Every key the code spells (shared/contract.Keys), with the README's placeholders:
    P the prefix, E an event id, I an integration, A an attempt id, X an exam id, R a
    rejected body's id; arq's job keys as ``arq:job:P:…``."""
    k = Keys("P")
    return {
        k.queue,
        k.failures,
        k.unmatched,
        k.rejected,
        k.stats,
        k.exams,
        k.workers,
        k.event("E"),
        k.seen("E"),
        k.releases("A"),
        k.exam("X"),
        k.pair("E", "I"),
        k.attempts("E", "I"),
        k.delivered("E", "I"),
        k.lock("E", "I"),
        k.rejected_item("R"),
        k.job("P:…"),
        k.in_progress("P:…"),
        k.job_retry("P:…"),
    }


def test_retention_table_names_keys_the_code_writes() -> None:
    """Each key pattern of the README's retention table (Personal data) is a key the code
    spells, and the table covers every key holding personal data or pointing at it."""
    table = retention_table()
    assert len(table) >= 8, table
    named = {pattern for _, patterns in table for pattern in patterns}
    unknown = named - code_keys()
    assert not unknown, f"not keys of shared/contract.py: {sorted(unknown)}"
    k = Keys("P")
    personal = {k.event("E"), k.seen("E"), k.releases("A"), k.pair("E", "I"), k.attempts("E", "I")}
    personal |= {k.delivered("E", "I"), k.rejected_item("R"), k.job("P:…"), k.exam("X"), k.failures}
    assert personal <= named, sorted(personal - named)


def test_license_is_the_mit_license_pyproject_names() -> None:
    """pyproject.toml says MIT: the LICENSE file is there, and is the MIT licence."""
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "examhook contributors" in text
    assert "Permission is hereby granted, free of charge" in text

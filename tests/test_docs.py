"""The docs stay true to the code: every link to a line of the source quotes code that is on that line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[`([^`]+)`\]\(\.\./(tinyserve/[\w/]+\.py)#L(\d+)\)")
DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_line_links_quote_their_line(doc):
    text = doc.read_text(encoding="utf-8")
    for code, path, line in LINK.findall(text):
        lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
        n = int(line)
        assert n <= len(lines), f"{doc.name}: {path}#L{n} is past the end of the file"
        assert code in lines[n - 1], f"{doc.name}: {path}#L{n} no longer holds `{code}` (it holds: {lines[n - 1].strip()})"


def test_walkthrough_links_every_step():
    text = (ROOT / "docs" / "walkthrough.md").read_text(encoding="utf-8")
    assert len(LINK.findall(text)) >= 25
    # every link to a source line in the walkthrough is of the checked form
    loose = re.findall(r"\]\(\.\./tinyserve/[\w/]+\.py#L\d+\)", text)
    assert len(loose) == len(LINK.findall(text))


def test_docs_index_lists_every_doc():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for doc in DOCS:
        if doc.name != "README.md":
            assert f"]({doc.name})" in index, f"docs/README.md does not list {doc.name}"

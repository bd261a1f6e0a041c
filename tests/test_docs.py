"""The documentation is inside the repository: every relative link in README.md and docs/*.md
names a file of this checkout (none outside it), and the code's "FORMATS.md §N" citations
point at sections that exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_stay_in_the_repository(doc):
    links = [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
             if not re.match(r"[a-z]+:", m)]
    for link in links:
        target = (doc.parent / link).resolve()
        assert ROOT in target.parents, f"{doc.name}: {link} leads outside the repository"
        assert target.exists(), f"{doc.name}: {link} does not exist"


def test_design_documents_are_in_docs():
    for name in ("DESIGN.md", "FORMATS.md", "ARCHITECTURE.md"):
        assert (ROOT / "docs" / name).is_file()
    assert "docs/DESIGN.md" in (ROOT / "README.md").read_text()


def test_format_citations_name_existing_sections():
    sections = set(re.findall(r"^#+\s*(\d+(?:\.\d+)*)", (ROOT / "docs" / "FORMATS.md").read_text(),
                              flags=re.M))
    cited = set()
    for path in [*(ROOT / "quantbench").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        cited |= set(re.findall(r"FORMATS\.md §(\d+(?:\.\d+)*)", path.read_text()))
    assert cited and cited <= sections, f"cited but missing: {sorted(cited - sections)}"

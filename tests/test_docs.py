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


def test_the_readme_exl2_measurement_is_complete_and_matches_its_command():
    """README's EXL2 example reuses examples/smollm2-exl2.json (measuring takes minutes): it
    must be complete and made with the command's calibration, else the example re-measures."""
    import json

    m = json.loads((ROOT / "examples" / "smollm2-exl2.json").read_text())
    assert m["complete"] is True and m["model"]["source"] == "sample:smollm2"
    c = m["calibration"]
    assert (c["samples"], c["calib_samples"], c["calib_len"]) == (2, 4, 256)
    readme = " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())
    assert ("--method exl2 --bpw 4.0 --measure-samples 2 --calib-samples 4 --calib-len 256 "
            "--measurement examples/smollm2-exl2.json") in readme

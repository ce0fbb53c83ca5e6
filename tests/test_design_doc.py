"""docs/design.md holds the decisions the code cites: every "decision N" in agentd/, tests/ and
docs/ names one of its numbered sections, and every link into it (or within docs/) lands on a
heading."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
CITATION = re.compile(r"\bdecisions? (\d+(?:(?:, | and |, and )\d+)*)", re.IGNORECASE)


def sections() -> dict[int, str]:
    found = re.findall(r"^## (\d+)\. (.+)$", DESIGN.read_text(encoding="utf-8"), re.MULTILINE)
    return {int(number): title for number, title in found}


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_design_numbers_its_decisions_in_order() -> None:
    numbers = list(sections())
    assert len(numbers) >= 14
    assert numbers == list(range(1, len(numbers) + 1))


def test_every_cited_decision_exists() -> None:
    known = set(sections())
    files = [*sorted((ROOT / "agentd").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py")),
             *sorted((ROOT / "docs").glob("*.md"))]
    cited: list[tuple[str, int]] = []
    for path in files:
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
            cited += [(str(path.relative_to(ROOT)), n) for n in numbers]
    assert len(cited) > 20          # the pattern still finds the code's citations
    unknown = [(where, n) for where, n in cited if n not in known]
    assert not unknown, f"citations of decisions docs/design.md does not have: {unknown}"


def test_links_into_the_docs_land_on_headings() -> None:
    docs = ROOT / "docs"
    broken = []
    for path in [ROOT / "README.md", *sorted(docs.glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for target, fragment in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
            file = (path.parent / target).resolve() if target else path
            checked = file.suffix == ".md" and file.is_relative_to(docs) and file.exists()
            if checked and fragment not in anchors(file):
                broken.append(f"{path.name}: {target}#{fragment}")
    assert not broken, f"links to headings that do not exist: {broken}"

"""The ```python blocks of README.md and of each docs/*.md run, top to bottom in one namespace per
page, as a reader would paste them (the documented examples stay true)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if "```python" in p.read_text()]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_documented_examples_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)):
        exec(compile(code, f"{doc.name}[python block {i}]", "exec"), namespace)


def test_readme_claims_table_shows_the_ids_runs_report():
    """One short row per claim, and every id a registered experiment declares (the ids its run reports)."""
    from symgen.experiments import list_experiments

    block = (ROOT / "README.md").read_text().split("<!-- claims:start -->")[1].split("<!-- claims:end -->")[0]
    rows = [line for line in block.splitlines() if re.match(r"^\| [a-z-]+ (\(quick\) )?\| C\d", line)]
    assert all(len(row) < 400 for row in rows)
    shown = {(row.split(" | ")[0][2:].removesuffix(" (quick)"), row.split(" | ")[1]) for row in rows}
    declared = {(e.name, cid) for e in list_experiments() for cid in e.claims}
    assert shown == declared


def test_claims_page_names_every_declared_id_and_nothing_points_outside_the_repo():
    from symgen.experiments import list_experiments

    claims_page = (ROOT / "docs" / "claims.md").read_text()
    assert all(f"| {cid} |" in claims_page for e in list_experiments() for cid in e.claims)
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "src" / "symgen").rglob("*.py")]:
        text = path.read_text()
        assert "PAPERS.md" not in text and "shared/" not in text and "DESIGN.md" not in text, path

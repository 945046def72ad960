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

"""Regenerate README.md's claims table from the latest finished run of each experiment.

Usage: .venv/bin/python scripts/update_readme.py [--out runs]   (after `make demo`)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml

from symgen.runs import RunStore
from symgen.terminal import claim_headline, format_value

START, END = "<!-- claims:start -->", "<!-- claims:end -->"


HEADER = ("| experiment | claim | headline | threshold | paper | margin | verdict |", "|---|---|---|---|---|---|---|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def row(experiment: str, claim: dict[str, Any]) -> str:
    """One README table row for a claim (the ``claims.json`` form): its headline number, the threshold it is
    held to (the number, or the rule where the threshold is not one number), the paper's number, the margin
    (positive on the passing side) and the verdict; the full measured values are in the run's report.

    Args:
        experiment: the experiment's label, e.g. ``implicit-bias (quick)``.
        claim: ``{id, measured, threshold, passed, headline, paper}``.

    Returns:
        the row, ending in ``| PASS |`` or ``| **FAIL** |``.
    """
    h = claim_headline(claim)
    headline = "-" if h["measured"] is None else f"{h['key']}={format_value(h['measured'], 3)}"
    threshold = format_value(h["threshold"] if h["threshold"] is not None else claim["threshold"], 3)
    paper = "-" if h["paper"] is None else format_value(h["paper"], 3)
    margin = "-" if h["margin"] is None else f"{h['margin']:+.3g}"
    verdict = "PASS" if claim["passed"] else "**FAIL**"
    cells = [experiment, str(claim["id"]), headline, threshold, paper, margin]
    return "| " + " | ".join(_cell(c) for c in cells) + f" | {verdict} |"


def summary_line(rows: list[str]) -> str:
    """``21/26 claims pass; failing: C2.2, ...`` from the table's rows."""
    passed = sum(r.endswith("| PASS |") for r in rows)
    failed = [r.split(" | ")[1] for r in rows if r.endswith("| **FAIL** |")]
    return f"{passed}/{passed + len(failed)} claims pass" + (f"; failing: {', '.join(failed)}." if failed else ".")


def table(store: RunStore) -> str:
    """The claims block: the summary line, then one row per claim of the latest finished run of each experiment.

    Args:
        store: the run store ``make demo`` wrote.

    Returns:
        the text between README's claims markers.
    """
    latest: dict[str, dict] = {}
    for r in store.list():
        if r["status"] == "done":
            latest[r["experiment"]] = r
    rows = []
    for name, r in latest.items():
        path = Path(r["path"])
        quick = yaml.safe_load((path / "config.yaml").read_text()).get("quick")
        label = f"{name}{' (quick)' if quick else ''}"
        rows += [row(label, c) for c in json.loads((path / "claims.json").read_text())]
    return "\n".join([summary_line(rows), "", FOOTNOTE, "", *HEADER, *rows])


FOOTNOTE = (
    "One row per claim: its headline number, the threshold (the number, or the rule where it is not one "
    "number), the paper's number, the margin (positive on the passing side) and the verdict. What each claim "
    "means, its protocol and where its threshold comes from: [docs/claims.md](docs/claims.md); every measured "
    "value: each run's `report.html` and `claims.json`."
)


def main() -> None:
    """Rewrite the claims block of README (``--readme``) from the run store (``--out``)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs")
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args()
    readme = Path(args.readme)
    text = readme.read_text()
    block = f"{START}\n{table(RunStore(args.out))}\n{END}"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(text)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()

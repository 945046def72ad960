"""Regenerate README.md's claims table from the latest finished run of each experiment.

Usage: .venv/bin/python scripts/update_readme.py [--out runs]   (after `make demo`)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from symgen.report import format_value
from symgen.runs import RunStore

START, END = "<!-- claims:start -->", "<!-- claims:end -->"


def table(store: RunStore) -> str:
    latest: dict[str, dict] = {}
    for row in store.list():
        if row["status"] == "done":
            latest[row["experiment"]] = row
    lines = ["| experiment | claim | measured | threshold | paper | verdict |", "|---|---|---|---|---|---|"]
    for name, row in latest.items():
        path = Path(row["path"])
        quick = yaml.safe_load((path / "config.yaml").read_text()).get("quick")
        for c in json.loads((path / "claims.json").read_text()):
            measured = format_value(c["measured"], 3).replace("|", "\\|")
            threshold = format_value(c["threshold"], 3).replace("|", "\\|")
            verdict = "PASS" if c["passed"] else "**FAIL**"
            # the paper's own number for the headline quantity, where the paper states one
            paper = "-" if c.get("paper") is None else f"{c.get('headline')}={format_value(c['paper'], 3)}"
            paper = paper.replace("|", "\\|")
            statement = c["statement"].replace("|", "\\|")
            lines.append(
                f"| {name}{' (quick)' if quick else ''} | {c['id']}: {statement} | {measured} | "
                f"{threshold} | {paper} | {verdict} |"
            )
    passed = sum(line.endswith("| PASS |") for line in lines)
    failed = [line.split(" | ")[1].split(":")[0] for line in lines if line.endswith("| **FAIL** |")]
    head = f"{passed}/{passed + len(failed)} claims pass" + (f"; failing: {', '.join(failed)}." if failed else ".")
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
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

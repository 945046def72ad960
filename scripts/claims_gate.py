"""The claims gate: README's claims table must equal the verdicts of a fresh `symgen reproduce --quick`.

Fails (exit 1) when a claim README lists as PASS no longer passes, or when README's table and the
run's verdicts differ in any way (a claim added, removed, or flipped): README can never silently
go stale. After a deliberate change, regenerate the table: `python scripts/update_readme.py`.

Usage: .venv/bin/python scripts/claims_gate.py [--readme README.md] [--summary reproduce.json]
Without --summary it runs `symgen reproduce --quick --json` into a temporary store (about 3 minutes
on 2 cores) and compares that.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

START, END = "<!-- claims:start -->", "<!-- claims:end -->"
ROW = re.compile(r"^\| (?P<exp>[^|]+?)(?: \(quick\))? \| (?P<id>[^:|]+): .*\| (?P<verdict>PASS|\*\*FAIL\*\*) \|$")


def readme_verdicts(text: str) -> dict[tuple[str, str], bool]:
    """{(experiment, claim id): passed} from README's claims table."""
    if START not in text or END not in text:
        raise SystemExit(f"README has no claims table between {START} and {END}.")
    block = text.split(START, 1)[1].split(END, 1)[0]
    out = {}
    for line in block.splitlines():
        m = ROW.match(line.strip())
        if m:
            out[(m["exp"].strip(), m["id"].strip())] = m["verdict"] == "PASS"
    return out


def run_verdicts(summary: dict) -> dict[tuple[str, str], bool]:
    """{(experiment, claim id): passed} from `symgen reproduce --json` output."""
    return {(e["name"], c["id"]): bool(c["passed"]) for e in summary["experiments"] for c in e["claims"]}


def compare(readme: dict[tuple[str, str], bool], run: dict[tuple[str, str], bool]) -> list[str]:
    """Every difference, worst first: a README PASS that fails now, then any other mismatch."""
    name = lambda k: f"{k[0]}: {k[1]}"  # noqa: E731
    regressions = [f"REGRESSION {name(k)}: README says PASS, the run says FAIL" for k, v in readme.items()
                   if v and run.get(k) is False]
    other = [f"{name(k)}: README says FAIL, the run says PASS (update README)" for k, v in readme.items()
             if not v and run.get(k) is True]
    other += [f"{name(k)}: in README, not checked by the run" for k in readme if k not in run]
    other += [f"{name(k)}: checked by the run ({'PASS' if v else 'FAIL'}), missing from README" for k, v in run.items()
              if k not in readme]
    return regressions + other


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--summary", help="reproduce.json (or `symgen reproduce --json` output) to check; "
                                      "default: run `symgen reproduce --quick --json` now")
    args = ap.parse_args(argv)
    readme = readme_verdicts(Path(args.readme).read_text())
    if args.summary:
        summary = json.loads(Path(args.summary).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "symgen.cli", "reproduce", "--quick", "--json", "--out", tmp]
            print("claims gate:", " ".join(cmd[2:]), file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(f"claims gate: reproduce failed with exit code {proc.returncode}", file=sys.stderr)
                return 1
            summary = json.loads(proc.stdout)
    diffs = compare(readme, run_verdicts(summary))
    if diffs:
        print("claims gate FAILED: README's claims table and the run disagree:", file=sys.stderr)
        for d in diffs:
            print(f"  {d}", file=sys.stderr)
        print("Fix the regression, or regenerate the table: python scripts/update_readme.py", file=sys.stderr)
        return 1
    n = sum(readme.values())
    print(f"claims gate passed: {len(readme)} claims, {n} PASS, verdicts equal README's table.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

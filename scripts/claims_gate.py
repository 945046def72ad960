"""The claims gate: README's claims table must equal the verdicts of a fresh `symgen reproduce --quick`.

Fails (exit 1) when a claim README lists as PASS no longer passes, or when README's table and the
run's verdicts differ in any way (a claim added, removed, or flipped): README can never silently
go stale. After a deliberate change, regenerate the table: `python scripts/update_readme.py`.

CI runs on another machine than the one that wrote README: floating-point results may differ there
in the last bits (SIMD dispatch), so every flip is printed with the claim's headline number and its
margin to the threshold (a flip with a tiny margin is a flaky claim, a large one a real change), and
claims whose margin is tiny are listed even when nothing flips. The verdicts are never relaxed.

The run is time-bounded (--timeout, default 1200 s): past it the reproduction is stopped, the gate
fails, and the times of the experiments that finished are printed, as they are after every run.

Usage: .venv/bin/python scripts/claims_gate.py [--readme README.md] [--summary reproduce.json] [--timeout S]
Without --summary it runs `symgen reproduce --quick --json` into a temporary store (about 7 minutes
on 2 cores) and compares that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

START, END = "<!-- claims:start -->", "<!-- claims:end -->"
# | experiment (quick) | claim id | headline | threshold | paper | margin | verdict |  (scripts/update_readme.py);
# an id cell may carry ": statement" (the table's earlier layout)
ROW = re.compile(
    r"^\| (?P<exp>[^|]+?)(?: \(quick\))? \| (?P<id>[^:|]+?)(?:: [^|]*)? \|.*\| (?P<verdict>PASS|\*\*FAIL\*\*) \|$"
)


def readme_verdicts(text: str) -> dict[tuple[str, str], bool]:
    """{(experiment, claim id): passed} from README's claims table.

    Args:
        text: README's text.

    Returns:
        each row's verdict, keyed by experiment name (without `` (quick)``) and claim id.
    """
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


NEAR = 1e-3  # a margin below this fraction of the threshold's size (or 1e-9 absolute) is called tiny


def margins(summary: dict) -> dict[tuple[str, str], dict[str, Any]]:
    """{(experiment, claim id): headline} with the headline number, threshold and signed margin of each
    claim (:func:`symgen.terminal.claim_headline`; positive on the passing side)."""
    from symgen.terminal import claim_headline

    return {(e["name"], c["id"]): claim_headline(c) for e in summary["experiments"] for c in e["claims"]}


def describe_margin(h: dict[str, Any] | None) -> str:
    """``min_cos=0.9902 vs 0.99, margin +0.0002 (tiny: may flip across CPUs)``, or why there is none."""
    if not h or h.get("margin") is None:
        return "no numeric margin (threshold is not a number)"
    text = f"{h['key']}={h['measured']:.6g} vs {h['threshold']:.6g}, margin {h['margin']:+.3g}"
    return text + (" (tiny: may flip across CPUs)" if tiny(h) else "")


def tiny(h: dict[str, Any] | None) -> bool:
    """Whether the margin is within round-off-like distance of the threshold."""
    if not h or h.get("margin") is None or not math.isfinite(h["margin"]):
        return False
    return abs(h["margin"]) <= max(1e-9, NEAR * abs(h["threshold"] or 0.0))


def compare(
    readme: dict[tuple[str, str], bool],
    run: dict[tuple[str, str], bool],
    margin: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> list[str]:
    """Every difference, worst first: a README PASS that fails now, then any other mismatch; each flip
    with the claim's margin when ``margin`` (from :func:`margins`) is given."""
    name = lambda k: f"{k[0]}: {k[1]}"  # noqa: E731
    why = lambda k: f" [{describe_margin(margin.get(k))}]" if margin is not None else ""  # noqa: E731
    regressions = [
        f"REGRESSION {name(k)}: README says PASS, the run says FAIL{why(k)}"
        for k, v in readme.items()
        if v and run.get(k) is False
    ]
    other = [
        f"{name(k)}: README says FAIL, the run says PASS (update README){why(k)}"
        for k, v in readme.items()
        if not v and run.get(k) is True
    ]
    other += [f"{name(k)}: in README, not checked by the run" for k in readme if k not in run]
    other += [
        f"{name(k)}: checked by the run ({'PASS' if v else 'FAIL'}), missing from README"
        for k, v in run.items()
        if k not in readme
    ]
    return regressions + other


def times_table(rows: list[tuple[str, float | None, str]]) -> str:
    """Per-experiment seconds (and claims passed), the slowest marked."""
    width = max([len(r[0]) for r in rows] + [10])
    lines = [f"  {'experiment'.ljust(width)}  seconds  claims"]
    for name, secs, claims in rows:
        lines.append(f"  {name.ljust(width)}  {('-' if secs is None else f'{secs:7.1f}'):>7}  {claims}")
    return "\n".join(lines)


def _store_times(out: str) -> list[tuple[str, float | None, str]]:
    """The experiments a (possibly stopped) reproduction finished, from its run store's index."""
    proc = subprocess.run(
        [sys.executable, "-m", "symgen.cli", "runs", "ls", "--json", "--out", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return []
    return [
        (
            r["experiment"],
            r["seconds"],
            f"{r['status']}" + (f", {r['passed']}/{r['total']}" if r.get("total") is not None else ""),
        )
        for r in json.loads(proc.stdout or "[]")
    ]


def reproduce(timeout: float) -> dict | None:
    """`symgen reproduce --quick --json` in a temporary store, stopped after ``timeout`` seconds (None then)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "symgen.cli", "reproduce", "--quick", "--json", "--out", tmp]
        print(f"claims gate: {' '.join(cmd[2:])} (time limit {timeout:g} s)", file=sys.stderr, flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the reproduction and any pool workers it started
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            print(
                f"claims gate FAILED: `symgen reproduce --quick` did not finish within {timeout:g} s; "
                "experiments finished before it was stopped:",
                file=sys.stderr,
            )
            print(times_table(_store_times(tmp)) or "  none", file=sys.stderr)
            return None
        if proc.returncode != 0:
            print(
                f"claims gate FAILED: reproduce exited with code {proc.returncode} after {time.time() - t0:.0f} s",
                file=sys.stderr,
            )
            print(times_table(_store_times(tmp)), file=sys.stderr)
            return None
        return json.loads(stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default="README.md")
    ap.add_argument(
        "--summary",
        help="reproduce.json (or `symgen reproduce --json` output) to check; "
        "default: run `symgen reproduce --quick --json` now",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="seconds the reproduction may take before the gate stops it and fails (default 1200)",
    )
    args = ap.parse_args(argv)
    readme = readme_verdicts(Path(args.readme).read_text())
    if args.summary:
        summary = json.loads(Path(args.summary).read_text())
    else:
        summary = reproduce(args.timeout)
        if summary is None:
            return 1
    if any("seconds" in e for e in summary["experiments"]):
        rows = [
            (e["name"], e.get("seconds"), f"{sum(bool(c['passed']) for c in e['claims'])}/{len(e['claims'])}")
            for e in summary["experiments"]
        ]
        total = summary.get("seconds")
        print("claims gate: time per experiment" + (f" (total {total:.1f} s)" if total is not None else ""))
        print(times_table(rows))
    heads = margins(summary)
    diffs = compare(readme, run_verdicts(summary), heads)
    close = [f"  {k[0]}: {k[1]}: {describe_margin(h)}" for k, h in heads.items() if tiny(h)]
    if close:
        print("claims gate: claims within round-off of their threshold (a verdict here may differ on another CPU):")
        print("\n".join(close))
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

"""``symgen runs ls|show|compare|repair`` (inspect and mend the run store) and ``symgen report`` (rewrite a run's
page). A run that is not ``done`` is shown with its settings and state; its report is refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from symgen.cli_common import JsonOpt, OutOpt, emit, say

__all__ = ["runs_app", "runs_ls", "runs_show", "runs_compare", "runs_repair", "report"]

runs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect the run store.")


@runs_app.command("ls")
def runs_ls(
    out: Path = OutOpt, experiment: str | None = typer.Option(None, "--experiment"), as_json: bool = JsonOpt
) -> None:
    """List runs in their true state: done, running, interrupted, failed, incomplete or missing (an audit's model
    and data under `subject`; why a run stopped, or what is damaged, under `note`)."""
    from symgen.runs import RunStore
    from symgen.terminal import text_table

    rows = RunStore(out).list(experiment)
    if as_json:
        emit(rows)
        return
    table = []
    for r in rows:
        claims = f"{r['passed']}/{r['total']}" if r["total"] is not None else "-"
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        table.append(
            (
                r["id"],
                r["experiment"],
                r.get("subject") or "-",
                r["created"],
                r["status"],
                claims,
                secs,
                r["path"],
                r.get("note") or "-",
            )
        )
    say(text_table(["id", "experiment", "subject", "created", "status", "claims", "seconds", "path", "note"], table))


@runs_app.command("show")
def runs_show(run_ref: str = typer.Argument(..., metavar="RUN"), out: Path = OutOpt, as_json: bool = JsonOpt) -> None:
    """Show a run's settings and claims (an audit run: its numbers)."""
    import yaml

    from symgen.cli_audit import audit_lines
    from symgen.runs import RunStore
    from symgen.terminal import claim_lines

    store = RunStore(out)
    run = store.get(run_ref)
    row = store.readable(run)
    meta = run.read_config()
    if row["status"] != "done":  # no claims yet (or damaged ones): its settings and its state
        if as_json:
            emit({**row, "config": meta})
            return
        say(yaml.safe_dump(meta, sort_keys=False).rstrip())
        say(_state_line(row, meta, store.root))
        return
    is_audit = meta.get("experiment") == "audit"
    body = run.read_json("audit.json") if is_audit else run.read_json("claims.json")
    if as_json:
        emit({**row, "config": meta, ("audit" if is_audit else "claims"): body})
        return
    say(yaml.safe_dump(meta, sort_keys=False).rstrip())
    say(audit_lines(body) if is_audit else claim_lines(body, run.path.name))
    say(f"report: {run.path / 'report.html'}")


def _state_line(row: dict[str, Any], meta: dict[str, Any], root: Path) -> str:
    """A run that is not done, in one line: its state, why, and what to do."""
    note = f" ({row['note']})" if row.get("note") else ""
    exp = meta.get("experiment", row.get("experiment"))
    if row["status"] in ("interrupted", "incomplete"):
        return (
            f"status: {row['status']}{note}; no report yet. Continue with: "
            f"symgen run {exp} --resume-from {row['id']} --out {root}"
        )
    return f"status: {row['status']}{note}; no report."


@runs_app.command("compare")
def runs_compare(
    run_refs: list[str] = typer.Argument(..., metavar="RUN..."), out: Path = OutOpt, as_json: bool = JsonOpt
) -> None:
    """Compare several runs side by side: claims (verdict and headline number), or an audit's numbers."""
    from symgen.runs import RunStore
    from symgen.terminal import claim_headline, format_value, text_table

    store = RunStore(out)
    runs = [store.get(r) for r in run_refs]
    table: dict[str, list[str]] = {}
    for i, run in enumerate(runs):
        if (run.path / "audit.json").exists():
            for sname, sec in run.read_json("audit.json")["sections"].items():
                for metric, est in sec["values"].items():
                    err = "" if est["stderr"] is None else f" ± {format_value(est['stderr'], 2)}"
                    row = table.setdefault(f"{sname}.{metric}", ["-"] * len(runs))
                    row[i] = f"{format_value(est['value'], 4)}{err}"
            continue
        for c in run.read_json("claims.json"):
            h = claim_headline(c)
            row = table.setdefault(c["id"], ["-"] * len(runs))
            num = "" if h["measured"] is None else f"{h['key']}={format_value(h['measured'], 3)} "
            row[i] = f"{num}{'PASS' if c['passed'] else 'FAIL'}"
    if as_json:
        emit({"runs": [r.id for r in runs], "rows": table})
        return
    say(text_table(["claim / metric", *[r.id for r in runs]], [(k, *v) for k, v in table.items()]))


@runs_app.command("repair")
def runs_repair(out: Path = OutOpt, as_json: bool = JsonOpt) -> None:
    """Rebuild the run index from the run directories (they are the truth): a damaged index is set aside
    (index.sqlite.corrupt-<time>), deleted runs are dropped, half-created directories removed."""
    from symgen.runs import RunStore

    done = RunStore(out).repair()
    if as_json:
        emit(done)
        return
    states = ", ".join(f"{n} {s}" for s, n in sorted(done["runs"].items())) or "no runs"
    say(f"rebuilt {done['index']} from the run directories: {states}.")
    if done["damage"]:
        say(f"the index was {done['damage']}; set aside as {done['set_aside']}.")
    if done["dropped"]:
        say(f"dropped the runs whose directory is gone: {', '.join(done['dropped'])}.")
    if done["removed"]:
        say(f"removed half-created directories: {', '.join(done['removed'])}.")


def report(run_ref: str = typer.Argument(..., metavar="RUN"), out: Path = OutOpt) -> None:
    """(Re)write a run's report.html (the audit page for an audit run) and print its path."""
    from symgen.errors import SymgenError
    from symgen.runs import RunStore, write_report

    store = RunStore(out)
    run = store.get(run_ref)
    row = store.readable(run)
    if row["status"] != "done":
        note = f" ({row['note']})" if row.get("note") else ""
        fix = (
            f"; resume it: `symgen run {row['experiment']} --resume-from {run.id} --out {store.root}`"
            if row["status"] in ("interrupted", "incomplete")
            else ""
        )
        raise SymgenError(f"run {run.id} ({run.path}) is {row['status']}{note}: it has no claims to report{fix}.")
    say(str(write_report(run)))

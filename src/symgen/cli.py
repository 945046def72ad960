"""The ``symgen`` command line: list, run, reproduce, audit, runs ls|show|compare|repair, report.

A :class:`SymgenError` or a usage error prints one line and exits 2; Ctrl-C or SIGTERM exits 130
(the run is marked interrupted, ``--resume`` continues it); a closed output pipe (``| head``) exits
141 quietly (128 + SIGPIPE, as a shell reports it; the run is interrupted); an internal error exits 1. Nothing a
user types back (names, ids, paths, commands) is ever shortened; ``--json`` prints one JSON
document on stdout (progress stays on stderr).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

from symgen.cli_audit import audit
from symgen.cli_common import SEED_HELP, JsonOpt, OutOpt, say
from symgen.cli_common import check_device as _check_device
from symgen.cli_common import emit as _emit
from symgen.cli_runs import report, runs_app
from symgen.errors import ConfigError, SymgenError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="symgen: symmetry and flatness in deep learning, with numbers.",
)
app.add_typer(runs_app, name="runs")


class _PipeClosed(Exception):
    """The reader of stdout went away (``| head``): exit 141 quietly."""


def _run_one(
    name: str,
    *,
    quick: bool,
    config: Path | None,
    sets: list[str],
    out: Path,
    seed: int | None,
    device: str | None,
    executor: str,
    workers: int | None,
    ray_address: str | None,
    resume: bool,
    resume_from: str | None,
    as_json: bool,
) -> dict[str, Any]:
    from symgen.experiments import get_experiment
    from symgen.runs import RunDir, RunStore, execute, load_run_config, make_executor
    from symgen.terminal import claim_lines

    exp = get_experiment(name)
    log = (lambda t: say(t, err=True)) if as_json else say
    store = RunStore(out)
    previous = None
    if resume_from is not None:
        previous = store.get(resume_from)
        row = store.readable(previous)
        if row["experiment"] != name:
            raise ConfigError(
                f"run {previous.id} is a run of {row['experiment']}, not {name}; "
                f"`symgen run {row['experiment']} --resume-from {previous.id}`."
            )
        if row["status"] == "running":
            from symgen.runs.locks import LOCK_NAME, read_lock

            holder = read_lock(previous.path / LOCK_NAME)
            who = holder.describe() if holder is not None else f"pid {row.get('pid')} on {row.get('host')}"
            raise ConfigError(
                f"run {previous.id} is still running ({who}); two processes cannot write one run. "
                "Wait for it, or stop it, then resume it."
            )
        if row["status"] not in ("interrupted", "incomplete"):
            raise ConfigError(
                f"run {previous.id} is {row['status']}; only an interrupted run can be resumed. "
                f"Start a new one: `symgen run {name}`."
            )
        cfg, quick = load_run_config(previous, exp)
    else:
        cfg = _build_config(exp, quick=quick, config=config, sets=sets, seed=seed, device=device)
        if resume:
            previous = store.resumable(name, cfg)
            if previous is None:
                others = [r["id"] for r in store.list(name) if r["status"] == "interrupted"]
                hint = (
                    f" Interrupted runs with other settings: {', '.join(others)} (`--resume-from ID`)."
                    if others
                    else ""
                )
                log(f"no interrupted run of {name} with these settings under {out}; starting a new one.{hint}")
    _check_device(cfg.device)
    if previous is not None:
        log(f"resuming {previous.path}")
    log(f"== {name}" + (" (quick settings)" if quick else ""))
    started: list[RunDir] = []
    try:
        outcome = execute(
            exp,
            cfg,
            store,
            quick=quick,
            resume=previous,
            executor=make_executor(executor, workers, ray_address),
            on_run=started.append,
        )
    except (KeyboardInterrupt, SymgenError, BrokenPipeError) as e:
        if started and store.row(started[0])["status"] == "interrupted":  # this run, not the latest of the store
            say("interrupted; finished trials are kept. Continue with:", err=True)
            say(f"  symgen run {name} --resume-from {started[0].id} --out {out}", err=True)
        if isinstance(e, BrokenPipeError):
            raise _PipeClosed from None  # click would turn an OSError into exit 1
        raise
    claims = [c.model_dump() for c in outcome.claims]
    reused = f", {outcome.trials_reused} trials resumed" if outcome.trials_reused else ""
    if not as_json:
        say(claim_lines(claims, f"{name} ({outcome.seconds:.1f} s{reused})"))
        say(f"report: {outcome.run.path / 'report.html'}")
    return {
        "experiment": name,
        "run": outcome.run.id,
        "path": str(outcome.run.path),
        "report": str(outcome.run.path / "report.html"),
        "seconds": outcome.seconds,
        "quick": quick,
        "seed": cfg.seed,
        "trials_reused": outcome.trials_reused,
        "claims": claims,
        "passed": sum(bool(c["passed"]) for c in claims),
    }


def _build_config(
    exp: Any, *, quick: bool, config: Path | None, sets: list[str], seed: int | None, device: str | None
) -> Any:
    """The run's config; a config file that is not plain YAML (a ``!!python`` tag ...) is a ConfigError naming it."""
    import yaml

    from symgen.experiments import build_config

    try:
        return build_config(
            exp.config, quick=exp.quick if quick else None, file=config, sets=sets, seed=seed, device=device
        )
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(
            f"config file {config} is not plain YAML{where}: {problem}; only keys and plain values are read."
        ) from None


@app.command("list")
def list_cmd(as_json: bool = JsonOpt) -> None:
    """List the registered experiments and the claim ids each run reports (specified in docs/claims.md)."""
    from symgen.experiments import list_experiments
    from symgen.terminal import text_table

    exps = list_experiments()
    if as_json:
        _emit([{"name": e.name, "claims": list(e.claims), "paper": e.paper, "title": e.title} for e in exps])
        return
    say(
        text_table(["name", "claims", "paper", "title"], [(e.name, " ".join(e.claims), e.paper, e.title) for e in exps])
    )
    say("what each claim checks, its threshold and where that comes from: docs/claims.md")


@app.command()
def run(
    experiment: str = typer.Argument(..., help="Experiment name (see `symgen list`)."),
    quick: bool = typer.Option(False, "--quick", help="CPU-sized settings."),
    full: bool = typer.Option(False, "--full", help="Full settings (the default when --quick is absent)."),
    config: Path | None = typer.Option(None, "--config", help="YAML file of config keys."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: key=value (repeatable)."),
    out: Path = OutOpt,
    seed: int | None = typer.Option(None, "--seed", help=SEED_HELP),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    executor: str = typer.Option("inprocess", "--executor", help="inprocess, pool or ray."),
    workers: int | None = typer.Option(None, "--workers", help="Processes for --executor pool."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (ray start --head)."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Resume the latest interrupted run of this experiment with the same settings (finished trials are kept).",
    ),
    resume_from: str | None = typer.Option(
        None, "--resume-from", metavar="RUN", help="Resume this interrupted run (id), with its stored settings."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Run one experiment into the run store; print one line per claim and the report's path."""
    if quick and full:
        raise ConfigError("--quick and --full exclude each other; pass one.")
    if device is not None:
        _check_device(device)  # before the run store is touched
    res = _run_one(
        experiment,
        quick=quick,
        config=config,
        sets=set_,
        out=out,
        seed=seed,
        device=device,
        executor=executor,
        workers=workers,
        ray_address=ray_address,
        resume=resume,
        resume_from=resume_from,
        as_json=as_json,
    )
    if as_json:
        _emit(res)


def _environment() -> tuple[dict[str, Any], dict[str, Any]]:
    import os
    import platform

    import numpy
    import torch

    import symgen

    machine = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    versions = {
        "symgen": getattr(symgen, "__version__", "?"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    return machine, versions


@app.command()
def reproduce(
    quick: bool = typer.Option(False, "--quick", help="CPU-sized settings for every experiment."),
    full: bool = typer.Option(False, "--full", help="Full settings (the default when --quick is absent)."),
    only: list[str] = typer.Option([], "--only", help="Restrict to these experiments (repeatable)."),
    out: Path = OutOpt,
    seed: int | None = typer.Option(None, "--seed", help=SEED_HELP + " Applies to every experiment."),
    device: str | None = typer.Option(None, "--device"),
    executor: str = typer.Option("inprocess", "--executor"),
    workers: int | None = typer.Option(None, "--workers"),
    ray_address: str | None = typer.Option(None, "--ray-address"),
    as_json: bool = JsonOpt,
) -> None:
    """Run every registered experiment; print all claims and write OUT/index.html, one page for all of them."""
    from symgen.experiments import REGISTRY, get_experiment
    from symgen.io import atomic_write
    from symgen.report import render_index
    from symgen.terminal import claim_lines, text_table

    if quick and full:
        raise ConfigError("--quick and --full exclude each other; pass one.")
    names = list(only) or list(REGISTRY)
    for name in names:
        get_experiment(name)  # an unknown name fails before anything runs
    if device is not None:
        _check_device(device)  # so does a device this machine lacks
    log = (lambda t: say(t, err=True)) if as_json else say
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.time()
    results = []
    for i, name in enumerate(names):
        log(f"[{i + 1}/{len(names)}] {name}")
        results.append(
            _run_one(
                name,
                quick=quick,
                config=None,
                sets=[],
                out=out,
                seed=seed,
                device=device,
                executor=executor,
                workers=workers,
                ray_address=ray_address,
                resume=False,
                resume_from=None,
                as_json=as_json,
            )
        )
    machine, versions = _environment()
    summary = {
        "started": started,
        "seconds": time.time() - t0,
        "settings": "quick" if quick else "full",
        "seed": seed if seed is not None else "config default (0)",
        "machine": machine,
        "versions": versions,
        "experiments": [
            {
                "name": r["experiment"],
                "run": r["run"],
                "seconds": r["seconds"],
                "report": str(Path(r["path"]).name + "/report.html"),
                "passed": r["passed"],
                "claims": r["claims"],
            }
            for r in results
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "reproduce.json", json.dumps(summary, indent=2, default=str) + "\n")
    page = atomic_write(out / "index.html", render_index(summary))
    page.chmod(0o644)
    (out / "reproduce.json").chmod(0o644)
    if as_json:
        _emit({**summary, "index": str(page)})
        return
    every = [{**c, "id": f"{r['experiment']}: {c['id']}"} for r in results for c in r["claims"]]
    say()
    say(
        text_table(
            ["experiment", "seconds", "claims passed"],
            [(r["experiment"], f"{r['seconds']:.1f}", f"{r['passed']}/{len(r['claims'])}") for r in results],
        )
    )
    say()
    say(claim_lines(every, f"all claims ({summary['seconds']:.1f} s)"))
    say(f"page: {page}")


app.command()(report)  # symgen.cli_runs
app.command()(audit)  # symgen.cli_audit


def _usage_error_type() -> type[Exception]:
    """The exception typer raises for usage errors: typer >= 0.29 vendors click, older typer uses click."""
    try:
        from typer.exceptions import TyperException

        return TyperException
    except ImportError:  # pragma: no cover - typer < 0.29
        from click.exceptions import ClickException

        return ClickException


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a killed run is marked interrupted (resumable), never left "running"


def main(argv: list[str] | None = None) -> int:
    """Entry point: SymgenError or usage error -> one line on stderr, exit 2; Ctrl-C/SIGTERM -> 130; a closed
    output pipe -> 141.

    Args:
        argv: the arguments (None: the process's).

    Returns:
        The exit code.
    """
    usage_error = _usage_error_type()
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _sigterm)
    try:
        rc = app(args=argv, standalone_mode=False)
    except SymgenError as e:
        say(f"error: {' '.join(str(e).split())}", err=True)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        say("interrupted.", err=True)
        return 130
    except (BrokenPipeError, _PipeClosed):
        _silence_stdout()  # the reader is gone: nothing more to say there, and no error at exit
        return 141
    except typer.Exit as e:
        return e.exit_code
    except usage_error as e:
        e.show()  # type: ignore[attr-defined]
        return int(getattr(e, "exit_code", 2)) or 2
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return rc if isinstance(rc, int) else 0


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _console_main()

"""The ``symgen`` command line: list, run, reproduce, audit, runs ls|show|compare, report.

A :class:`SymgenError` prints its one-line message and exits 2; an internal error exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from symgen.errors import ConfigError, SymgenError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="symgen: symmetry and flatness in deep learning, with numbers.")
runs_app = typer.Typer(no_args_is_help=True, help="Inspect the run store.")
app.add_typer(runs_app, name="runs")

console = Console()
err_console = Console(stderr=True)

OutOpt = typer.Option(Path("runs"), "--out", help="Run store root directory.")


def _claims_table(title: str, claims: list[dict]) -> Table:
    from symgen.report import format_value

    t = Table(title=title, show_lines=False)
    for col in ("claim", "measured", "threshold", "verdict"):
        t.add_column(col, overflow="fold")
    for c in claims:
        verdict = "[green]PASS[/green]" if c["passed"] else "[red]FAIL[/red]"
        t.add_row(c["id"], format_value(c["measured"]), format_value(c["threshold"]), verdict)
    return t


def _run_one(name: str, *, quick: bool, config: Path | None, sets: list[str], out: Path,
             seed: int | None, device: str | None, executor: str, workers: int | None,
             ray_address: str | None, resume: bool) -> list[dict]:
    from symgen.experiments import build_config, get_experiment
    from symgen.runs import RunStore, execute, load_run_config, make_executor

    exp = get_experiment(name)
    store = RunStore(out)
    previous = store.latest_unfinished(name) if resume else None
    if resume and previous is None:
        err_console.print(f"no unfinished run of {name} under {out}; starting a new one.")
    if previous is not None:
        cfg, quick = load_run_config(previous, exp)
        console.print(f"resuming {previous.path}")
    else:
        cfg = build_config(exp.config, quick=exp.quick if quick else None, file=config, sets=sets,
                           seed=seed, device=device)
    _check_device(cfg.device)
    try:
        outcome = execute(exp, cfg, store, quick=quick, executor=make_executor(executor, workers, ray_address),
                          resume=previous)
    except KeyboardInterrupt:
        err_console.print(f"interrupted; finished trials are kept: `symgen run {name} --resume --out {out}`")
        raise
    claims = [c.model_dump() for c in outcome.claims]
    console.print(_claims_table(f"{name} ({outcome.seconds:.1f} s"
                                + (f", {outcome.trials_reused} trials resumed" if outcome.trials_reused else "")
                                + ")", claims))
    console.print(f"report: {outcome.run.path / 'report.html'}")
    return claims


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but this PyTorch has no CUDA device; use --device cpu.")
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device '{device}'; use cpu, cuda or cuda:N.") from None


@app.command("list")
def list_cmd() -> None:
    """List the registered experiments and the claims they check."""
    from symgen.experiments import list_experiments

    t = Table(title="experiments")
    for col in ("name", "claims", "paper", "title"):
        t.add_column(col)
    for e in list_experiments():
        t.add_row(e.name, " ".join(e.claims), e.paper, e.title)
    console.print(t)


@app.command()
def run(
    experiment: str = typer.Argument(..., help="Experiment name (see `symgen list`)."),
    quick: bool = typer.Option(False, "--quick", help="CPU-sized settings."),
    config: Path | None = typer.Option(None, "--config", help="YAML file of config keys."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: key=value (repeatable)."),
    out: Path = OutOpt,
    seed: int | None = typer.Option(None, "--seed"),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    executor: str = typer.Option("inprocess", "--executor", help="inprocess, pool or ray."),
    workers: int | None = typer.Option(None, "--workers", help="Processes for --executor pool."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (ray start --head)."),
    resume: bool = typer.Option(False, "--resume", help="Resume the latest unfinished run of this experiment."),
) -> None:
    """Run one experiment into the run store; print its claims table and report path."""
    claims = _run_one(experiment, quick=quick, config=config, sets=set_, out=out, seed=seed, device=device,
                      executor=executor, workers=workers, ray_address=ray_address, resume=resume)
    del claims


@app.command()
def reproduce(
    quick: bool = typer.Option(False, "--quick", help="CPU-sized settings for every experiment."),
    full: bool = typer.Option(False, "--full", help="Full settings (the default when --quick is absent)."),
    only: list[str] = typer.Option([], "--only", help="Restrict to these experiments (repeatable)."),
    out: Path = OutOpt,
    seed: int | None = typer.Option(None, "--seed"),
    device: str | None = typer.Option(None, "--device"),
    executor: str = typer.Option("inprocess", "--executor"),
    workers: int | None = typer.Option(None, "--workers"),
    ray_address: str | None = typer.Option(None, "--ray-address"),
) -> None:
    """Run every registered experiment and print one table of all claims."""
    from symgen.experiments import REGISTRY

    if quick and full:
        raise ConfigError("--quick and --full exclude each other; pass one.")
    names = list(only) or list(REGISTRY)
    summary = []
    for name in names:
        console.rule(name)
        for c in _run_one(name, quick=quick, config=None, sets=[], out=out, seed=seed, device=device,
                          executor=executor, workers=workers, ray_address=ray_address, resume=False):
            summary.append({**c, "id": f"{name}: {c['id']}"})
    console.rule("all claims")
    console.print(_claims_table(f"{sum(c['passed'] for c in summary)}/{len(summary)} claims pass", summary))


@runs_app.command("ls")
def runs_ls(out: Path = OutOpt, experiment: str | None = typer.Option(None, "--experiment")) -> None:
    """List runs."""
    from symgen.runs import RunStore

    t = Table()
    for col in ("id", "experiment", "created", "status", "claims", "seconds", "path"):
        t.add_column(col)
    for r in RunStore(out).list(experiment):
        claims = f"{r['passed']}/{r['total']}" if r["total"] is not None else "-"
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        t.add_row(r["id"], r["experiment"], r["created"], r["status"], claims, secs, r["path"])
    console.print(t)


@runs_app.command("show")
def runs_show(run_ref: str = typer.Argument(..., metavar="RUN"), out: Path = OutOpt) -> None:
    """Show a run's config and claims."""
    from symgen.runs import RunStore

    run = RunStore(out).get(run_ref)
    console.print((run.path / "config.yaml").read_text())
    console.print(_claims_table(run.path.name, run.read_json("claims.json")))
    console.print(f"report: {run.path / 'report.html'}")


@runs_app.command("compare")
def runs_compare(run_refs: list[str] = typer.Argument(..., metavar="RUN..."), out: Path = OutOpt) -> None:
    """Compare the claims of several runs side by side."""
    from symgen.report import format_value
    from symgen.runs import RunStore

    store = RunStore(out)
    runs = [store.get(r) for r in run_refs]
    table: dict[str, list[str]] = {}
    for i, run in enumerate(runs):
        for c in run.read_json("claims.json"):
            row = table.setdefault(c["id"], ["-"] * len(runs))
            row[i] = f"{format_value(c['measured'])} ({'PASS' if c['passed'] else 'FAIL'})"
    t = Table()
    t.add_column("claim")
    for run in runs:
        t.add_column(run.id)
    for cid, row in table.items():
        t.add_row(cid, *row)
    console.print(t)


@app.command()
def report(run_ref: str = typer.Argument(..., metavar="RUN"), out: Path = OutOpt) -> None:
    """(Re)write a run's report.html and print its path."""
    from symgen.report import write_report
    from symgen.runs import RunStore

    console.print(str(write_report(RunStore(out).get(run_ref))))


@app.command()
def audit(
    model: str = typer.Option(..., "--model", help="MODULE:FACTORY (a dotted module or path/to/file.py) "
                                                   "whose FACTORY() returns the nn.Module; literal arguments "
                                                   "may follow: 'pkg.mod:build(\"cnn\", width=8)'."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="State-dict file to load into the model."),
    data: str = typer.Option(..., "--data", help="Dataset: digits, mnist1d, mnist, fashion-mnist, cifar10."),
    root: Path | None = typer.Option(None, "--root", help="Directory with the dataset files (mnist, cifar10)."),
    action: str = typer.Option("none", "--action", help="Group action for invariance: c4, d4, shift or none."),
    budget: str = typer.Option("quick", "--budget", help="quick (about a minute on CPU) or full."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    seed: int = typer.Option(0, "--seed", help="Seed of subsamples, probes and noise draws."),
    set_: list[str] = typer.Option([], "--set", help="Override a budget limit: key=value, e.g. ntk_samples=100 "
                                                    "(repeatable; see symgen.audit.AuditLimits)."),
    out: Path = OutOpt,
) -> None:
    """Audit a trained model: accuracy, invariance, scale symmetries, curvature, noise stability, NTK, PGD."""
    import yaml

    from symgen.runs import run_audit

    if device is not None:
        _check_device(device)
    limits = {}
    for item in set_:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        try:
            limits[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value '{raw}': {e}") from None
    with console.status("auditing") as status:
        result, run = run_audit(model, data, checkpoint=checkpoint, action=action, budget=budget, root=root,
                                device=device, seed=seed, out=out, limits=limits,
                                progress=lambda title: status.update(f"auditing: {title}"))
    t = Table(title=f"audit of {result.model} on {result.data} ({result.seconds:.1f} s, budget {budget})")
    for col in ("section", "metric", "value", "stderr", "seconds"):
        t.add_column(col, overflow="fold")
    for name, sec in result.sections.items():
        if sec.status != "ok":
            t.add_row(name, f"[yellow]{sec.status}[/yellow]", "; ".join(sec.skipped)[:200], "", f"{sec.seconds:.1f}")
            continue
        for i, (metric, est) in enumerate(sec.values.items()):
            t.add_row(name if i == 0 else "", metric, f"{est.value:.4g}",
                      "-" if est.stderr is None else f"{est.stderr:.2g}", f"{sec.seconds:.1f}" if i == 0 else "")
    console.print(t)
    console.print(f"report: {run.path / 'report.html'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: SymgenError -> message on stderr, exit 2; internal error -> traceback, exit 1."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except SymgenError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted; resume with --resume")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click usage errors and friends
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort):
            return 130
        raise
    return rc if isinstance(rc, int) else 0


def _console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _console_main()

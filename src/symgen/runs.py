"""The run store: run directories with atomic writes, a SQLite index, trial caching and executors;
audits stored as runs.

``runs/<time>-<experiment>-<id>/`` holds ``config.yaml``, ``metrics.jsonl``, ``result.json``,
``claims.json``, ``figures/*.png``, ``report.html`` and ``trials/`` (one JSON per finished trial:
the checkpoints that ``--resume`` restarts from). ``runs/index.sqlite`` lists every run.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from symgen.errors import ConfigError, SymgenError
from symgen.experiments.base import (
    Claim,
    Context,
    Experiment,
    ExperimentConfig,
    jsonable,
    num_threads,
    trial_key,
)
from symgen.io import atomic_write

if TYPE_CHECKING:
    from symgen.audit import AuditResult

__all__ = [
    "RunDir",
    "RunStore",
    "RunContext",
    "Executor",
    "InProcessExecutor",
    "PoolExecutor",
    "RayExecutor",
    "make_executor",
    "RunOutcome",
    "execute",
    "AuditConfig",
    "run_audit",
    "write_audit_run",
]


class RunDir:
    """One run's directory."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name.rsplit("-", 1)[-1]

    @property
    def figures_dir(self) -> Path:
        d = self.path / "figures"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        atomic_write(target, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")
        return target

    def read_json(self, name: str) -> Any:
        target = self.path / name
        if not target.exists():
            raise SymgenError(f"{target} does not exist; the run has not written it (did it finish?).")
        return json.loads(target.read_text())

    def write_yaml(self, name: str, obj: Any) -> Path:
        target = self.path / name
        atomic_write(target, yaml.safe_dump(jsonable(obj), sort_keys=False))
        return target

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(jsonable(record)) + "\n"
        with open(self.path / "metrics.jsonl", "a") as f:  # one short line per write: append is atomic enough
            f.write(line)

    def trial_path(self, key: str) -> Path:
        return self.path / "trials" / f"{key}.json"


class RunStore:
    """Run directories under ``root`` and their SQLite index."""

    def __init__(self, root: str | Path = "runs"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = self.root / "index.sqlite"
        with self._db() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS runs (
                id TEXT PRIMARY KEY, experiment TEXT, created TEXT, status TEXT, path TEXT,
                passed INTEGER, total INTEGER, seconds REAL, quick INTEGER)""")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.index, timeout=30)

    def create(self, experiment: str, config: ExperimentConfig, quick: bool) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = RunDir(self.root / f"{stamp}-{experiment}-{secrets.token_hex(3)}")
        run.path.mkdir(parents=True)
        run.write_yaml("config.yaml", {"experiment": experiment, "quick": quick, "config": config.model_dump()})
        self.record(run, experiment, status="running", quick=quick)
        return run

    def record(self, run: RunDir, experiment: str, status: str, quick: bool | None = None,
               passed: int | None = None, total: int | None = None, seconds: float | None = None) -> None:
        with self._db() as db:
            db.execute("""INSERT INTO runs (id, experiment, created, status, path, passed, total, seconds, quick)
                          VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                          ON CONFLICT(id) DO UPDATE SET status=excluded.status,
                            passed=COALESCE(excluded.passed, passed), total=COALESCE(excluded.total, total),
                            seconds=COALESCE(excluded.seconds, seconds), quick=COALESCE(excluded.quick, quick)""",
                       (run.id, experiment, time.strftime("%Y-%m-%d %H:%M:%S"), status, str(run.path),
                        passed, total, seconds, None if quick is None else int(quick)))

    def list(self, experiment: str | None = None) -> list[dict[str, Any]]:
        with self._db() as db:
            db.row_factory = sqlite3.Row
            q, args = "SELECT * FROM runs", ()
            if experiment:
                q, args = q + " WHERE experiment = ?", (experiment,)
            return [dict(r) for r in db.execute(q + " ORDER BY path", args)]

    def get(self, ref: str) -> RunDir:
        """A run by id, id prefix, directory name or path."""
        p = Path(ref)
        if p.is_dir() and (p / "config.yaml").exists():
            return RunDir(p)
        rows = [r for r in self.list() if r["id"].startswith(ref) or Path(r["path"]).name == ref]
        if len(rows) == 1:
            return RunDir(Path(rows[0]["path"]))
        if not rows:
            raise SymgenError(f"no run '{ref}' in {self.root}; `symgen runs ls --out {self.root}` lists them.")
        raise SymgenError(f"run reference '{ref}' is ambiguous ({len(rows)} runs); give more of the id.")

    def latest_unfinished(self, experiment: str) -> RunDir | None:
        rows = [r for r in self.list(experiment) if r["status"] != "done"]
        return RunDir(Path(rows[-1]["path"])) if rows else None


# ----------------------------------------------------------------------------------- executors

class Executor:
    """Runs trial functions; yields ``(index, result)`` as trials finish."""

    name = "inprocess"

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            yield i, fn(item)

    def close(self) -> None:
        pass


class InProcessExecutor(Executor):
    """Trials one after another in this process (the default; deterministic, no pickling)."""


class PoolExecutor(Executor):
    """Trials in a local process pool (spawned workers, each limited to one BLAS thread)."""

    name = "pool"

    def __init__(self, workers: int | None = None):
        import multiprocessing as mp

        self.workers = workers or max(1, (os.cpu_count() or 2))
        self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                         initializer=num_threads, initargs=(1,))

    def imap(self, fn, items):
        futures = {self._pool.submit(fn, item): i for i, item in enumerate(items)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class RayExecutor(Executor):
    """Trials as Ray tasks on a cluster (``ray start --head``; extra ``symgen[ray]``)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus_per_trial: float = 1.0):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'symgen[ray]'.") from None
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        self._cpus = num_cpus_per_trial

    def imap(self, fn, items):
        ray = self._ray
        remote = ray.remote(num_cpus=self._cpus)(fn)
        refs = {remote.remote(item): i for i, item in enumerate(items)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield refs[done[0]], ray.get(done[0])


def make_executor(name: str = "inprocess", workers: int | None = None, ray_address: str | None = None) -> Executor:
    if name == "inprocess":
        return InProcessExecutor()
    if name == "pool":
        return PoolExecutor(workers)
    if name == "ray":
        return RayExecutor(ray_address)
    raise ConfigError(f"unknown executor '{name}'; choose inprocess, pool or ray.")


# ----------------------------------------------------------------------------------- context

class RunContext(Context):
    """Context backed by a run directory: trial results cached on disk, metrics logged, progress shown."""

    def __init__(self, run: RunDir, executor: Executor, device: str = "cpu", show_progress: bool = True):
        self.run, self.executor, self.device = run, executor, device
        self.show_progress = show_progress and sys.stderr.isatty()
        self.trials_reused = 0

    def map(self, fn, items, desc="trials"):
        items = list(items)
        keys = [trial_key(fn, item) for item in items]
        results: list[Any] = [None] * len(items)
        todo = []
        for i, key in enumerate(keys):
            path = self.run.trial_path(key)
            if path.exists():
                results[i] = json.loads(path.read_text())["result"]
                self.trials_reused += 1
            else:
                todo.append(i)
        stream = self.executor.imap(fn, [items[i] for i in todo])
        for j, result in self.progress(stream, desc=desc, total=len(todo)):
            i = todo[j]
            results[i] = jsonable(result)
            atomic_write(self.run.trial_path(keys[i]),
                         json.dumps({"fn": f"{fn.__module__}.{fn.__qualname__}", "item": jsonable(items[i]),
                                     "result": results[i]}))
        return results

    def log(self, **metrics):
        self.run.append_metrics({"time": time.time(), **metrics})

    def progress(self, iterable, desc="", total=None):
        if not self.show_progress:
            yield from iterable
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task(desc, total=total)
            for item in iterable:
                yield item
                bar.advance(task)


# ----------------------------------------------------------------------------------- execution

@dataclass
class RunOutcome:
    run: RunDir
    claims: list[Claim]
    result: dict[str, Any]
    seconds: float
    trials_reused: int


def execute(experiment: Experiment, config: ExperimentConfig, store: RunStore, *, quick: bool = False,
            executor: Executor | None = None, resume: RunDir | None = None,
            show_progress: bool = True) -> RunOutcome:
    """Run ``experiment`` under ``config`` into a new run directory (or ``resume`` an unfinished one)."""
    from symgen.report import write_report

    run = resume if resume is not None else store.create(experiment.name, config, quick)
    if resume is not None:
        store.record(run, experiment.name, status="running")
    executor = executor or InProcessExecutor()
    ctx = RunContext(run, executor, device=config.device, show_progress=show_progress)
    start = time.time()
    try:
        result = experiment.run(config, ctx)
        result = jsonable(result)
        run.write_json("result.json", result)
        claims = experiment.check_claims(config, result)
        run.write_json("claims.json", [c.model_dump() for c in claims])
        if experiment.figures is not None:
            experiment.figures(result, run.figures_dir)
        seconds = time.time() - start
        write_report(run)
    except BaseException:
        store.record(run, experiment.name, status="interrupted", seconds=time.time() - start)
        raise
    finally:
        executor.close()
    store.record(run, experiment.name, status="done", passed=sum(c.passed for c in claims),
                 total=len(claims), seconds=seconds)
    return RunOutcome(run, claims, result, seconds, ctx.trials_reused)


def load_run_config(run: RunDir, experiment: Experiment) -> tuple[ExperimentConfig, bool]:
    """The config (and quick flag) a run was started with, for ``--resume``."""
    meta = yaml.safe_load((run.path / "config.yaml").read_text())
    return experiment.config(**meta["config"]), bool(meta.get("quick"))


def iter_claims(run: RunDir) -> Iterable[dict[str, Any]]:
    return run.read_json("claims.json")


# ----------------------------------------------------------------------------------- audits

class AuditConfig(ExperimentConfig):
    """The settings of an audit run, as its ``config.yaml`` holds them."""

    model: str
    checkpoint: str | None = None
    data: str
    root: str | None = None
    action: str = "none"
    budget: str = "quick"
    limits: dict[str, Any] = {}


def run_audit(model: str, data: str, *, checkpoint: str | Path | None = None, action: str = "none",
              budget: str = "quick", root: str | Path | None = None, device: str | None = None, seed: int = 0,
              out: str | Path = "runs", limits: dict[str, Any] | None = None,
              progress: Callable[[str], None] | None = None) -> tuple[AuditResult, RunDir]:
    """Load ``model`` (``MODULE:FACTORY``) and ``checkpoint``, audit it, and write a run directory under ``out``
    (what ``symgen audit`` does).

    The run directory (indexed in ``out/index.sqlite`` as experiment ``audit``) is created before
    the audit starts, so an interrupted audit is recorded as such; it ends with the files of
    :func:`write_audit_run`. ``seed`` is the audit's ``generator``. Returns ``(result, run)``.
    """
    from pydantic import ValidationError

    from symgen.audit import ACTIONS, audit, load_model, resolve_limits

    if action not in ACTIONS:
        raise ConfigError(f"unknown action '{action}'; choose one of {', '.join(ACTIONS)}.")
    resolve_limits(budget, limits)  # validate before anything is loaded or written
    try:
        cfg = AuditConfig(model=model, checkpoint=None if checkpoint is None else str(checkpoint), data=data,
                          root=None if root is None else str(root), action=action, budget=budget,
                          limits=dict(limits or {}), seed=seed, device=device or "cpu")
    except ValidationError as e:
        raise ConfigError(f"invalid audit settings: {e}") from None
    net = load_model(model, checkpoint, device=cfg.device)
    store = RunStore(out)
    run = store.create("audit", cfg, quick=budget == "quick")
    start = time.time()
    try:
        result = audit(net, data, action, budget=budget, limits=limits, root=root, generator=seed,
                       device=cfg.device, name=model, progress=progress)
        if checkpoint is not None:
            result.model = f"{model} + {Path(checkpoint).name}"
        _write_audit_files(run, result)
    except BaseException:
        store.record(run, "audit", status="interrupted", seconds=time.time() - start)
        raise
    store.record(run, "audit", status="done", seconds=time.time() - start)
    return result, run


def write_audit_run(store: RunStore, result: AuditResult, *, title: str | None = None) -> RunDir:
    """Store an :class:`~symgen.audit.AuditResult` as a new run of ``store`` (experiment ``audit``).

    The run directory holds ``config.yaml`` (the audit's settings), ``audit.json`` (every value),
    ``result.json`` (the report's tables), ``claims.json`` (empty: an audit checks no claims),
    ``figures/*.png`` and ``report.html``.
    """
    cfg = AuditConfig(model=result.model, data=result.data, action=result.action or "none", budget=result.budget,
                      limits=jsonable(result.limits), seed=result.seed, device=result.device)
    run = store.create("audit", cfg, quick=result.budget == "quick")
    try:
        _write_audit_files(run, result, title)
    except BaseException:
        store.record(run, "audit", status="interrupted")
        raise
    store.record(run, "audit", status="done", seconds=result.seconds)
    return run


def _write_audit_files(run: RunDir, result: AuditResult, title: str | None = None) -> Path:
    """``audit.json``, ``figures/*.png``, ``report.html``, ``result.json`` and ``claims.json`` of an audit."""
    from symgen.report import render_page

    data = result.to_dict()
    run.write_json("audit.json", data)
    figs = result.figures(run.path / "figures")
    page = render_page(title or f"symgen audit: {result.model}",
                       subtitle=(f"data {result.data}, action {result.action or 'none'}, budget {result.budget}, "
                                 f"device {result.device}, {result.num_params} parameters, "
                                 f"{result.seconds:.1f} s"),
                       tables=result.report_tables(), figures=figs,
                       config={k: data[k] for k in ("model", "data", "action", "budget", "device", "dtype",
                                                    "seed", "limits")},
                       data_json=data)
    page_path = atomic_write(run.path / "report.html", page)
    run.write_json("result.json", {"tables": result.report_tables()})
    run.write_json("claims.json", [])
    return page_path

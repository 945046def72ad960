"""The run store: run directories with atomic writes, a SQLite index, trial caching and executors;
audits stored as runs.

``runs/<time>-<experiment>-<id>/`` holds ``config.yaml``, ``metrics.jsonl``, ``result.json``,
``claims.json``, ``figures/*.png``, ``report.html`` and ``trials/`` (one JSON per finished trial:
the checkpoints that ``--resume`` restarts from). ``runs/index.sqlite`` lists every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from symgen.errors import ConfigError, SymgenError
from symgen.executors import Executor, InProcessExecutor, PoolExecutor, RayExecutor, make_executor
from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable, trial_key
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
    """Run directories under ``root`` and their SQLite index.

    The index holds each run's directory name, resolved against ``root`` when read: a store can be
    moved or copied and read from any working directory. Status: ``running``, ``done``, ``failed``
    (an error), ``interrupted`` (Ctrl-C, SIGTERM, or a ``running`` run whose process is gone).
    """

    _COLUMNS = {
        "id": "TEXT PRIMARY KEY",
        "experiment": "TEXT",
        "created": "TEXT",
        "status": "TEXT",
        "path": "TEXT",
        "passed": "INTEGER",
        "total": "INTEGER",
        "seconds": "REAL",
        "quick": "INTEGER",
        "config_hash": "TEXT",
        "pid": "INTEGER",
        "host": "TEXT",
        "subject": "TEXT",
    }

    def __init__(self, root: str | Path = "runs"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = self.root / "index.sqlite"
        with self._db() as db:
            cols = ", ".join(f"{k} {v}" for k, v in self._COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
            for k, v in self._COLUMNS.items():  # stores made by older versions gain the new columns
                if k not in have:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {k} {v}")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.index, timeout=30)

    def create(self, experiment: str, config: ExperimentConfig, quick: bool, subject: str = "") -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = RunDir(self.root / f"{stamp}-{experiment}-{secrets.token_hex(3)}")
        run.path.mkdir(parents=True)
        run.write_yaml("config.yaml", {"experiment": experiment, "quick": quick, "config": config.model_dump()})
        self.record(run, experiment, status="running", quick=quick, config_hash=config_hash(config), subject=subject)
        return run

    def record(
        self,
        run: RunDir,
        experiment: str,
        status: str,
        quick: bool | None = None,
        passed: int | None = None,
        total: int | None = None,
        seconds: float | None = None,
        config_hash: str | None = None,
        subject: str | None = None,
    ) -> None:
        with self._db() as db:
            db.execute(
                """INSERT INTO runs (id, experiment, created, status, path, passed, total, seconds, quick,
                                            config_hash, pid, host, subject)
                          VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                          ON CONFLICT(id) DO UPDATE SET status=excluded.status, pid=excluded.pid,
                            host=excluded.host,
                            passed=COALESCE(excluded.passed, passed), total=COALESCE(excluded.total, total),
                            seconds=COALESCE(excluded.seconds, seconds), quick=COALESCE(excluded.quick, quick),
                            config_hash=COALESCE(excluded.config_hash, config_hash),
                            subject=COALESCE(excluded.subject, subject)""",
                (
                    run.id,
                    experiment,
                    time.strftime("%Y-%m-%d %H:%M:%S"),
                    status,
                    run.path.name,
                    passed,
                    total,
                    seconds,
                    None if quick is None else int(quick),
                    config_hash,
                    os.getpid(),
                    socket.gethostname(),
                    subject,
                ),
            )

    def discard(self, run: RunDir) -> None:
        """Remove a run that holds nothing (it failed before its first result) from disk and index."""
        with self._db() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (run.id,))
        shutil.rmtree(run.path, ignore_errors=True)

    def list(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Index rows, oldest first, ``path`` resolved against the store root."""
        with self._db() as db:
            db.row_factory = sqlite3.Row
            q, args = "SELECT rowid AS _order, * FROM runs", ()
            if experiment:
                q, args = q + " WHERE experiment = ?", (experiment,)
            rows = [dict(r) for r in db.execute(q, args)]
        host = socket.gethostname()
        for r in rows:
            r["path"] = str(self.root / Path(r["path"]).name)
            if r["status"] == "running" and r.get("host") == host and r.get("pid") and not _alive(r["pid"]):
                r["status"] = "interrupted"  # its process is gone (killed): resumable like a Ctrl-C
        return sorted(rows, key=lambda r: r.pop("_order"))  # creation order

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

    def row(self, run: RunDir) -> dict[str, Any]:
        rows = [r for r in self.list() if r["id"] == run.id]
        return rows[0] if rows else {"id": run.id, "experiment": "?", "status": "?", "path": str(run.path)}

    def resumable(self, experiment: str, config: ExperimentConfig | None = None) -> RunDir | None:
        """The latest interrupted run of ``experiment`` (with the same config, when given); never a failed
        or finished one."""
        want = None if config is None else config_hash(config)
        rows = [
            r
            for r in self.list(experiment)
            if r["status"] == "interrupted" and (want is None or r.get("config_hash") == want)
        ]
        return RunDir(Path(rows[-1]["path"])) if rows else None

    def latest_unfinished(self, experiment: str) -> RunDir | None:
        return self.resumable(experiment)


def config_hash(config: ExperimentConfig) -> str:
    """The identity of a config for ``--resume`` (the device is not part of it)."""
    data = {k: v for k, v in jsonable(config.model_dump()).items() if k != "device"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def share_mode(root: Path) -> None:
    """Give every file of a run directory the mode a new file gets here (umask), not the 0600 of temp files."""
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(root).rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


# ----------------------------------------------------------------------------------- context


class RunContext(Context):
    """Context backed by a run directory: trial results cached on disk, metrics logged, progress shown."""

    def __init__(self, run: RunDir, executor: Executor, device: str = "cpu", show_progress: bool = True):
        self.run, self.executor, self.device = run, executor, device
        self.show_progress = show_progress
        self.trials_reused = 0
        self.trials_done = 0

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
            atomic_write(
                self.run.trial_path(keys[i]),
                json.dumps(
                    {"fn": f"{fn.__module__}.{fn.__qualname__}", "item": jsonable(items[i]), "result": results[i]}
                ),
            )
            self.trials_done += 1
        return results

    def log(self, **metrics):
        self.run.append_metrics({"time": time.time(), **metrics})

    def progress(self, iterable, desc="", total=None):
        """A rich bar in a terminal, a plain line every few seconds in a pipe (stderr), nothing when disabled."""
        if not self.show_progress:
            yield from iterable
            return
        from symgen.terminal import progress

        yield from progress(iterable, desc=desc, total=total)


# ----------------------------------------------------------------------------------- execution


@dataclass
class RunOutcome:
    run: RunDir
    claims: list[Claim]
    result: dict[str, Any]
    seconds: float
    trials_reused: int


def execute(
    experiment: Experiment,
    config: ExperimentConfig,
    store: RunStore,
    *,
    quick: bool = False,
    executor: Executor | None = None,
    resume: RunDir | None = None,
    show_progress: bool = True,
) -> RunOutcome:
    """Run ``experiment`` under ``config`` into a new run directory (or ``resume`` an interrupted one).

    Ctrl-C (or SIGTERM through the CLI) marks the run ``interrupted``: ``--resume`` continues it. Any
    other error marks it ``failed``; a new run that fails with a :class:`SymgenError` before its first
    trial finished (bad input found at run time) is removed, so it leaves no directory behind.
    """
    if experiment.validate is not None:
        experiment.validate(config)  # checks that need more than the config's types, before anything exists
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
    except (KeyboardInterrupt, SystemExit):
        store.record(run, experiment.name, status="interrupted", seconds=time.time() - start)
        raise
    except BaseException as e:
        empty = resume is None and ctx.trials_done == 0 and not any(run.path.glob("trials/*.json"))
        if isinstance(e, SymgenError) and empty:
            store.discard(run)
        else:
            store.record(run, experiment.name, status="failed", seconds=time.time() - start)
        raise
    finally:
        executor.close()
    share_mode(run.path)
    store.record(
        run, experiment.name, status="done", passed=sum(c.passed for c in claims), total=len(claims), seconds=seconds
    )
    return RunOutcome(run, claims, result, seconds, ctx.trials_reused)


def write_report(run: RunDir) -> Path:
    """(Re)write a run's ``report.html``: the audit page for an audit run, the claims page otherwise."""
    from symgen.report import write_report as write_claims_report

    meta = yaml.safe_load((run.path / "config.yaml").read_text())
    if meta.get("experiment") == "audit" and (run.path / "audit.json").exists():
        from symgen.audit import AuditResult

        result = AuditResult.from_dict(run.read_json("audit.json"))
        target = _write_audit_files(run, result, figures=sorted((run.path / "figures").glob("*.png")))
    else:
        target = write_claims_report(run)
    share_mode(run.path)
    return target


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


def run_audit(
    model: str,
    data: str,
    *,
    checkpoint: str | Path | None = None,
    action: str = "none",
    budget: str | float = "quick",
    root: str | Path | None = None,
    device: str | None = None,
    seed: int = 0,
    out: str | Path = "runs",
    limits: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    process_group: Any = None,
) -> tuple[AuditResult, RunDir | None]:
    """Load ``model`` (``MODULE:FACTORY``) and ``checkpoint``, audit it, and store it as a run under ``out``
    (what ``symgen audit`` does).

    Everything is validated and measured before anything is written: bad input (model, checkpoint,
    data, action, limits) raises a :class:`SymgenError` and leaves no run directory. The run
    (experiment ``audit`` in ``out/index.sqlite``) holds the files of :func:`write_audit_run`.
    ``seed`` is the audit's ``generator``. Returns ``(result, run)``. ``process_group`` (a torch.distributed
    group, e.g. under torchrun): the audit's data-parallel sections are sharded over its ranks, every
    rank gets the same result, and only rank 0 writes the run (the others return ``run`` None).
    """
    from pydantic import ValidationError

    from symgen.audit import ACTIONS, audit, load_model, resolve_limits

    if action not in ACTIONS:
        raise ConfigError(f"unknown action '{action}'; choose one of {', '.join(ACTIONS)}.")
    lim = resolve_limits(budget, limits)  # validate before anything is loaded
    if not lim.time_limit > 0:
        raise ConfigError(
            f"time_limit must be > 0 seconds, got {lim.time_limit:g}; the audit sizes its work "
            "to it (e.g. --budget 60 or --set time_limit=120)."
        )
    try:
        cfg = AuditConfig(
            model=model,
            checkpoint=None if checkpoint is None else str(checkpoint),
            data=data,
            root=None if root is None else str(root),
            action=action,
            budget=str(budget),
            limits=dict(limits or {}),
            seed=seed,
            device=device or "cpu",
        )
    except ValidationError as e:
        raise ConfigError(f"invalid audit settings: {e}") from None
    net = load_model(model, checkpoint, device=cfg.device)
    result = audit(
        net,
        data,
        action,
        budget=budget,
        limits=limits,
        root=root,
        generator=seed,
        device=cfg.device,
        name=model,
        progress=progress,
        process_group=process_group,
    )
    if checkpoint is not None:
        result.model = f"{model} + {Path(checkpoint).name}"
    if process_group is not None:
        from symgen import distributed

        if distributed.rank(process_group) != 0:
            return result, None
    return result, write_audit_run(RunStore(out), result, config=cfg)


def write_audit_run(
    store: RunStore, result: AuditResult, *, title: str | None = None, config: AuditConfig | None = None
) -> RunDir:
    """Store an :class:`~symgen.audit.AuditResult` as a new run of ``store`` (experiment ``audit``).

    The run directory holds ``config.yaml`` (the audit's settings), ``audit.json`` (every value),
    ``result.json`` (the report's tables), ``claims.json`` (empty: an audit checks no claims),
    ``figures/*.png`` and ``report.html``.
    """
    cfg = config or AuditConfig(
        model=result.model,
        data=result.data,
        action=result.action or "none",
        budget=result.budget,
        limits=jsonable(result.limits),
        seed=result.seed,
        device=result.device,
    )
    run = store.create("audit", cfg, quick=result.budget != "full", subject=f"{result.model} on {result.data}")
    try:
        _write_audit_files(run, result, title)
    except BaseException:
        store.discard(run)
        raise
    share_mode(run.path)
    store.record(run, "audit", status="done", seconds=result.seconds)
    return run


def _write_audit_files(
    run: RunDir, result: AuditResult, title: str | None = None, figures: list[Path] | None = None
) -> Path:
    """``audit.json``, ``figures/*.png``, ``report.html``, ``result.json`` and ``claims.json`` of an audit."""
    from symgen.audit.page import render_audit_page

    data = result.to_dict()
    run.write_json("audit.json", data)
    figs = result.figures(run.path / "figures") if figures is None else figures
    page_path = atomic_write(run.path / "report.html", render_audit_page(result, figs, title=title))
    run.write_json("result.json", {"tables": result.report_tables()})
    run.write_json("claims.json", [])
    return page_path

"""Running an experiment into the run store: trial checkpoints (the context that caches each finished
trial on disk, so ``--resume`` restarts from them), the run's life cycle and its report.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symgen.errors import SymgenError
from symgen.executors import Executor, InProcessExecutor
from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable, trial_key
from symgen.io import atomic_write
from symgen.runs.locks import LockInfo, RunLock
from symgen.runs.rundir import warn
from symgen.runs.store import RunDir, RunStore, share_mode

__all__ = ["RunContext", "RunOutcome", "execute", "write_report", "load_run_config"]


class RunContext(Context):
    """Context backed by a run directory: trial results cached on disk, metrics logged, progress shown.

    Args:
        run: the run directory whose ``trials/`` caches finished trials.
        executor: where the trials run.
        device: the experiment's device.
        show_progress: show progress (a terminal bar or plain lines in a pipe).
    """

    def __init__(self, run: RunDir, executor: Executor, device: str = "cpu", show_progress: bool = True):
        self.run, self.executor, self.device = run, executor, device
        self.show_progress = show_progress
        self.trials_reused = 0
        self.trials_done = 0

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str = "trials") -> list[Any]:
        """``fn`` applied to each item; a trial whose checkpoint exists is read back, not run again.

        Args:
            fn: a pure, picklable, module-level function of one item.
            items: the trials' settings.
            desc: the progress label.

        Returns:
            The results, in the order of ``items`` (as JSON types).
        """
        items = list(items)
        keys = [trial_key(fn, item) for item in items]
        results: list[Any] = [None] * len(items)
        todo: list[int] = []
        for i, key in enumerate(keys):
            path = self.run.trial_path(key)
            if path.exists():
                try:
                    results[i] = json.loads(path.read_text())["result"]
                except (ValueError, KeyError, TypeError, OSError) as e:
                    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                    os.replace(path, aside)
                    warn(
                        f"trial checkpoint {path} is damaged ({type(e).__name__}: {e}); "
                        f"set aside as {aside.name}, recomputing that trial."
                    )
                    todo.append(i)
                    continue
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

    def log(self, **metrics: Any) -> None:
        """Append a time-stamped line of ``metrics`` to the run's ``metrics.jsonl``.

        Args:
            **metrics: JSON-able values.
        """
        self.run.append_metrics({"time": time.time(), **metrics})

    def progress(self, iterable: Iterable[Any], desc: str = "", total: int | None = None) -> Iterator[Any]:
        """A rich bar in a terminal, a plain line every few seconds in a pipe (stderr), nothing when disabled.

        Args:
            iterable: what to iterate.
            desc: the label.
            total: the number of items, when known.

        Returns:
            The items of ``iterable``.
        """
        if not self.show_progress:
            yield from iterable
            return
        from symgen.terminal import progress

        yield from progress(iterable, desc=desc, total=total)


@dataclass
class RunOutcome:
    """What :func:`execute` returns: the run, its claims and result, its wall time and the trials read back."""

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
    on_run: Callable[[RunDir], None] | None = None,
) -> RunOutcome:
    """Run ``experiment`` under ``config`` into a new run directory (or ``resume`` an interrupted one).

    The run holds its lock (:class:`~symgen.runs.locks.RunLock`) while it runs: a run that another
    live process runs cannot be resumed. An interruption marks it ``interrupted``, resumable with its
    finished trials: Ctrl-C or SIGTERM (re-raised), a broken pipe (re-raised), a lost pool worker
    or a full disk (a :class:`SymgenError` that says so). Any other error marks it ``failed``; a new
    run that fails with a :class:`SymgenError` before its first trial finished (bad input found at
    run time) is removed, so it leaves no directory behind. A resumed run's ``metrics.jsonl`` is
    written afresh (the run logs every record again) and its time adds up every attempt.

    Args:
        experiment: what to run.
        config: its settings.
        store: the run store.
        quick: whether ``config`` holds the quick settings.
        executor: where the trials run (default: in process).
        resume: an interrupted run to continue (its finished trials are read back).
        show_progress: show progress.
        on_run: called with the run once it exists and is locked (the CLI's resume hint names it).

    Returns:
        The run's :class:`RunOutcome`.
    """
    if experiment.validate is not None:
        experiment.validate(config)  # checks that need more than the config's types, before anything exists
    if resume is not None:
        run = resume
        run.lock = RunLock.acquire(run.path)  # a live process still runs it: a SymgenError naming its pid
    else:
        run = store.create(experiment.name, config, quick, locked=True)
    lock = run.lock
    try:
        base = _earlier_seconds(store, run, lock.stale if lock is not None else None)
        if resume is not None:
            (run.path / "metrics.jsonl").unlink(missing_ok=True)  # the resumed run logs every record again
            store.record(run, experiment.name, status="running", seconds=base, note="")
        if on_run is not None:
            on_run(run)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    executor = executor or InProcessExecutor()
    ctx = RunContext(run, executor, device=config.device, show_progress=show_progress)
    start = time.time()
    finished = False
    try:
        result = experiment.run(config, ctx)
        result = jsonable(result)
        run.write_json("result.json", result)
        claims = experiment.check_claims(config, result)
        run.write_json("claims.json", [c.model_dump() for c in claims])
        if experiment.figures is not None:
            experiment.figures(result, run.figures_dir)
        write_report(run)
        seconds = base + time.time() - start
        share_mode(run.path)
        store.record(
            run,
            experiment.name,
            status="done",
            passed=sum(c.passed for c in claims),
            total=len(claims),
            seconds=seconds,
            note="",
        )
        finished = True
    except (KeyboardInterrupt, SystemExit, BrokenPipeError) as e:
        why = "broken pipe" if isinstance(e, BrokenPipeError) else "interrupted"
        _mark(store, run, experiment.name, "interrupted", base + time.time() - start, why)
        raise
    except BrokenExecutor:
        _mark(store, run, experiment.name, "interrupted", base + time.time() - start, "a pool worker died")
        raise SymgenError(
            f"a worker process of the pool died (killed, or out of memory?) during run {run.id}; "
            "its finished trials are kept and the run is interrupted (resumable)."
        ) from None
    except BaseException as e:
        if _disk_full(e):
            _mark(store, run, experiment.name, "interrupted", base + time.time() - start, "disk full")
            where = getattr(e, "filename", None) or run.path
            raise SymgenError(
                f"disk full while writing {where}; the finished trials of run {run.id} are kept and the run is "
                "interrupted: free some space, then resume it."
            ) from None
        empty = resume is None and ctx.trials_done == 0 and not any(run.path.glob("trials/*.json"))
        if isinstance(e, SymgenError) and empty:
            store.discard(run)
        else:
            _mark(store, run, experiment.name, "failed", base + time.time() - start, type(e).__name__)
        raise
    finally:
        if finished:
            executor.close()
        else:
            executor.abort()  # the trials still running are lost anyway: stop their workers now
        if lock is not None:
            lock.release()
    return RunOutcome(run, claims, result, seconds, ctx.trials_reused)


def _mark(store: RunStore, run: RunDir, experiment: str, status: str, seconds: float, note: str) -> None:
    """Record how a run stopped, as far as the disk allows (a full disk may refuse even that)."""
    try:
        store.record(run, experiment, status=status, seconds=seconds, note=note)
    except (OSError, SymgenError, sqlite3.Error) as e:
        warn(f"could not record run {run.id} as {status}: {e}")


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a full disk: ENOSPC, EDQUOT, or SQLite's "disk is full"."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        if isinstance(seen, sqlite3.Error) and "disk is full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _earlier_seconds(store: RunStore, run: RunDir, stale: LockInfo | None) -> float:
    """The wall time of a run's earlier attempts: what they recorded, plus a killed attempt's time (from its
    lock's start to the last file it wrote)."""
    st = run.status() or {}
    seconds = float(st.get("seconds") or store.row(run).get("seconds") or 0.0)
    if stale is not None:
        stamps = [f.stat().st_mtime for f in run.path.rglob("*") if f.is_file() and f.name != "lock"]
        last = max(stamps, default=stale.started)
        seconds += max(0.0, last - stale.started)
    return seconds


def write_report(run: RunDir) -> Path:
    """(Re)write a run's ``report.html``: the audit page for an audit run, the claims page otherwise.

    Args:
        run: the run.

    Returns:
        The page's path.
    """
    from symgen.report import write_report as write_claims_report

    meta = run.read_config()
    if meta.get("experiment") == "audit" and (run.path / "audit.json").exists():
        from symgen.audit import AuditResult
        from symgen.runs.audits import write_audit_files

        result = AuditResult.from_dict(run.read_json("audit.json"))
        target = write_audit_files(run, result, figures=sorted((run.path / "figures").glob("*.png")))
    else:
        target = write_claims_report(run)
    share_mode(run.path)
    return target


def load_run_config(run: RunDir, experiment: Experiment) -> tuple[ExperimentConfig, bool]:
    """The config (and quick flag) a run was started with, for ``--resume``.

    Args:
        run: the run.
        experiment: its experiment.

    Returns:
        ``(config, quick)``.
    """
    meta = run.read_config()
    return experiment.config(**meta["config"]), bool(meta.get("quick"))

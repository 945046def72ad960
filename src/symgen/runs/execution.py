"""Running an experiment into the run store: trial checkpoints (the context that caches each finished
trial on disk, so ``--resume`` restarts from them), the run's life cycle and its report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from symgen.errors import SymgenError
from symgen.executors import Executor, InProcessExecutor
from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable, trial_key
from symgen.io import atomic_write
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
) -> RunOutcome:
    """Run ``experiment`` under ``config`` into a new run directory (or ``resume`` an interrupted one).

    Ctrl-C (or SIGTERM through the CLI) marks the run ``interrupted``: ``--resume`` continues it. Any
    other error marks it ``failed``; a new run that fails with a :class:`SymgenError` before its first
    trial finished (bad input found at run time) is removed, so it leaves no directory behind.

    Args:
        experiment: what to run.
        config: its settings.
        store: the run store.
        quick: whether ``config`` holds the quick settings.
        executor: where the trials run (default: in process).
        resume: an interrupted run to continue (its finished trials are read back).
        show_progress: show progress.

    Returns:
        The run's :class:`RunOutcome`.
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
    """(Re)write a run's ``report.html``: the audit page for an audit run, the claims page otherwise.

    Args:
        run: the run.

    Returns:
        The page's path.
    """
    from symgen.report import write_report as write_claims_report

    meta = yaml.safe_load((run.path / "config.yaml").read_text())
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
    meta = yaml.safe_load((run.path / "config.yaml").read_text())
    return experiment.config(**meta["config"]), bool(meta.get("quick"))

"""Audits stored as runs: ``symgen audit`` validates, measures, then writes one run directory
(experiment ``audit`` in the store's index) with ``audit.json``, figures and ``report.html``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from symgen.distributed import DEFAULT_TIMEOUT_S, GroupSpec
from symgen.errors import ConfigError
from symgen.experiments.base import ExperimentConfig, jsonable
from symgen.io import atomic_write
from symgen.runs.store import RunDir, RunStore, share_mode

if TYPE_CHECKING:
    from symgen.audit import AuditResult

__all__ = ["AuditConfig", "run_audit", "write_audit_run", "write_audit_files"]


class AuditConfig(ExperimentConfig):
    """The settings of an audit run, as its ``config.yaml`` holds them."""

    model: str
    checkpoint: str | None = None
    data: str
    root: str | None = None
    action: str = "none"
    budget: str = "quick"
    limits: dict[str, Any] = {}
    output: int | str | None = None


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
    process_group: GroupSpec = "auto",
    output: int | str | None = None,
    collective_timeout_s: float = DEFAULT_TIMEOUT_S,
    started: float | None = None,
) -> tuple[AuditResult, RunDir | None]:
    """Load ``model`` (``MODULE:FACTORY``) and ``checkpoint``, audit it, and store it as a run under ``out``
    (what ``symgen audit`` does).

    Everything is validated and measured before anything is written: bad input (model, checkpoint,
    data, action, limits) raises a :class:`SymgenError` and leaves no run directory. The run
    (experiment ``audit`` in ``out/index.sqlite``) holds the files of :func:`write_audit_run`.

    Args:
        model: ``MODULE:FACTORY`` (see :func:`symgen.audit.load_model`).
        data: a dataset name.
        checkpoint: a state-dict file to load into the model.
        action: the group action of the invariance section (c4, d4, shift or none).
        budget: quick, full or seconds (:data:`symgen.audit.BUDGETS`).
        root: the directory of the dataset files.
        device: cpu, cuda, cuda:N (default cpu).
        seed: the audit's ``generator``: every sub-stream derives from it.
        out: the run store's root.
        limits: single limits of the budget (:class:`symgen.audit.AuditLimits`); a renamed limit's old
            name is accepted with a ``DeprecationWarning``.
        progress: called with each section's title as it starts.
        process_group: a :data:`~symgen.distributed.GroupSpec` ("auto": the default group under torchrun
            with several processes; None: this process alone); the audit's data-parallel sections are
            sharded over its ranks, every rank gets the same result, and only rank 0 writes the run.
        output: which of the model's outputs are the logits (an index or a key/attribute name; None: the
            documented rule of :func:`symgen.audit.outputs.select_logits`).
        collective_timeout_s: the longest wait of the audit's own collectives (seconds).
        started: the ``time.perf_counter()`` the time budget counts from (default: this call; loading the
            model counts, and the figures are drawn inside the budget).

    Returns:
        ``(result, run)``; ``run`` is None on the ranks other than 0.
    """
    started = time.perf_counter() if started is None else started
    from pydantic import ValidationError

    from symgen import distributed
    from symgen.audit import ACTIONS, audit, load_model, resolve_limits
    from symgen.audit.limits import current_limit_names

    if action not in ACTIONS:
        raise ConfigError(f"unknown action '{action}'; choose one of {', '.join(ACTIONS)}.")
    limits = current_limit_names(limits)  # old names: a DeprecationWarning, then the current ones
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
            output=output,
        )
    except ValidationError as e:
        raise ConfigError(f"invalid audit settings: {e}") from None
    group = distributed.resolve_group(process_group)
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
        process_group=group,
        output=output,
        collective_timeout_s=collective_timeout_s,
        figures=True,
        started=started,
    )
    if checkpoint is not None:
        result.model = f"{model} + {Path(checkpoint).name}"
    if group is not None and distributed.rank(group) != 0:
        return result, None
    return result, write_audit_run(RunStore(out), result, config=cfg)


def write_audit_run(
    store: RunStore, result: AuditResult, *, title: str | None = None, config: AuditConfig | None = None
) -> RunDir:
    """Store an :class:`~symgen.audit.AuditResult` as a new run of ``store`` (experiment ``audit``).

    The run directory holds ``config.yaml`` (the audit's settings), ``audit.json`` (every value),
    ``result.json`` (the report's tables), ``claims.json`` (empty: an audit checks no claims),
    ``figures/*.png`` and ``report.html``.

    Args:
        store: the run store.
        result: what the audit measured.
        title: the page's title (default: the model and data).
        config: the audit's settings as ``config.yaml`` keeps them (default: read off ``result``).

    Returns:
        The new run.
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
        write_audit_files(run, result, title)
    except BaseException:
        store.discard(run)
        raise
    share_mode(run.path)
    store.record(run, "audit", status="done", seconds=result.seconds)
    return run


def write_audit_files(
    run: RunDir, result: AuditResult, title: str | None = None, figures: list[Path] | None = None
) -> Path:
    """Write ``audit.json``, ``figures/*.png``, ``report.html``, ``result.json`` and ``claims.json`` of an audit.

    Args:
        run: the run directory.
        result: what the audit measured.
        title: the page's title.
        figures: figures already drawn (None: draw them).

    Returns:
        The page's path.
    """
    from symgen.audit.figures import draw_figures
    from symgen.audit.page import render_audit_page

    data = result.to_dict()
    run.write_json("audit.json", data)
    figs = draw_figures(result, run.path / "figures") if figures is None else figures
    page_path = atomic_write(run.path / "report.html", render_audit_page(result, figs, title=title))
    run.write_json("result.json", {"tables": result.report_tables()})
    run.write_json("claims.json", [])
    return page_path

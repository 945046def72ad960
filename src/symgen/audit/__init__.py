"""A symmetry and flatness report card for any trained PyTorch classifier.

``symgen.audit.audit(model, data, action)`` measures, each with its uncertainty and its cost in
seconds: accuracy and loss; invariance under a group action (OSP, symmetric KL, relative logit
deviation; Nordenfors & Flinth, arXiv 2410.01452); weight-space scale symmetries (arXiv
1511.01029); the Hessian's trace, top eigenvalues and spectral density (arXiv 1912.07145); noise
stability E_U[L(W + U)] - L(W) ~ sigma^2/2 tr(H) (arXiv 2306.08553); the empirical NTK on a
subsample (effective rank, condition number, kernel-target alignment; arXiv 1806.07572,
2307.02693); PGD robust accuracy (arXiv 1706.06083). Every number comes from the library
modules; this package only chooses sample sizes (the budget) and times the sections. It returns
an :class:`AuditResult` and writes nothing: :func:`symgen.runs.write_audit_run` stores it as a run
with ``audit.json``, figures and ``report.html``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from symgen import distributed
from symgen.audit import builtin as _builtin  # noqa: F401 - registers the built-in sections
from symgen.audit import registry
from symgen.audit.flags import data_flags
from symgen.audit.limits import BUDGETS, AuditLimits, current_limit_names, resolve_limits
from symgen.audit.loading import (
    ACTIONS,
    ActionSpec,
    AuditData,
    action_name,
    load_checkpoint,
    load_model,
    make_action,
    resolve_data,
)
from symgen.audit.outputs import OutputSpec, logits_model
from symgen.audit.ranks import Ranks, signature
from symgen.audit.registry import Context, Section, register, registered, unregister
from symgen.audit.result import AuditResult, Estimate, SectionResult
from symgen.audit.schedule import Plan, run_sections
from symgen.audit.splits import Split, as_split
from symgen.distributed import DEFAULT_TIMEOUT_S, GroupSpec
from symgen.errors import ConfigError, DivergenceError
from symgen.rng import Seed, seed_of

if TYPE_CHECKING:
    from symgen.audit.planning import Timing
    from symgen.groups import GroupAction

__all__ = [
    "ACTIONS",
    "BUDGETS",
    "AuditLimits",
    "Estimate",
    "SectionResult",
    "AuditResult",
    "Section",
    "register",
    "unregister",
    "registered",
    "audit",
    "overrun_note",
    "make_action",
    "load_model",
    "load_checkpoint",
    "resolve_limits",
]


def audit(
    model: nn.Module,
    data: AuditData,
    action: ActionSpec = None,
    *,
    budget: str | float = "quick",
    limits: Mapping[str, Any] | None = None,
    root: str | Path | None = None,
    generator: Seed = None,
    device: str | torch.device | None = None,
    sections: Sequence[str] | None = None,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    process_group: GroupSpec = "auto",
    output: OutputSpec = None,
    collective_timeout_s: float = DEFAULT_TIMEOUT_S,
    figures: bool = False,
    started: float | None = None,
) -> AuditResult:
    """Measure how symmetric, flat, kernel-like and robust a trained classifier is.

    ``data``: a dataset name for :func:`symgen.data.load_dataset` (train split for the curvature,
    noise and symmetry sections, test split for the rest; CIFAR-10 is read lazily, file by file), an
    ``(x, y)`` pair or a ``torch.utils.data.DataLoader`` (any re-iterable of ``(x, y)`` batches) used
    for all, or ``{"train": ..., "test": ...}`` of those. A loader is streamed (one batch in memory
    beside the budget's subsamples, which are gathered in one pass each) and gives the numbers the same
    data as tensors gives, for the same seed (up to round-off); it must yield the same samples in the
    same order on every pass (no shuffling or random augmentation); a one-shot iterator (a generator)
    is a :class:`ConfigError`. ``action``: c4, d4, shift, none or a GroupAction.
    ``budget``: quick, full (sample sizes and a time limit, :data:`BUDGETS`) or seconds; ``limits``
    overrides single fields of it. The sizes the user did not set are scaled to the time limit
    from a timing of one forward and backward pass (:mod:`symgen.audit.planning`): every section
    runs and says what it could afford. Non-finite weights or buffers raise :class:`DivergenceError`. ``sections`` restricts the audit to these names.
    ``generator`` (an int seed or a ``torch.Generator``; None = seed 0) seeds subsamples, probes,
    noise draws and attacks; every use draws from its own stream ``rng.derive(seed, key)`` of one
    integer seed (``symgen.rng.seed_of``: the int itself, or one draw from a generator; the keys:
    :data:`symgen.audit.sections.common.STREAMS`), so no two uses share draws and a section's numbers
    do not depend on which other sections ran. The model is evaluated in eval mode
    (BatchNorm uses its running statistics) on ``device`` (default: where its parameters are) in
    its own dtype; it is not modified. Nothing is written to disk.

    The test split is streamed whole through a DataLoader (``test_num_data`` None); the budget limits
    only what is expensive (training subsamples, probes, Lanczos steps, NTK and PGD data points).
    An explicit ``eval_num_data`` without ``test_num_data`` subsamples both splits (as it always did).
    A former limit name (``noise_samples``, ... :data:`symgen.audit.limits.RENAMED`) is accepted with a
    ``DeprecationWarning``.
    ``process_group`` ("auto": the default group when torch.distributed is initialized with several
    processes, e.g. under torchrun; None: this process alone): accuracy and loss, the Hessian and GGN
    products and noise stability are computed on each rank's shard of the data and all-reduced, the
    other sections on every rank alike; every rank returns the same numbers as one process would
    (up to round-off). The ranks stay in step (:mod:`symgen.audit.ranks`): one plan from the slowest
    rank's timing, a signature compared before the first collective, each section's outcome agreed
    (a section that fails on some ranks only raises the same ``DistributedError`` on every rank).
    ``output`` picks the logits of a model that returns a tuple, a dict or an object with ``.logits``
    (:mod:`symgen.audit.outputs`: by default a tuple's first tensor, the key "logits" or the only tensor
    of a dict, the ``.logits`` attribute). A model whose output count differs from the data's classes,
    or data that looks like raw 0-255 pixels, is flagged in ``result.flags``.

    The time limit holds at any machine load: it counts from ``started`` (default: this call), every
    section is re-planned from the throughput measured so far and looks at its deadline between blocks
    of work, stopping before a block it could not finish (:mod:`symgen.audit.schedule`); on a CPU the
    audit runs on one thread when that is faster here (``result.threads``; see
    :func:`symgen.audit.planning.choose_threads`), and the previous count is restored. With ``figures``
    each section's figure is drawn as the section ends, inside the budget (``result.figures``, PNG
    bytes, what :func:`symgen.runs.write_audit_run` writes); one the budget leaves no time for is not
    drawn, and the section says so.

    Args:
        model: the trained classifier (one logit per class).
        data: a dataset name, a batch ``(x, y)``, a loader, or ``{"train": ..., "test": ...}`` of those.
        action: c4, d4, shift, none, a ``GroupAction`` or None.
        budget: quick, full or seconds.
        limits: single limits of the budget (:class:`AuditLimits` fields).
        root: the directory of the dataset files.
        generator: the seed of every random stream.
        device: where the model is evaluated (default: where its parameters are).
        sections: only these sections (default: all).
        name: how the result names the model (default: its class name).
        progress: called with each section's title as it starts.
        process_group: a :data:`~symgen.distributed.GroupSpec`: the ranks the data-parallel sections
            are sharded over.
        output: which output holds the logits: a position, a key or an attribute name (None: the rule).
        collective_timeout_s: the longest wait of the audit's own collectives for the other ranks.
        figures: draw the sections' figures inside the budget (on rank 0 only).
        started: the ``time.perf_counter()`` the budget counts from (default: now; ``symgen audit``
            passes its process's start, so imports and model loading count too).

    Returns:
        The :class:`AuditResult`.
    """
    entry = time.perf_counter() if started is None else started  # loading and timing count too
    called, cpu0 = time.perf_counter(), time.process_time()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"audit expects a torch.nn.Module, got {type(model).__name__}; load one with "
            "symgen.audit.load_model('MODULE:FACTORY')."
        )
    limits = current_limit_names(limits)
    lim = resolve_limits(budget, limits)
    known = [s.name for s in registry.sections()]
    chosen = list(sections) if sections is not None else known
    bad = [s for s in chosen if s not in known]
    if bad:
        raise ConfigError(f"unknown audit section(s) {bad}; choose from {', '.join(known)}.")
    ref = next(iter(model.parameters()), None)
    if ref is None:
        raise ConfigError("the model has no parameters; there is nothing to audit.")
    seed = seed_of(generator)
    dev = torch.device(device) if device is not None else ref.device
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    home = ref.device
    modes = [(m, m.training) for m in model.modules()]
    model.to(dev)
    model.eval()
    data_name, train_src, test_src = resolve_data(data, root, lim.batch_size)
    same = train_src is test_src
    two = not same and not isinstance(data, str)
    train = as_split(train_src, "data['train']" if two else "data", dev, dtype)
    test = train if same else as_split(test_src, "data['test']" if two else "data", dev, dtype)
    act = make_action(action, test.input_shape)
    _check_finite(model)
    user = model
    model, out = logits_model(user, train.head()[0][:2], output)
    splits = {"data": train} if same else {"train": train, "test": test}
    # a model that fails on the data (or returns no (N, K) logits) is reported by the performance section
    flags = data_flags(int(out.shape[-1]), splits, data_name) if out is not None and out.ndim == 2 else []
    fixed = set(limits)
    if "eval_num_data" in fixed and "test_num_data" not in fixed:
        from dataclasses import replace

        lim = replace(lim, test_num_data=lim.eval_num_data)
    group = distributed.resolve_group(process_group)
    ranks = Ranks(group, collective_timeout_s)
    sizes = {"train": train.num_data, "test": test.num_data, "sections": chosen, "action": action_name(action)}
    ranks.check(signature(model, **sizes, limits=lim.as_dict()), "audit")  # before any other collective
    base = lim
    threads = torch.get_num_threads()
    try:
        if dev.type == "cpu" and lim.time_limit > 0:
            torch.set_num_threads(_threads(model, train))
        lim, plan_notes, timing = _plan(model, lim, train, test, act, fixed, ranks)
        ranks.check({"plan": lim.as_dict(), "notes": plan_notes}, "audit plan")
        result = AuditResult(
            model=name or type(user).__name__,
            data=data_name,
            action=action_name(action),
            budget=str(budget),
            device=str(dev),
            dtype=str(dtype).replace("torch.", ""),
            seed=seed,
            num_params=sum(p.numel() for p in model.parameters()),
            limits=lim.as_dict(),
            sections={},
            flags=flags,
            output=output,
            threads=torch.get_num_threads() if dev.type == "cpu" else None,
        )
        result.sections = {s.name: SectionResult(s.name, s.title) for s in registry.sections()}
        # Every section draws from its own streams of ``seed`` (sections.common.STREAMS).
        ctx = Context(model, train, test, act, lim, seed, group, result, same)
        order = act.group.order if act is not None else 1
        plan = Plan(base, timing, train.num_data, test.num_data, order, fixed, str(budget))
        draw = figures and (group is None or distributed.rank(group) == 0)
        setup = time.perf_counter() - entry
        run_sections(result, ctx, chosen, plan, plan_notes, ranks, progress, dev, entry, draw=draw)
    finally:
        torch.set_num_threads(threads)
        user.to(home)
        for m, mode in modes:
            m.training = mode
    now = time.perf_counter()
    result.seconds = now - entry
    share = (time.process_time() - cpu0) / max(now - called, 1e-9) / max(torch.get_num_threads(), 1)
    note = overrun_note(result.seconds, lim.time_limit, setup, share)
    if note:
        result.flags.append(note)
    return result


def overrun_note(seconds: float, limit: float, setup: float, cpu_share: float) -> str:
    """What an audit past 1.25x its budget says of why ("" within it): the startup the budget cannot cut
    and the share of the CPU the machine gave it.

    Args:
        seconds: the audit's seconds.
        limit: its time limit (seconds; <= 0: none).
        setup: seconds before the first section (imports, loading the data and the model, timing).
        cpu_share: CPU seconds per wall second per thread over the audit (1: a core of its own per thread).

    Returns:
        The flag's text, or "".
    """
    import os

    if not limit > 0 or seconds <= 1.25 * limit:
        return ""
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    return (
        f"the audit took {seconds:.0f} s, over 1.25x its {limit:g} s budget: this process got {cpu_share:.0%} of "
        f"a CPU per thread ({load}), and {setup:.0f} s went to starting up (imports, the data, the model, its "
        "timing) before the first section; that startup and each section's first block are not cut by the budget"
    )


def __getattr__(name: str) -> Any:
    """``SECTIONS`` ((name, title) in report order) and ``RUN_ORDER``, read from the registry when asked.

    They are computed on each access (sections can be registered at any time), so they are not in ``__all__``;
    new code reads :func:`symgen.audit.registry.sections` and :func:`symgen.audit.registry.run_order`.
    """
    if name == "SECTIONS":
        return tuple((s.name, s.title) for s in registry.sections())
    if name == "RUN_ORDER":
        return tuple(s.name for s in registry.run_order())
    raise AttributeError(f"module 'symgen.audit' has no attribute {name!r}")


def _check_finite(model: nn.Module) -> None:
    """NaN or inf in a parameter or a floating buffer (BatchNorm statistics) makes every number meaningless."""
    bad = [
        n
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        more = f", ... {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DivergenceError(
            f"the model holds NaN or inf in {len(bad)} tensor(s) ({', '.join(bad[:3])}{more}); "
            "the training that produced these weights diverged. Audit an earlier checkpoint."
        )


def _threads(model: nn.Module, train: Split) -> int:
    """The thread count the audit runs on: one thread when it is faster here (a loaded machine)."""
    from symgen.audit.planning import choose_threads

    try:
        return choose_threads(model, train.head()[0])[0]
    except Exception:  # noqa: BLE001 - the performance section reports a model that fails on the data
        return torch.get_num_threads()


def _plan(
    model: nn.Module,
    lim: AuditLimits,
    train: Split,
    test: Split,
    act: GroupAction | None,
    fixed: set[str],
    ranks: Ranks,
) -> tuple[AuditLimits, dict[str, str], Timing | None]:
    """Limits sized to the time budget (unchanged when the timing itself fails: the sections then say why).

    Under several ranks every rank plans from the slowest rank's timing, so all run the same sizes."""
    from symgen.audit.planning import Timing, plan_limits, time_passes

    if not lim.time_limit > 0:
        return lim, {}, None
    timing: Timing | None
    try:
        timing = time_passes(model, *train.head())
    except Exception:  # noqa: BLE001 - e.g. a shape mismatch: the performance section reports it clearly
        timing = None
    if ranks.active:
        row = (
            [0.0, 0.0, 0.0, 0.0] if timing is None else [timing.forward, timing.backward, timing.outputs, timing.layers]
        )
        failed = ranks.count(timing is None)
        f, b, o, n = ranks.max_row(row)
        timing = None if failed else Timing(forward=f, backward=b, outputs=int(o), layers=int(n))
    if timing is None:
        return lim, {}, None
    order = act.group.order if act is not None else 1
    return (*plan_limits(lim, timing, train.num_data, test.num_data, order, fixed), timing)

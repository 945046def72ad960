"""The audit's sections, each one :class:`Section` registered in one place.

A section is its name and title, the limits it owns (with their quick and full values and the minimum
the planner may cut them to), its cost model (predicted seconds from a timing of the model), the
precision it aims for (a relative or absolute standard error per metric), the function that runs it,
the figure it draws, what its metrics mean and its row of the docs. The planner
(:mod:`symgen.audit.planning`), the audit loop, ``audit.json``, the HTML page and the terminal all read
:func:`sections`; adding a section is one :func:`register` call, removing it one :func:`unregister`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from symgen.audit.limits import AuditLimits, register_limit, unregister_limit
from symgen.audit.precision import Target
from symgen.errors import ConfigError

if TYPE_CHECKING:
    from symgen.audit.ranks import Ranks
    from symgen.audit.result import AuditResult, SectionResult

__all__ = [
    "Limit",
    "Sizes",
    "Clock",
    "Context",
    "Section",
    "register",
    "unregister",
    "registered",
    "sections",
    "get",
    "run_order",
    "docs_table",
]


@dataclass(frozen=True)
class Limit:
    """A limit a section owns: its name, its value in the quick and full budgets, the planner's minimum.

    The built-in sections' limits are fields of :class:`~symgen.audit.limits.AuditLimits`; a limit that is
    not becomes an entry of ``AuditLimits.extra`` (``lim.get(name)``), set with ``--set name=value`` alike.
    ``minimum`` None: the planner never cuts it.
    """

    name: str
    quick: Any = None
    full: Any = None
    minimum: int | None = None


class Sizes(NamedTuple):
    """The sizes a cost model sees: training and test split sizes, the group order (1 without an action)."""

    n_train: int
    n_test: int
    group_order: int


class Clock:
    """The time a running section may use, looked at between its blocks of work.

    ``expired()`` is True once the deadline is past, or when the next block, taken to last as long as the
    time since the previous look (or since the clock was made), would end past it: a section stops before
    a block it cannot finish, so an audit slowed by load still ends near its budget. It is agreed by every
    rank (any rank's verdict stops all at the same point, so their collectives stay paired) unless
    ``agree=False``. No deadline: never expires.
    """

    def __init__(self, deadline: float | None = None, ranks: Ranks | None = None) -> None:
        self.deadline = deadline
        self.ranks = ranks
        self.stopped: list[str] = []
        self._last = time.perf_counter()  # the first block is taken to last as long as the section's start

    def expired(self, agree: bool = True) -> bool:
        """Whether the section must stop now: the deadline is past, or the next block would end past it.

        Args:
            agree: agree the verdict over the ranks (a collective: every rank must call it alike); False
                for a loop whose ranks may take different numbers of blocks.

        Returns:
            Whether to stop.
        """
        now = time.perf_counter()
        block, self._last = now - self._last, now
        late = self.deadline is not None and now + block > self.deadline
        if agree and self.ranks is not None and self.ranks.active:
            return self.ranks.count(late) > 0
        return late

    def stop(self, what: str) -> None:
        """Record that the section stopped early (the audit flags it).

        Args:
            what: what was cut, e.g. "trace after 8 of 24 probes".
        """
        self.stopped.append(what)


@dataclass
class Context:
    """What a section's ``run`` sees: the model (its logits), the splits, the action, the limits, the seed."""

    model: Any
    train: Any
    test: Any
    action: Any
    lim: AuditLimits
    seed: int
    group: Any
    result: AuditResult
    same: bool
    clock: Clock = field(default_factory=Clock)


@dataclass(frozen=True)
class Section:
    """One section of the audit: everything the planner, the runner, the JSON, the page and the terminal need.

    ``run(sec, ctx)`` fills ``sec`` (a :class:`~symgen.audit.result.SectionResult`); ``cost(lim, timing, sizes)``
    predicts its seconds; ``targets`` maps a metric name or a prefix ending in ``_``/``@`` to its
    :class:`~symgen.audit.precision.Target`; ``draw(plt, sec, result)`` returns a matplotlib figure or None;
    ``share`` is its share of the budget (renormalized over the sections that run); ``run_rank`` orders the
    runs (cheap ones first); ``meanings`` says what each metric means on the page; ``docs`` is its row of
    ``docs/audit.md`` (what it measures | uncertainty | from); ``needs_action`` skips it without a group action;
    ``required``: its failure stops the audit (accuracy and loss: everything is read against them).
    """

    name: str
    title: str
    run: Callable[[SectionResult, Context], None]
    limits: tuple[Limit, ...] = ()
    cost: Callable[[AuditLimits, Any, Sizes], float] | None = None  # (limits, planning.Timing, sizes)
    share: float = 0.1
    targets: Mapping[str, Target] = field(default_factory=dict)
    figure: str | None = None
    draw: Callable[[Any, SectionResult, AuditResult], Any] | None = None
    meanings: Mapping[str, str] = field(default_factory=dict)
    docs: str = ""
    run_rank: float = 50.0
    needs_action: bool = False
    required: bool = False

    @property
    def knobs(self) -> tuple[tuple[str, int], ...]:
        """The limits the planner may cut, with their minimum."""
        return tuple((lim.name, lim.minimum) for lim in self.limits if lim.minimum is not None)

    def target(self, metric: str) -> Target | None:
        """The precision target of ``metric`` (exact name first, then the longest matching prefix).

        Args:
            metric: a metric's name, e.g. ``robust_accuracy@0.01``.

        Returns:
            The target, or None.
        """
        if metric in self.targets:
            return self.targets[metric]
        hits = [k for k in self.targets if k[-1:] in ("_", "@") and metric.startswith(k)]
        return self.targets[max(hits, key=len)] if hits else None

    def meaning(self, metric: str) -> str:
        """One sentence saying what ``metric`` means (exact name, then the longest matching prefix).

        Args:
            metric: a metric's name.

        Returns:
            The sentence ("" when the section says nothing).
        """
        if metric in self.meanings:
            return self.meanings[metric]
        hits = [k for k in self.meanings if k[-1:] in ("_", "@") and metric.startswith(k)]
        if not hits:
            return ""
        key = max(hits, key=len)
        return self.meanings[key].replace("{}", metric[len(key) :])


_REGISTRY: dict[str, Section] = {}


def register(section: Section, *, before: str | None = None) -> Section:
    """Add ``section`` to the audit (its limits to the budgets); the report lists sections in this order.

    Args:
        section: the section.
        before: the name of a section it goes before on the page (default: last).

    Returns:
        The section.
    """
    if section.name in _REGISTRY:
        raise ConfigError(f"audit section '{section.name}' is already registered.")
    for lim in section.limits:
        register_limit(lim.name, lim.quick, lim.full)
    items = list(_REGISTRY.items())
    at = next((i for i, (k, _) in enumerate(items) if k == before), len(items))
    items.insert(at, (section.name, section))
    _REGISTRY.clear()
    _REGISTRY.update(items)
    return section


def unregister(name: str) -> None:
    """Remove a section and the limits only it owned.

    Args:
        name: the section's name.
    """
    section = _REGISTRY.pop(name)
    for lim in section.limits:
        unregister_limit(lim.name)


@contextmanager
def registered(section: Section) -> Iterator[Section]:
    """``register(section)`` for the ``with`` block, then ``unregister`` (tests, experiments).

    Args:
        section: the section.

    Yields:
        The section.
    """
    register(section)
    try:
        yield section
    finally:
        unregister(section.name)


def sections() -> list[Section]:
    """The registered sections, in the order of the report."""
    return list(_REGISTRY.values())


def get(name: str) -> Section | None:
    """The registered section ``name`` (None when there is none).

    Args:
        name: the section's name.

    Returns:
        The section or None.
    """
    return _REGISTRY.get(name)


def run_order() -> list[Section]:
    """The sections in the order they run: cheap ones first, so a time limit cuts the expensive ones."""
    return sorted(sections(), key=lambda s: s.run_rank)


def docs_table() -> str:
    """The sections' table of ``docs/audit.md`` (section | what it measures | uncertainty | from)."""
    rows = ["| section | what it measures | uncertainty | from |", "|---|---|---|---|"]
    rows += [f"| {s.name} | {s.docs} |" for s in sections() if s.docs]
    return "\n".join(rows)

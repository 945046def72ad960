"""The experiment protocol: a pydantic config, a ``run(config, ctx)`` returning a JSON-able result,
and claim checks that turn the result into PASS/FAIL with the measured numbers.

Experiments never import the run store: a :class:`Context` is handed to ``run``; the in-memory
default runs trials in-process, the run store's context adds disk checkpoints and executors. The claims
the experiments check, their protocols and thresholds: docs/claims.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from symgen.errors import ConfigError

__all__ = [
    "Claim",
    "ExperimentConfig",
    "Experiment",
    "Context",
    "build_config",
    "conventional_range",
    "trial_key",
    "jsonable",
    "num_threads",
]


class Claim(BaseModel):
    """One checked statement: ``passed`` is computed from ``measured`` against ``threshold``."""

    id: str
    statement: str
    measured: Any
    threshold: Any
    passed: bool
    note: str = ""
    headline: str | None = None  # the key of ``measured`` that the one-line summary shows
    paper: Any = None  # the paper's number for the headline, where the paper gives one


class ExperimentConfig(BaseModel):
    """Base of every experiment config: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = 0
    device: str = "cpu"

    @model_validator(mode="after")
    def _conventional_ranges(self) -> ExperimentConfig:
        """Ranges implied by a field's name where the field states none (see :func:`conventional_range`)."""
        for name, info in type(self).model_fields.items():
            if info.metadata:  # the experiment stated its own bounds (Field(ge=...), ...)
                continue
            problem = conventional_range(name, getattr(self, name))
            if problem:
                raise ValueError(f"{name} {problem}")
        return self


@dataclass(frozen=True)
class Experiment:
    """A registered experiment.

    ``run(config, ctx) -> dict`` does the work (trials through ``ctx.map``), ``check_claims(config,
    result) -> list[Claim]`` evaluates the claims, ``figures(result, outdir) -> list[Path]`` draws.
    ``quick`` holds the config overrides of ``--quick`` (the CPU-sized setting). ``claims`` lists, in
    order, exactly the claim ids that ``check_claims`` emits (``C4.4-pgd``, ``C4.5-local``): the one
    source of the ids that ``symgen list``, docs/claims.md and README show (a test holds each
    experiment to it). ``validate(config)``, when given, checks what the
    config's types cannot (a dataset's files exist, ...) before the run directory is created.
    """

    name: str
    title: str
    paper: str
    config: type[ExperimentConfig]
    run: Callable[[Any, Context], dict]
    check_claims: Callable[[Any, dict], list[Claim]]
    figures: Callable[[dict, Path], list[Path]] | None = None
    quick: dict[str, Any] = field(default_factory=dict)
    claims: tuple[str, ...] = ()
    validate: Callable[[Any], None] | None = None  # raises a SymgenError before a run directory is created


class Context:
    """What ``run`` may use besides its config. This in-memory default runs trials one by one.

    ``map(fn, items)``: apply a pure, picklable, module-level ``fn`` to each item (a dict or
    pydantic model); the run store's context caches each result on disk (resume) and may
    run them in a process pool or on Ray. ``log(**metrics)``: a line of ``metrics.jsonl``.
    ``progress(iterable)``: a progress bar where there is a terminal.
    """

    device: str = "cpu"

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str = "trials") -> list[Any]:
        """``[fn(item) for item in items]``, one by one here.

        Args:
            fn: a pure, picklable, module-level trial function.
            items: its inputs.
            desc: what the progress display calls them.

        Returns:
            the results, in the order of ``items``.
        """
        return [fn(item) for item in self.progress(items, desc=desc, total=len(items))]

    def log(self, **metrics: Any) -> None:
        """Record one line of metrics (``metrics.jsonl`` in the run store; nothing here).

        Args:
            **metrics: JSON-able values by name.
        """
        pass

    def progress(self, iterable: Iterable[Any], desc: str = "", total: int | None = None) -> Iterable[Any]:
        """``iterable``, shown as progress where there is a terminal (unchanged here).

        Args:
            iterable: what to walk through.
            desc: its label.
            total: its length, where known.

        Returns:
            the same items.
        """
        return iterable


_COUNT_NAMES = {"seeds", "steps", "epochs", "records", "depth", "width", "members", "bands"}
_COUNT_SUFFIXES = (
    "_steps",
    "_seeds",
    "_epochs",
    "_width",
    "_samples",
    "_points",
    "_size",
    "_per_class",
    "_subsets",
    "_draws",
    "_runs",
    "_features",
    "_iters",
)
_POSITIVE_NAMES = {"lr", "time_limit"}


def conventional_range(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for a config field called ``name``, by the naming convention, or None.

    Counts (``seeds``, ``steps``, ``epochs``, ``width``, ``depth``, ``*_steps``, ``*_samples``,
    ``num_*`` ...) are integers >= 1; lists of counts (``widths``, ``depths``, ``*_sizes``) hold
    integers >= 1; learning rates (``lr``, ``*_lr``, ``lr_*``) and ``time_limit`` are > 0; no float
    is NaN. Fields that declare their own bounds are left to them.

    Args:
        name: the config field's name.
        value: the value given for it.

    Returns:
        a message saying what is wrong, or None if the value fits the convention.
    """
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, got NaN."
    is_count = name in _COUNT_NAMES or name.endswith(_COUNT_SUFFIXES) or name.startswith("num_")
    if is_count and isinstance(value, int) and not isinstance(value, bool) and value < 1:
        return f"must be an integer >= 1 (a count); got {value}."
    if (name in ("widths", "depths") or name.endswith("_sizes")) and isinstance(value, (list, tuple)):
        bad = [v for v in value if isinstance(v, int) and not isinstance(v, bool) and v < 1]
        if bad:
            return f"must hold integers >= 1; got {list(value)}."
    is_positive = name in _POSITIVE_NAMES or name.endswith("_lr") or name.startswith("lr_")
    if is_positive and isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
        return f"must be > 0; got {value}."
    return None


def _set_dotted(target: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        target = target.setdefault(p, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a nested section.")
    target[parts[-1]] = value


def build_config(
    config_cls: type[ExperimentConfig],
    *,
    quick: dict | None = None,
    file: str | Path | None = None,
    sets: Iterable[str] = (),
    **explicit: Any,
) -> ExperimentConfig:
    """Config from defaults < quick overrides < YAML file < ``--set key=value`` < explicit kwargs.

    Values of ``--set`` are parsed as YAML (``lr=0.1``, ``sizes=[1,2]``, ``flag=true``).
    Unknown keys and wrong types raise :class:`ConfigError` naming the key and the valid keys.

    Args:
        config_cls: the experiment's Config class.
        quick: the ``--quick`` overrides (None: full setting).
        file: a YAML file of settings (None: none).
        sets: ``key=value`` strings from ``--set``.
        **explicit: settings given as keyword arguments (highest precedence).

    Returns:
        the validated config.
    """
    data: dict[str, Any] = dict(quick or {})
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file of config keys.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:  # e.g. a !!python/object tag: refused by safe_load, reported in one line
            where = getattr(e, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file {path} is not plain YAML{line}: {problem}.") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values.")
        data.update(loaded)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        key, raw = item.split("=", 1)
        key = key.strip()
        top = key.split(".")[0]
        if top not in config_cls.model_fields:
            valid = ", ".join(sorted(config_cls.model_fields))
            raise ConfigError(f"unknown config key '{key}' for {config_cls.__name__}; valid keys: {valid}.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value '{raw}': {e}") from None
        _set_dotted(data, key, value)
    data.update({k: v for k, v in explicit.items() if v is not None})
    unknown = sorted(set(data) - set(config_cls.model_fields))
    if unknown:
        valid = ", ".join(sorted(config_cls.model_fields))
        raise ConfigError(f"unknown config key(s) {unknown} for {config_cls.__name__}; valid keys: {valid}.")
    try:
        return config_cls(**data)
    except ValidationError as e:
        msgs = "; ".join(_validation_message(err) for err in e.errors())
        raise ConfigError(f"invalid config for {config_cls.__name__}: {msgs}") from None


def _validation_message(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not err["loc"]:  # a check of the whole config names its own field
        return msg
    return f"{'.'.join(str(x) for x in err['loc'])}: {msg} (got {err.get('input')!r})"


def jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values and pydantic models into plain JSON types (NaN -> None).

    Args:
        obj: the value to convert (containers are converted recursively).

    Returns:
        the same value built from plain JSON types.
    """
    try:
        import numpy as np
        import torch
    except ImportError:  # pragma: no cover
        np = torch = None  # type: ignore[assignment]
    if isinstance(obj, BaseModel):
        return jsonable(obj.model_dump())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if torch is not None and isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if np is not None and isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if np is not None and isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def trial_key(fn: Callable[..., Any], item: Any) -> str:
    """A stable key for a trial: the function's qualified name and its input, hashed.

    Args:
        fn: the trial function.
        item: its input.

    Returns:
        16 hex digits of the SHA-256 of both.
    """
    payload = json.dumps([f"{fn.__module__}.{fn.__qualname__}", jsonable(item)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class num_threads:  # lower case: called like a function, as torch.set_grad_enabled is
    """Set torch's intra-op CPU threads to ``n`` (``None`` or 0: leave them); as a context manager, restore
    the previous count on exit. Tiny models run fastest on one thread and do not fight other processes
    for cores: ``with num_threads(1): ...`` in a trial, ``num_threads(1)`` as a pool worker's initializer.
    """

    def __init__(self, n: int | None) -> None:
        import torch

        self._before = torch.get_num_threads()
        if n:
            torch.set_num_threads(int(n))

    def __enter__(self) -> num_threads:
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self._before)

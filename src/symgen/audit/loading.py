"""Loading what the audit measures: a model from ``MODULE:FACTORY``, its checkpoint, a group action, data."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, Union

import torch
from torch import Tensor, nn

from symgen.errors import CheckpointError, ConfigError, GroupActionError
from symgen.streaming import Data

if TYPE_CHECKING:
    from symgen.groups import GroupAction

__all__ = [
    "ACTIONS",
    "ActionSpec",
    "AuditData",
    "load_model",
    "load_checkpoint",
    "make_action",
    "action_name",
    "resolve_data",
]

ACTIONS = ("c4", "d4", "shift", "none")

#: The audit's group action: a name of :data:`ACTIONS`, a ``GroupAction``, or None (no action).
ActionSpec: TypeAlias = Union[str, "GroupAction", None]
#: The audit's data: a dataset name, :data:`symgen.streaming.Data` (a batch, a list of batches, a loader)
#: used for both splits, or ``{"train": ..., "test": ...}`` of those.
AuditData: TypeAlias = Union[str, Data, Mapping[str, Data]]


def load_model(
    spec: str,
    checkpoint: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a model from ``MODULE:FACTORY`` (dotted module or ``path/to/file.py``), load weights, eval mode.

    ``FACTORY`` is a callable (a function or an ``nn.Module`` class) returning an ``nn.Module``,
    called without arguments, or with literal arguments written in the spec:
    ``symgen.experiments.unit_norm:build_model('cnn', (1, 8, 8), channels=8)``.
    ``checkpoint`` is a state-dict file (see :func:`load_checkpoint`).

    Args:
        spec: ``MODULE:FACTORY`` or ``MODULE:FACTORY(literal arguments)``.
        checkpoint: a state-dict file to load (None: the factory's weights).
        device: where to move the model.
        dtype: the floating dtype to cast it to.

    Returns:
        The model, in eval mode.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(
            f"--model expects MODULE:FACTORY (e.g. mypkg.models:make_net or path/to/models.py:make_net); got '{spec}'."
        )
    module_ref, attr, args, kwargs = _parse_spec(spec)
    module = _import_module(module_ref)
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ConfigError(
                f"module '{module_ref}' has no attribute '{attr}'; callables it defines: "
                f"{', '.join(public[:20]) or 'none'}."
            )
        factory = getattr(factory, part)
    if isinstance(factory, nn.Module) and not args and not kwargs:
        model = factory
    elif callable(factory):
        try:
            model = factory(*args, **kwargs)
        except TypeError as e:
            raise ConfigError(
                f"calling the factory of '{spec}' failed: {e}. Give its arguments in the spec, "
                "e.g. module:factory(8, kind='cnn'), or wrap it in a function without "
                "arguments."
            ) from None
        except Exception as e:  # noqa: BLE001 - whatever the user's factory raises is reported in one line
            raise ConfigError(
                f"the model factory '{spec}' raised {type(e).__name__}: {_one_line(e)}; fix the "
                "factory or the arguments in the spec."
            ) from None
    else:
        raise ConfigError(
            f"'{spec}' is a {type(factory).__name__}, not a factory; point --model at a function or nn.Module class."
        )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory '{spec}' returned a {type(model).__name__}; it must return a torch.nn.Module.")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    model.to(device=device, dtype=dtype)
    return model.eval()


def _parse_spec(spec: str) -> tuple[str, str, list[Any], dict[str, Any]]:
    """``MODULE:NAME`` or ``MODULE:NAME(literal args)`` -> (module, name, args, kwargs)."""
    import ast

    call_at = spec.find("(")
    head = spec if call_at < 0 else spec[:call_at]
    module_ref, sep, attr = head.rpartition(":")
    if not sep or not module_ref or not attr.strip():
        raise ConfigError(
            f"--model expects MODULE:FACTORY (e.g. mypkg.models:make_net or path/to/models.py:make_net); got '{spec}'."
        )
    attr = attr.strip()
    if call_at < 0:
        return module_ref, attr, [], {}
    try:
        node = ast.parse(f"f{spec[call_at:]}", mode="eval").body
        if not isinstance(node, ast.Call):
            raise ValueError("not a call")
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    except (SyntaxError, ValueError) as e:
        raise ConfigError(
            f"cannot read the factory arguments in '{spec}' ({e}); write them as Python "
            "literals, e.g. module:factory('cnn', (1, 8, 8), width=32)."
        ) from None
    return module_ref, attr, args, kwargs


def _import_module(ref: str) -> Any:
    path = Path(ref)
    if ref.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ConfigError(
                f"model file {path} does not exist; give MODULE:FACTORY with an existing file or an importable module."
            )
        name = f"symgen_user_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {path} as a Python module.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        # The file's own directory on the path lets it import its sibling modules.
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported as a config error
            sys.modules.pop(name, None)
            raise ConfigError(f"importing the model file {path} failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module
    try:
        return importlib.import_module(ref)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"cannot import module '{ref}' ({e}); install it, run from its directory, or "
            "give the file path (path/to/models.py:FACTORY)."
        ) from None


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict from ``path`` into ``model`` strictly; mismatches raise :class:`CheckpointError`.

    The file holds a state dict, or a dict with one under ``state_dict`` / ``model_state_dict`` /
    ``model``; a ``module.`` prefix (DataParallel) is stripped when the model has none.

    Args:
        model: the model to load into.
        path: the checkpoint file.

    Returns:
        ``model``, loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {path} does not exist; pass a state-dict file saved with "
            "torch.save(model.state_dict(), path)."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's checkpoint problem
        raise CheckpointError(_unreadable(path, e)) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state dict of tensors; "
            "save it with torch.save(model.state_dict(), path)."
        )
    state = dict(obj)
    expected = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module.") :]: v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({type(model).__name__}, {len(expected)} tensors): "
            f"{len(missing)} missing keys {_first_list(missing)}, {len(unexpected)} unexpected keys "
            f"{_first_list(unexpected)}. "
            "Check that --model builds the architecture the checkpoint was saved from."
        )
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(
            f"checkpoint {path}: {len(wrong)} of {len(state)} tensors have the wrong shape "
            f"({_first(wrong)}). Check the model's widths against the checkpoint's."
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"checkpoint {path}: {len(bad)} tensor(s) hold NaN or inf ({_first(bad)}); the "
            "training that saved it diverged. Use an earlier checkpoint."
        )
    model.load_state_dict(state, strict=True)
    return model


def _first(items: Sequence[str], k: int = 3) -> str:
    """The first ``k`` items and how many more: a message stays one readable line."""
    if not items:
        return "none"
    more = f", ... {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more


def _first_list(items: Sequence[str], k: int = 3) -> str:
    """``['a', 'b', 'c'] and 7 more``: the first few keys as a list."""
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return f"{list(items[:k])}{more}"


def _one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's text without ANSI escapes, on one line, cut at a word boundary."""
    import re

    text = " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def _unreadable(path: Path, e: BaseException) -> str:
    """Why a checkpoint file cannot be read, in terms of what the user did."""
    import zipfile

    text = str(e)
    if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
        if zipfile.is_zipfile(path):
            return (
                f"cannot read checkpoint {path}: it holds pickled Python objects (e.g. a whole module saved with "
                "torch.save(model, path)), which symgen does not execute; save the weights with "
                "torch.save(model.state_dict(), path), or load the module yourself and pass "
                "model.state_dict()."
            )
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
            return (
                f"cannot read checkpoint {path}: it is not a file saved by torch.save (neither a zip archive nor a pickle); "
                "pass the state-dict file saved with torch.save(model.state_dict(), path)."
            )
    return (
        f"cannot read checkpoint {path} as a torch state dict ({type(e).__name__}: {_one_line(e)}); "
        "save it with torch.save(model.state_dict(), path)."
    )


def make_action(action: ActionSpec, input_shape: Sequence[int]) -> GroupAction | None:
    """The group action named ``action`` (c4, d4, shift, none) for inputs of ``input_shape`` (without batch).

    c4: rotations by 90 degrees, d4: rotations and flips of square images; shift: cyclic shifts
    along the last dim; none: no action. A :class:`symgen.groups.GroupAction` is used as given.

    Args:
        action: a name of :data:`ACTIONS`, a ``GroupAction`` or None.
        input_shape: the shape of one input.

    Returns:
        The action, checked against ``input_shape``; None for no action.
    """
    from symgen.groups import CyclicShift, GroupAction, ImageDihedral, ImageRotation90

    shape = tuple(int(s) for s in input_shape)
    if action is None or action == "none":
        return None
    act: GroupAction
    if isinstance(action, GroupAction):
        act = action
    elif action == "c4":
        act = ImageRotation90()
    elif action == "d4":
        act = ImageDihedral()
    elif action == "shift":
        if not shape:
            raise GroupActionError("shift needs inputs with at least one dimension.")
        act = CyclicShift(shape[-1], dim=-1)
    else:
        raise ConfigError(f"unknown action '{action}'; choose one of {', '.join(ACTIONS)} or pass a GroupAction.")
    try:
        act.check(shape)
    except GroupActionError as e:
        raise GroupActionError(f"--action {action_name(action)} does not fit the data: {e}") from None
    return act


def action_name(action: ActionSpec) -> str | None:
    """How the report names ``action``: its name, the repr of a GroupAction, or None for no action.

    Args:
        action: a name, a ``GroupAction`` or None.

    Returns:
        The name, or None.
    """
    if action is None or action == "none":
        return None
    return action if isinstance(action, str) else repr(action)


def resolve_data(data: AuditData, root: str | Path | None, batch_size: int = 512) -> tuple[str, Data, Data]:
    """``(name, train, test)`` sources for :func:`symgen.audit.splits.as_split`: a dataset name gives both
    splits (CIFAR-10 as :class:`symgen.data.Cifar10Batches`, read lazily in batches of ``batch_size``;
    the small datasets as tensors); ``{"train": ..., "test": ...}`` gives each; anything else (an
    ``(x, y)`` pair, a DataLoader) serves as both.

    Args:
        data: the audit's data.
        root: the directory of the dataset files.
        batch_size: the batch size of a lazily read dataset.

    Returns:
        ``(name, train, test)``; ``name`` is "custom" for data that is not a dataset name.
    """
    if isinstance(data, str):
        from symgen.data import Cifar10Batches, load_dataset

        if data == "cifar10":
            return data, Cifar10Batches("train", root, batch_size), Cifar10Batches("test", root, batch_size)
        # The default split seed: the split the experiments train on, so test data stays unseen.
        return data, load_dataset(data, "train", root=root), load_dataset(data, "test", root=root)
    if isinstance(data, Mapping) and {"train", "test"} <= set(data):
        return "custom", data["train"], data["test"]
    return "custom", data, data

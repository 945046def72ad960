"""Which of a model's outputs are its logits: the rule every section sees through one adapter.

A model may return a tensor, a tuple (logits and auxiliary heads), a dict, or an object with a
``.logits`` attribute (Hugging Face style). The rule (:func:`select_logits`), with ``output`` None:

- a ``Tensor``: as is;
- a tuple or list: its first tensor;
- a mapping: the value of key ``"logits"``, else its only tensor value;
- an object with a tensor ``.logits`` attribute: that tensor.

``output`` picks explicitly: an int (a position of a tuple or list) or a string (a key of a mapping,
or an attribute name); ``--output KEY_OR_INDEX`` on the command line. What the rule cannot resolve
is a one-line :class:`~symgen.errors.ConfigError` saying what was returned and how to pick.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from symgen.errors import ConfigError

__all__ = ["OutputSpec", "select_logits", "describe_output", "LogitsAdapter", "logits_model", "parse_output"]

#: How to pick the logits from a model's output: None (the rule), a position or a key / attribute name.
OutputSpec = int | str | None


def parse_output(text: str | None) -> OutputSpec:
    """``--output`` as given on the command line: digits are a position, anything else a key.

    Args:
        text: the option's value (None: not given).

    Returns:
        An int, a string or None.
    """
    if text is None or not text.strip():
        return None
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def describe_output(out: Any) -> str:
    """A short description of what a model returned (types, keys, shapes), for messages.

    Args:
        out: the model's output.

    Returns:
        One line, e.g. ``tuple(Tensor(8, 10), Tensor(8, 32))``.
    """
    if isinstance(out, Tensor):
        return f"Tensor{tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        inner = ", ".join(describe_output(o) for o in list(out)[:6])
        return f"{type(out).__name__}({inner}{', ...' if len(out) > 6 else ''})"
    if isinstance(out, Mapping):
        inner = ", ".join(f"{k!r}: {describe_output(v)}" for k, v in list(out.items())[:6])
        return f"{type(out).__name__}{{{inner}}}"
    attrs = [k for k, v in vars(out).items() if isinstance(v, Tensor)] if hasattr(out, "__dict__") else []
    return f"{type(out).__name__}" + (f" with tensor attributes {attrs[:6]}" if attrs else "")


def _fail(out: Any, why: str) -> ConfigError:
    return ConfigError(
        f"cannot tell which output of the model holds the logits: it returned {describe_output(out)}; {why}. "
        "Pick it with --output KEY_OR_INDEX (audit(..., output=...)): a position of a tuple, a dict key "
        "or an attribute name."
    )


def select_logits(out: Any, output: OutputSpec = None) -> Tensor:
    """The logits in a model's output, by the module's rule or by ``output``.

    Args:
        out: what the model's forward returned.
        output: None (the rule), a position (int) or a key / attribute name (str).

    Returns:
        The logits tensor.

    Raises:
        ConfigError: when the rule cannot resolve the output, or ``output`` does not name a tensor.
    """
    if output is not None:
        picked: Any = None
        if isinstance(output, int) and isinstance(out, (tuple, list)):
            if not -len(out) <= output < len(out):
                raise _fail(out, f"position {output} is out of range")
            picked = out[output]
        elif isinstance(output, str) and isinstance(out, Mapping):
            if output not in out:
                raise _fail(out, f"it has no key {output!r}")
            picked = out[output]
        elif isinstance(output, str) and hasattr(out, output):
            picked = getattr(out, output)
        else:
            raise _fail(out, f"output={output!r} does not apply to a {type(out).__name__}")
        if not isinstance(picked, Tensor):
            raise _fail(out, f"output={output!r} is a {type(picked).__name__}, not a tensor")
        return picked
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        first = next((o for o in out if isinstance(o, Tensor)), None)
        if first is None:
            raise _fail(out, "it holds no tensor")
        return first
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"]
        tensors = [k for k, v in out.items() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return out[tensors[0]]
        raise _fail(out, f"it has no key 'logits' and {len(tensors)} tensor values")
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise _fail(out, "it is neither a tensor, a tuple, a dict nor an object with .logits")


class LogitsAdapter(nn.Module):
    """``model`` whose forward returns only its logits (:func:`select_logits`): what every section sees.

    The user's model is the adapter's ``model`` submodule (parameter names gain a ``model.`` prefix);
    modes, devices and dtypes move with it.
    """

    def __init__(self, model: nn.Module, output: OutputSpec = None) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The logits of ``model(*args, **kwargs)``.

        Args:
            *args: the model's positional arguments.
            **kwargs: its keyword arguments.

        Returns:
            The logits.
        """
        return select_logits(self.model(*args, **kwargs), self.output)


def logits_model(model: nn.Module, probe: Tensor, output: OutputSpec = None) -> tuple[nn.Module, Tensor | None]:
    """``model`` itself when it returns a tensor and ``output`` is None, else a :class:`LogitsAdapter`; and
    the logits of ``probe``.

    One forward pass on ``probe`` (without gradients) decides, and checks that the rule resolves.

    Args:
        model: the user's classifier (in eval mode).
        probe: a small batch of inputs.
        output: None (the rule), a position or a key / attribute name.

    Returns:
        ``(module, logits)``: a module whose forward returns the logits, and the logits of ``probe`` (None
        when the model fails on it).

    Raises:
        ConfigError: when the logits cannot be found in the output.
    """
    import torch

    try:
        with torch.no_grad():
            out = model(probe)
    except Exception:  # noqa: BLE001 - a model that fails on the data: the performance section says why
        return (model if output is None else LogitsAdapter(model, output)), None
    if output is None and isinstance(out, Tensor):
        return model, out
    logits = select_logits(out, output)  # raises the one-line error before any section runs
    return LogitsAdapter(model, output), logits

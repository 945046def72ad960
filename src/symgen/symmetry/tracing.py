"""Graph views of a model for the scale-symmetry analysis: the ``torch.fx`` graph, or the module
call order recorded with forward hooks when tracing fails; each op is classified by how it acts on
a rescaled tensor (arXiv 1511.01029)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from symgen.errors import ShapeError
from symgen.symmetry.types import (
    BREAKING_FUNCS,
    BREAKING_MODULES,
    HOMOGENEOUS_FUNCS,
    HOMOGENEOUS_MODULES,
    METADATA_FUNCS,
    MOVEMENT_FUNCS,
    MOVEMENT_MODULES,
    NORMALIZATION_LAYERS,
    SCALE_FUNCS,
    SOURCES,
)

__all__: list[str] = []  # internal to symgen.symmetry


@dataclass
class Step:
    """How one op acts on the rescaled tensor flowing into it."""

    kind: str  # norm | move | scale | homog | shift | break | unknown | output | metadata
    name: str
    apply: Callable[[Tensor, float], Tensor] | None = None  # op as a function of the path tensor
    module: nn.Module | None = None
    module_name: str | None = None
    reason: str = ""

    def run(self, t: Tensor, fill: float) -> Tensor:
        """The op replayed on ``t`` in place of the path tensor.

        Args:
            t: the value to feed in place of the rescaled tensor.
            fill: the value of other operands of a concatenation (to tell them apart).

        Returns:
            the op's output.
        """
        if self.apply is None:
            raise TypeError(f"{self.name} ({self.kind}) cannot be replayed")
        return self.apply(t, fill)


def _call_module(mod: nn.Module, t: Tensor, fill: float) -> Tensor:
    """``mod(t)``: a module as a function of the path tensor (``fill`` is unused)."""
    out: Tensor = mod(t)
    return out


def _func_name(target: Any) -> str:
    """Name of an fx call target, leading underscores stripped (``operator.iadd`` -> ``iadd``)."""
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target)).lstrip("_")


def _classify_module(mod: nn.Module, name: str) -> tuple[str, str]:
    """``(kind, reason)`` of a leaf module from the function-class tables."""
    if isinstance(mod, NORMALIZATION_LAYERS):
        return "norm", ""
    if isinstance(mod, HOMOGENEOUS_MODULES):
        return "homog", ""
    if isinstance(mod, nn.Identity):
        return "scale", ""
    if isinstance(mod, MOVEMENT_MODULES):
        return "move", ""
    if isinstance(mod, BREAKING_MODULES):
        what = (
            "a layer mixing channels"
            if isinstance(mod, SOURCES + (nn.Bilinear,))
            else "a function that is not positively homogeneous"
        )
        return "break", f"reaches {name} ({type(mod).__name__}, {what}) before any normalization"
    return "unknown", f"passes through {name} ({type(mod).__name__}), whose behaviour under scaling is not known"


def _describe(node: Any) -> str:
    """A readable name for an fx node: the module it calls, or the operation, its operands and the module
    whose forward() runs it (never the raw node dump)."""
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "get_attr":
        return f"parameter {node.target}"
    if node.op == "placeholder":
        return f"input {node.target}"
    import torch.fx as fx

    operands: list[str] = []

    def collect(a: Any) -> Any:
        operands.append(
            str(a.target) if a.op in ("call_module", "get_attr", "placeholder") else f"{_func_name(a.target)}()"
        )
        return a

    fx.node.map_arg((node.args, node.kwargs), collect)
    stack = node.meta.get("nn_module_stack") or {}
    where = f"{next(reversed(stack.values()))[0]}.forward()" if stack else "forward()"
    return f"{_func_name(node.target)}({', '.join(dict.fromkeys(operands))}) in {where}"


class FxGraph:
    """The ``torch.fx`` graph of the model, with every intermediate value of one forward pass."""

    method = "torch.fx"

    def __init__(self, model: nn.Module, args: tuple[Any, ...]):
        import torch.fx as fx

        self.gm = fx.symbolic_trace(model)
        self.modules = dict(self.gm.named_modules())
        self.env: dict[str, Any] = {}
        env = self.env

        class _Record(fx.Interpreter):
            def run_node(self, n):  # noqa: D401 - keep every intermediate value
                out = super().run_node(n)
                env[n.name] = out
                return out

        with torch.no_grad():
            _Record(self.gm).run(*args)
        self.unanalysed_params: dict[str, str] = {}
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                users = ", ".join(_describe(u) for u in n.users) or "no operation"
                self.unanalysed_params[str(n.target)] = (
                    f"used directly by a functional op ({users}), not through its module; only parameters "
                    "of nn.Linear / nn.Conv* modules are analysed"
                )

    def sources(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for n in self.gm.graph.nodes:
            if n.op == "call_module" and isinstance(self.modules[n.target], SOURCES):
                out.setdefault(str(n.target), []).append(n)
        return out

    def value(self, node: Any) -> Any:
        return self.env.get(node.name)

    def users(self, node: Any) -> list[Any]:
        return list(node.users)

    def descendants(self, node: Any) -> set[Any]:
        seen, todo = set(), [node]
        while todo:
            n = todo.pop()
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        return seen

    def step(self, node: Any, incoming: Any, tainted: set[Any]) -> Step:
        import torch.fx as fx

        label = _describe(node)
        if node.op == "output":
            return Step("output", "output", reason="reaches the model output without normalization")
        flat: list[Any] = []

        def collect(a: Any) -> Any:
            flat.append(a)
            return a

        fx.node.map_arg((node.args, node.kwargs), collect)
        uses = sum(1 for a in flat if a is incoming)
        if node.op == "call_module":
            mod = self.modules[node.target]
            kind, reason = _classify_module(mod, str(node.target))
            if uses != 1 or (node.args and node.args[0] is not incoming):
                return Step(
                    "unknown", str(node.target), reason=f"{label} takes the rescaled tensor in an unsupported position"
                )
            if kind in ("move", "scale"):
                return Step(
                    kind, str(node.target), apply=partial(_call_module, mod), module=mod, module_name=str(node.target)
                )
            return Step(kind, str(node.target), module=mod, module_name=str(node.target), reason=reason)
        if node.op not in ("call_function", "call_method"):
            return Step("unknown", node.name, reason=f"unsupported node {label}")
        name = _func_name(node.target)
        if name in METADATA_FUNCS or (name == "getattr" and node.op == "call_function"):
            return Step("metadata", name)
        if uses != 1:
            return Step("unknown", name, reason=f"{label} uses the rescaled tensor {uses} times")
        others = [a for a in flat if isinstance(a, fx.Node) and a is not incoming]
        if any(a in tainted for a in others):
            return Step(
                "unknown", name, reason=f"{label} combines the rescaled tensor with another tensor computed from it"
            )
        if not isinstance(self.env.get(node.name), Tensor):
            return Step("unknown", name, reason=f"{label} does not return a single tensor")

        def reexec(t: Tensor, fill: float, node=node, incoming=incoming) -> Tensor:
            def sub(a: Any) -> Any:
                if a is incoming:
                    return t
                v = self.env[a.name]
                if name == "cat" and isinstance(v, Tensor) and a in others:
                    return torch.full_like(v, fill, dtype=t.dtype)
                return v

            args = fx.node.map_arg(node.args, sub)
            kwargs = fx.node.map_arg(node.kwargs, sub)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

        is_first = (node.args and node.args[0] is incoming) or node.kwargs.get("input") is incoming
        if name in MOVEMENT_FUNCS and is_first:
            return Step("move", name, apply=reexec)
        if name == "cat":
            return Step("move", name, apply=reexec)
        if name in SCALE_FUNCS and is_first:
            return Step("scale", name, apply=reexec)
        if name in HOMOGENEOUS_FUNCS and is_first:
            return Step("homog", name)
        if name in ("mul", "mul_", "div", "div_", "truediv") and (is_first or name.startswith("mul")):
            # Times a number or a tensor that does not depend on the scaled filter: linear.
            return Step("scale", name, apply=reexec)
        if name in ("add", "add_", "sub", "sub_", "iadd", "isub"):
            if name.lstrip("i").startswith("sub") and not is_first:
                return Step("unknown", name, reason=f"{label} subtracts the rescaled tensor")
            if all(not isinstance(a, fx.Node) for a in node.args if a is not incoming) and not others:
                return Step("shift", name, apply=reexec)
            return Step(
                "break",
                name,
                reason=f"{label} adds a tensor that is not rescaled "
                "(e.g. a residual connection) before any normalization",
            )
        if name in BREAKING_FUNCS:
            return Step(
                "break",
                name,
                reason=f"{label} is not positively homogeneous / mixes channels, and comes before any normalization",
            )
        return Step("unknown", name, reason=f"{label}: behaviour under scaling is not known")


class HookGraph:
    """Dataflow between leaf modules recovered from forward hooks (tensor identity)."""

    method = "hooks"

    def __init__(self, model: nn.Module, args: tuple[Any, ...]):
        self.calls: list[tuple[str, nn.Module, Tensor | None, Any]] = []
        handles = []
        for name, mod in model.named_modules():
            if len(list(mod.children())) == 0:

                def hook(m, inp, out, name=name):
                    first = inp[0] if inp and isinstance(inp[0], Tensor) else None
                    self.calls.append((name, m, first, out))

                handles.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self.output = model(*args)
        finally:
            for h in handles:
                h.remove()
        outs = self.output if isinstance(self.output, (tuple, list)) else (self.output,)
        self.output_ids = {id(o) for o in outs if isinstance(o, Tensor)}
        self.unanalysed_params: dict[str, str] = {}

    def sources(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for i, (name, mod, _, _) in enumerate(self.calls):
            if isinstance(mod, SOURCES):
                out.setdefault(name, []).append(i)
        return out

    def value(self, i: int) -> Any:
        return self.calls[i][3]

    def users(self, i: int) -> list[Any]:
        out = self.calls[i][3]
        users: list[Any] = [j for j in range(i + 1, len(self.calls)) if self.calls[j][2] is out]
        if id(out) in self.output_ids:
            users.append("output")
        if not users:
            users.append("invisible")
        return users

    def descendants(self, i: int) -> set[Any]:
        return set()

    def step(self, j: Any, incoming: Any, tainted: set[Any]) -> Step:
        if j == "output":
            return Step("output", "output", reason="reaches the model output without normalization")
        if j == "invisible":
            return Step(
                "unknown",
                "?",
                reason="its output is used by an operation outside any module, which forward hooks cannot see",
            )
        name, mod, _, _ = self.calls[j]
        kind, reason = _classify_module(mod, name)
        if kind in ("move", "scale"):
            return Step(kind, name, apply=partial(_call_module, mod), module=mod, module_name=name)
        return Step(kind, name, module=mod, module_name=name, reason=reason)


def trace_model(model: nn.Module, args: tuple[Any, ...], notes: list[str]) -> tuple[FxGraph | HookGraph, nn.Module]:
    """The graph of an eval-mode copy of ``model`` (the copy is returned too; ``model`` is not touched).

    ``torch.fx`` first; when tracing fails (data-dependent control flow), forward hooks, with a note.
    """
    work = copy.deepcopy(model).eval()
    try:
        return FxGraph(work, args), work
    except Exception as e:  # noqa: BLE001 - any tracing failure falls back to hooks
        notes.append(
            f"torch.fx could not trace the model ({type(e).__name__}: {str(e)[:200]}); "
            "analysed the module call order with forward hooks instead: only direct "
            "module-to-module connections are visible, operations in forward() between "
            "modules are not, so every candidate rests on the numeric check"
        )
    work = copy.deepcopy(model).eval()
    try:
        return HookGraph(work, args), work
    except Exception as e2:  # noqa: BLE001
        raise ShapeError(
            f"the model failed on example_input ({type(e2).__name__}: {e2}); pass a batch the model accepts."
        ) from None

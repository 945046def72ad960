"""Second-order Taylor mode: Hessian quadratic forms v^T H v without Hessian-vector products.

Along the line W(t) = W + t v, every intermediate value u(t) of the loss has the Taylor coefficients
(u, u', u''); the loss's second coefficient is the quadratic form

    v^T H v = d^2/dt^2 L(W + t v) |_{t=0}.

Hutchinson's trace estimator (and the probe part of Hutch++ and of the Lanczos-deflated estimator)
needs only these scalars, not H v. Propagating (u', u'') through the forward pass costs, per
convolution or matrix product y = A(x, W), the bilinear rule

    y' = A(x', W) + A(x, v),      y'' = A(x'', W) + 2 A(x', v)

(4 forward products per probe, the primal pass being shared by all probes), against 6 for a
Hessian-vector product on a retained graph (a forward-mode tangent pass, then the backward-data
and backward-weights kernels for both the tangent and the cotangent). Piecewise-linear layers (ReLU,
max pooling) pass coefficients through their primal masks; eval-mode BatchNorm is affine in its
input and in (gamma, beta); LayerNorm, softmax, GELU, tanh, sigmoid, log-softmax, the NLL and MSE
losses have closed second-order rules. ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``) is traced through its math backend (:func:`symgen.functional.math_attention`):
matmuls, a scale, an additive mask and a (safe) softmax, each with its rule. Griewank & Walther,
Evaluating Derivatives (SIAM 2008), ch. 13; Bettencourt, Johnson & Duvenaud 2019 (Taylor-mode AD,
"jets"). Same numbers as v . (H v) to round-off (tests/test_taylor.py).

The loss is traced once per input signature with ``make_fx`` into ATen operations; a program with an
operation outside the rules below (an unsupported layer, BatchNorm in train mode) raises
:class:`TaylorUnsupported` at build time and the operators fall back to v . (H v).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from symgen.curvature.taylor_rules import RULES, VIEWS, Jet, TaylorUnsupported, check_node, flat_nodes
from symgen.functional import math_attention

__all__ = ["TaylorProgram", "TaylorUnsupported", "trace_loss"]

_aten = torch.ops.aten


def trace_loss(f: Callable[..., Tensor], params: Sequence[Tensor], x: Tensor, y: Tensor) -> GraphModule:
    """``f(*params, x, y)`` (a scalar loss) traced into a functional ATen graph with ``make_fx``.

    Args:
        f: the loss as a function of the parameter tensors, the input and the target.
        params: the parameter tensors.
        x: the input batch.
        y: the targets.

    Returns:
        The traced ``GraphModule`` (for :class:`TaylorProgram`).
    """
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad(), math_attention():  # attention as matmul, softmax, matmul: ops with rules
        return make_fx(functionalize(f))(*params, x, y)


class TaylorProgram:
    """The quadratic forms of one batch's loss: the primal pass is run once, at construction.

    ``form(vs)``: ``v^T H v`` for ``vs``, a list of tensors shaped like ``params``.

    Args:
        gm: :func:`trace_loss` of ``f(*params, x, y)``.
        params: the values it is taken at.
        x: the batch's inputs.
        y: its targets.

    Raises:
        TaylorUnsupported: a W-dependent value meets an operation without a rule.
    """

    def __init__(self, gm: GraphModule, params: Sequence[Tensor], x: Tensor, y: Tensor) -> None:
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self._param_nodes = placeholders[: len(params)]
        active = set(self._param_nodes)
        self._steps: list[Node] = []
        for n in nodes:
            if n.target is _aten.detach.default:  # a constant to autograd, so to the Taylor coefficients
                continue
            if n.op == "call_function" and any(a in active for a in flat_nodes((n.args, n.kwargs))):
                check_node(n, active)
                active.add(n)
                self._steps.append(n)
        self._output = next(n for n in nodes if n.op == "output").args[0]
        if isinstance(self._output, (list, tuple)):
            self._output = self._output[0]
        # the primal pass; keep only the values the rules read
        needed = {a for n in self._steps for a in flat_nodes((n.args, n.kwargs))} | set(self._steps)
        if x.ndim == 4 and x.device.type == "cpu":
            # oneDNN's forward convolutions are up to 2-3x faster channels-last; coefficients inherit it
            x = x.contiguous(memory_format=torch.channels_last)
        env: dict[Node, Any] = dict(zip(placeholders, [*params, x, y], strict=True))
        with torch.no_grad():
            for n in nodes:
                if n.op == "get_attr":
                    env[n] = getattr(gm, n.target)
                elif n.op == "call_function":
                    fn = _aten.reshape.default if n.target in VIEWS else n.target
                    env[n] = fn(*_load(n.args, env), **_load(n.kwargs, env))
        self.loss = env[self._output].detach()
        values = {n: v for n, v in env.items() if n in needed}
        del env
        last: dict[Node, int] = {}
        for i, n in enumerate(self._steps):
            for a in flat_nodes((n.args, n.kwargs)):
                last[a] = i
        # per step, what every probe reuses: its primal arguments and output, and the jets it frees
        self._calls = [
            (
                n,
                _load(n.args, values),
                _load(n.kwargs, values),
                values[n],
                [a for a in flat_nodes((n.args, n.kwargs)) if last.get(a) == i and a is not self._output],
            )
            for i, n in enumerate(self._steps)
        ]
        self._active = active

    def form(self, vs: Sequence[Tensor]) -> Tensor:
        """v^T H v = d^2/dt^2 L(W + t v) at t = 0 (Griewank & Walther, ch. 13).

        Args:
            vs: the direction v as tensors shaped like the parameters.

        Returns:
            The quadratic form, a 0-dim tensor.
        """
        if self._output not in self._active:
            return torch.zeros((), dtype=self.loss.dtype, device=self.loss.device)
        jets: dict[Node, Jet] = {n: (v, None) for n, v in zip(self._param_nodes, vs, strict=True)}
        with torch.no_grad():
            for n, args, kwargs, out, free in self._calls:
                jets[n] = RULES[n.target](args, kwargs, _load(list(n.args), jets, missing=True), out)
                for a in free:
                    jets.pop(a, None)
        d2 = jets[self._output][1]
        return torch.zeros((), dtype=self.loss.dtype, device=self.loss.device) if d2 is None else d2.reshape(())


def _load(a: Any, env: dict[Node, Any], missing: bool = False) -> Any:
    if isinstance(a, Node):
        return env.get(a) if missing else env[a]
    if isinstance(a, (list, tuple)):
        if missing and not flat_nodes(a):
            return None
        return type(a)(_load(x, env, missing) for x in a)
    if isinstance(a, dict):
        return {k: _load(v, env, missing) for k, v in a.items()}
    return None if missing else a

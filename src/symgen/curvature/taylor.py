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
losses have closed second-order rules. Griewank & Walther,
Evaluating Derivatives (SIAM 2008), ch. 13; Bettencourt, Johnson & Duvenaud 2019 (Taylor-mode AD,
"jets"). Same numbers as v . (H v) to round-off (tests/test_taylor.py).

The loss is traced once per input signature with ``make_fx`` into ATen operations; a program with an
operation outside the rules below (an unsupported layer, BatchNorm in train mode) raises
:class:`TaylorUnsupported` at build time and the operators fall back to v . (H v).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

__all__ = ["TaylorProgram", "TaylorUnsupported", "trace_loss"]

_aten = torch.ops.aten
Jet = (
    Any  # (u', u'' or None) for a tensor that depends on W; a tuple/list of jets for a multi-output op; None: constant
)


class TaylorUnsupported(Exception):
    """The traced loss uses an operation that has no Taylor rule here (the caller falls back)."""


def trace_loss(f: Callable[..., Tensor], params: Sequence[Tensor], x: Tensor, y: Tensor) -> GraphModule:
    """``f(*params, x, y)`` (a scalar loss) traced into a functional ATen graph."""
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        return make_fx(functionalize(f))(*params, x, y)


# -- helpers on jets --


def _add(u: Tensor | None, v: Tensor | None) -> Tensor | None:
    if u is None:
        return v
    return u if v is None else u + v


def _linear(fn: Callable[[Tensor], Tensor], j: Jet) -> Jet:
    return (fn(j[0]), None if j[1] is None else fn(j[1]))


def _bilinear(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor, ja: Jet, jb: Jet) -> Jet:
    """Coefficients of fn(a(t), b(t)) for fn bilinear: (ab)' = a'b + ab', (ab)'' = a''b + 2a'b' + ab''.
    Every term is a fresh tensor of the output's shape, so the sums are taken in place."""
    terms1 = ([fn(ja[0], b)] if ja is not None else []) + ([fn(a, jb[0])] if jb is not None else [])
    terms2 = [
        (fn(j[1], c) if j is ja else fn(c, j[1]), 1)
        for j, c in ((ja, b), (jb, a))
        if j is not None and j[1] is not None
    ]
    if ja is not None and jb is not None:
        terms2.append((fn(ja[0], jb[0]), 2))
    d1 = terms1[0]
    for t in terms1[1:]:
        d1 = d1.add_(t) if d1.shape == t.shape else d1 + t
    d2 = None
    for t, k in terms2:
        d2 = (
            (t.mul_(k) if k != 1 else t) if d2 is None else (d2.add_(t, alpha=k) if d2.shape == t.shape else d2 + k * t)
        )
    return (d1, d2)


def _fit(t: Tensor | None, shape: torch.Size) -> Tensor | None:
    return t if t is None or t.shape == shape else t.expand(shape)


def _channel(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


# -- rules: rule(args, kwargs, jets, out) -> jet; args hold primal values, jets the args' jets --


def _rule_linear_first(op: Any) -> Callable[..., Jet]:
    """Ops linear in their first (tensor) argument, the others constant: views, pads, pools, sums."""

    def rule(args, kwargs, jets, out):
        return _linear(lambda t: op(t, *args[1:], **kwargs), jets[0])

    return rule


def _rule_reshape(args, kwargs, jets, out):
    return _linear(lambda t: t.reshape(out.shape), jets[0])


def _rule_add(sign: float) -> Callable[..., Jet]:
    def rule(args, kwargs, jets, out):
        alpha = sign * kwargs.get("alpha", 1)
        ja, jb = jets[0], jets[1] if len(jets) > 1 else None
        if jb is not None and alpha != 1:
            jb = _linear(lambda t: alpha * t, jb)
        if ja is None:
            return (_fit(jb[0], out.shape), _fit(jb[1], out.shape))
        if jb is None:
            return (_fit(ja[0], out.shape), _fit(ja[1], out.shape))
        return (_fit(ja[0] + jb[0], out.shape), _fit(_add(ja[1], jb[1]), out.shape))

    return rule


def _rule_mul(args, kwargs, jets, out):
    return _bilinear(torch.mul, args[0], args[1], jets[0], jets[1] if len(jets) > 1 else None)


def _rule_div(args, kwargs, jets, out):
    return _linear(lambda t: t / args[1], jets[0])


def _rule_mm(op: Any) -> Callable[..., Jet]:
    def rule(args, kwargs, jets, out):
        return _bilinear(op, args[0], args[1], jets[0], jets[1])

    return rule


def _rule_addmm(args, kwargs, jets, out):
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    d1, d2 = _bilinear(torch.mm, args[1], args[2], jets[1], jets[2])
    if alpha != 1:
        d1, d2 = (None if d is None else alpha * d for d in (d1, d2))
    if jets[0] is not None:  # the bias term is linear
        d1, d2 = _add(d1, beta * jets[0][0]), _add(d2, None if jets[0][1] is None else beta * jets[0][1])
    return (_fit(d1, out.shape), _fit(d2, out.shape))


def _rule_convolution(args, kwargs, jets, out):
    x, w, _, *cfg = args

    def conv(a: Tensor, b: Tensor) -> Tensor:
        return _aten.convolution(a, b, None, *cfg)

    d1, d2 = _bilinear(conv, x, w, jets[0], jets[1])
    if jets[2] is not None:  # bias: linear, and its second coefficient is zero
        bias = _channel(jets[2][0], out.ndim)
        d1 = bias.expand(out.shape) if d1 is None else d1 + bias
    return (d1, d2)


def _rule_batch_norm(args, kwargs, jets, out):
    """Eval-mode BatchNorm, an affine map: y = x s + (b - m s), s = gamma / sqrt(var + eps)."""
    x, gamma, beta, mean, var, _, _, eps = args
    r = torch.rsqrt(var + eps)
    s = _channel(r if gamma is None else gamma * r, x.ndim)
    d1 = d2 = None
    if jets[0] is not None:
        d1, d2 = _linear(lambda t: t * s, jets[0])
    if jets[1] is not None:  # gamma' = v_gamma: x (v_gamma r) - m (v_gamma r), and 2 x' (v_gamma r)
        c = jets[1][0] * r
        d1 = _add(d1, torch.addcmul(_channel(-mean * c, x.ndim), x, _channel(c, x.ndim)))
        if jets[0] is not None:
            d2 = _add(d2, torch.mul(jets[0][0], _channel(2 * c, x.ndim)))
    if jets[2] is not None:
        d1 = _add(d1, _channel(jets[2][0], x.ndim))
    return ((_fit(d1, x.shape), _fit(d2, x.shape)), None, None)


def _rule_relu(args, kwargs, jets, out):
    return _linear(lambda t: _aten.threshold_backward(t, out, 0), jets[0])


def _rule_max_pool(args, kwargs, jets, out):
    values, idx = out
    flat = idx.flatten(2)
    return (_linear(lambda t: t.flatten(2).gather(2, flat).view(values.shape), jets[0]), None)


def _rule_log_softmax(args, kwargs, jets, out):
    """y = x - lse(x): lse' = <p, x'>, lse'' = <p, x''> + <p, x'^2> - <p, x'>^2, p = softmax(x)."""
    dim = args[1]
    p = out.exp()
    x1, x2 = jets[0]
    m1 = (p * x1).sum(dim, keepdim=True)
    d2 = (p * x1 * x1).sum(dim, keepdim=True) - m1 * m1
    if x2 is not None:
        d2 = d2 + (p * x2).sum(dim, keepdim=True)
        return (x1 - m1, x2 - d2)
    return (x1 - m1, -d2.expand(out.shape))


def _rule_softmax(args, kwargs, jets, out):
    """s = exp(x - lse(x)): s' = s (x' - lse'), s'' = s ((x' - lse')^2 + x'' - lse'')."""
    dim, s = args[1], out
    x1, x2 = jets[0]
    m1 = (s * x1).sum(dim, keepdim=True)
    c1 = x1 - m1
    d2 = c1 * c1 - (s * c1 * c1).sum(dim, keepdim=True)  # (x' - lse')^2 - (lse'' without its x'' part)
    if x2 is not None:
        d2 = d2 + x2 - (s * x2).sum(dim, keepdim=True)
    return (s * c1, s * d2)


def _smooth(f1: Tensor, f2: Tensor, j: Jet) -> Jet:
    """y = f(x) elementwise: y' = f'(x) x', y'' = f'(x) x'' + f''(x) x'^2."""
    x1, x2 = j
    d2 = f2 * x1 * x1
    return (f1 * x1, d2 if x2 is None else torch.addcmul(d2, f1, x2))


def _rule_gelu(args, kwargs, jets, out):
    x = args[0]
    phi = torch.exp(-0.5 * x * x) * (0.5 * math.sqrt(2 / math.pi))  # normal density
    return _smooth(0.5 * (1 + torch.erf(x * math.sqrt(0.5))) + x * phi, phi * (2 - x * x), jets[0])


def _rule_tanh(args, kwargs, jets, out):
    f1 = 1 - out * out
    return _smooth(f1, -2 * out * f1, jets[0])


def _rule_sigmoid(args, kwargs, jets, out):
    f1 = out * (1 - out)
    return _smooth(f1, f1 * (1 - 2 * out), jets[0])


def _rule_layer_norm(args, kwargs, jets, out):
    """y = xhat gamma + beta, xhat = (x - mean) r, r = (var + eps)^(-1/2), moments over the last dims:
    var' = 2 <xc xc'>, var'' = 2 <xc'^2 + xc xc''>, r' = -r^3 var'/2, r'' = 3 r^5 var'^2/4 - r^3 var''/2."""
    x, shape, gamma = args[0], args[1], args[2]
    dims = tuple(range(x.ndim - len(shape), x.ndim))
    y, mean, r = out
    xhat = (x - mean) * r
    d1 = d2 = None
    if jets[0] is not None:
        x1, x2 = jets[0]
        c1 = x1 - x1.mean(dims, keepdim=True)
        c2 = None if x2 is None else x2 - x2.mean(dims, keepdim=True)
        v1 = 2 * (xhat * c1).mean(dims, keepdim=True) / r  # var' with xc = xhat / r
        v2 = 2 * (c1 * c1).mean(dims, keepdim=True)
        if c2 is not None:
            v2 = v2 + 2 * (xhat * c2).mean(dims, keepdim=True) / r
        r1 = -0.5 * r**3 * v1
        r2 = 0.75 * r**5 * v1 * v1 - 0.5 * r**3 * v2
        h1 = c1 * r + xhat / r * r1
        h2 = 2 * c1 * r1 + xhat / r * r2
        if c2 is not None:
            h2 = h2 + c2 * r
        d1, d2 = (h1, h2) if gamma is None else (h1 * gamma, h2 * gamma)
    if jets[2] is not None:  # gamma' = v_gamma
        d1 = _add(d1, xhat * jets[2][0])
        if jets[0] is not None:
            d2 = d2 + 2 * h1 * jets[2][0]
    if len(jets) > 3 and jets[3] is not None:
        d1 = _add(d1, jets[3][0].expand(y.shape))
    return ((_fit(d1, y.shape), _fit(d2, y.shape)), None, None)


def _rule_unpack(op: Any) -> Callable[..., Jet]:
    """Linear ops with several outputs (unbind, split): one jet per output."""

    def rule(args, kwargs, jets, out):
        ones = op(jets[0][0], *args[1:], **kwargs)
        twos = [None] * len(ones) if jets[0][1] is None else op(jets[0][1], *args[1:], **kwargs)
        return [(a, b) for a, b in zip(ones, twos, strict=True)]

    return rule


def _rule_nll(args, kwargs, jets, out):
    def nll(t: Tensor) -> Tensor:
        return _aten.nll_loss_forward(t, *args[1:], **kwargs)[0]

    return (_linear(nll, jets[0]), None)


def _rule_mse(args, kwargs, jets, out):
    """reduce((x - t)^2): ' = reduce(2 r x'), '' = reduce(2 x'^2 + 2 r x''), r = x - t (t constant)."""
    reduction = args[2] if len(args) > 2 else kwargs.get("reduction", 1)
    red = {0: lambda t: t, 1: torch.mean, 2: torch.sum}[reduction]
    r = args[0] - args[1]
    x1, x2 = jets[0]
    d2 = 2 * x1 * x1 if x2 is None else torch.addcmul(2 * x1 * x1, r, x2, value=2)
    return (red(2 * r * x1), red(d2))


def _rule_getitem(args, kwargs, jets, out):
    return None if jets[0] is None else jets[0][args[1]]


def _rule_cat(args, kwargs, jets, out):
    tensors, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0)
    parts = jets[0]
    firsts = [p[0] if p is not None else torch.zeros_like(t) for t, p in zip(tensors, parts, strict=True)]
    d2 = None
    if any(p is not None and p[1] is not None for p in parts):
        d2 = torch.cat(
            [
                p[1] if p is not None and p[1] is not None else torch.zeros_like(t)
                for t, p in zip(tensors, parts, strict=True)
            ],
            dim,
        )
    return (torch.cat(firsts, dim), d2)


_RULES: dict[Any, Callable[..., Jet]] = {
    _aten.convolution.default: _rule_convolution,
    _aten.addmm.default: _rule_addmm,
    _aten.mm.default: _rule_mm(torch.mm),
    _aten.bmm.default: _rule_mm(torch.bmm),
    _aten.mul.Tensor: _rule_mul,
    _aten.div.Tensor: _rule_div,
    _aten.add.Tensor: _rule_add(1.0),
    _aten.sub.Tensor: _rule_add(-1.0),
    _aten.native_batch_norm.default: _rule_batch_norm,
    _aten._native_batch_norm_legit_no_training.default: lambda a, k, j, o: _rule_batch_norm(
        (*a[:5], False, *a[5:]), k, j[:5] + [None] + j[5:], o
    ),
    _aten.relu.default: _rule_relu,
    _aten.max_pool2d_with_indices.default: _rule_max_pool,
    _aten._log_softmax.default: _rule_log_softmax,
    _aten.nll_loss_forward.default: _rule_nll,
    _aten.mse_loss.default: _rule_mse,
    _aten._softmax.default: _rule_softmax,
    _aten.gelu.default: _rule_gelu,
    _aten.tanh.default: _rule_tanh,
    _aten.sigmoid.default: _rule_sigmoid,
    _aten.native_layer_norm.default: _rule_layer_norm,
    _aten.unbind.int: _rule_unpack(_aten.unbind.int),
    _aten.split.Tensor: _rule_unpack(_aten.split.Tensor),
    _aten.split_with_sizes.default: _rule_unpack(_aten.split_with_sizes.default),
    _aten.view.default: _rule_reshape,
    _aten._unsafe_view.default: _rule_reshape,
    _aten.reshape.default: _rule_reshape,
    _aten.cat.default: _rule_cat,
    operator.getitem: _rule_getitem,
}
_LINEAR_FIRST = (
    _aten.t.default,
    _aten.transpose.int,
    _aten.permute.default,
    _aten.expand.default,
    _aten.slice.Tensor,
    _aten.select.int,
    _aten.unsqueeze.default,
    _aten.squeeze.dim,
    _aten.clone.default,
    _aten.alias.default,
    _aten.constant_pad_nd.default,
    _aten.mean.dim,
    _aten.mean.default,
    _aten.sum.dim_IntList,
    _aten.sum.default,
    _aten.avg_pool2d.default,
    _aten._adaptive_avg_pool2d.default,
    _aten.neg.default,
    _aten._to_copy.default,
)
_RULES.update({op: _rule_linear_first(op) for op in _LINEAR_FIRST})


_VIEWS = (_aten.view.default, _aten._unsafe_view.default)


# the arguments that may depend on W (the rest must be constant); ops not listed: any argument
_FIRST_ONLY = (0,)
_ACTIVE_ARGS: dict[Any, tuple[int, ...]] = {
    _aten.div.Tensor: _FIRST_ONLY,
    _aten.mse_loss.default: _FIRST_ONLY,
    _aten.relu.default: _FIRST_ONLY,
    _aten.max_pool2d_with_indices.default: _FIRST_ONLY,
    _aten._log_softmax.default: _FIRST_ONLY,
    _aten.nll_loss_forward.default: _FIRST_ONLY,
    _aten.view.default: _FIRST_ONLY,
    _aten._unsafe_view.default: _FIRST_ONLY,
    _aten.reshape.default: _FIRST_ONLY,
    operator.getitem: _FIRST_ONLY,
    _aten.native_batch_norm.default: (0, 1, 2),
    _aten._native_batch_norm_legit_no_training.default: (0, 1, 2),
    _aten._softmax.default: _FIRST_ONLY,
    _aten.gelu.default: _FIRST_ONLY,
    _aten.tanh.default: _FIRST_ONLY,
    _aten.sigmoid.default: _FIRST_ONLY,
    _aten.native_layer_norm.default: (0, 2, 3),
    _aten.unbind.int: _FIRST_ONLY,
    _aten.split.Tensor: _FIRST_ONLY,
    _aten.split_with_sizes.default: _FIRST_ONLY,
    **{op: _FIRST_ONLY for op in _LINEAR_FIRST},
}


def _check(n: Node, active: set[Node]) -> None:
    """TaylorUnsupported unless node n's W-dependent arguments are ones its rule handles."""
    if n.target not in _RULES:
        raise TaylorUnsupported(f"no Taylor rule for {n.target}")
    if str(n.target).startswith("aten.") and n.target._schema.is_mutable:
        raise TaylorUnsupported(f"in-place operation {n.target}")
    if set(_flat_nodes(list(n.kwargs.values()))) & active:
        raise TaylorUnsupported(f"{n.target} with a W-dependent keyword argument")
    allowed = _ACTIVE_ARGS.get(n.target)
    if allowed is not None and any(i not in allowed and set(_flat_nodes(a)) & active for i, a in enumerate(n.args)):
        raise TaylorUnsupported(f"{n.target} with a W-dependent argument its rule takes as constant")
    if n.target is _aten.native_batch_norm.default and n.args[5]:
        raise TaylorUnsupported("BatchNorm with batch statistics (bn_mode='train')")
    if n.target is _aten.gelu.default and n.kwargs.get("approximate", "none") != "none":
        raise TaylorUnsupported("GELU with the tanh approximation")


def _flat_nodes(a: Any) -> list[Node]:
    if isinstance(a, Node):
        return [a]
    if isinstance(a, (list, tuple)):
        return [n for x in a for n in _flat_nodes(x)]
    return []


class TaylorProgram:
    """The quadratic forms of one batch's loss: the primal pass is run once, at construction.

    ``gm``: :func:`trace_loss` of ``f(*params, x, y)``; ``params`` the values it is taken at.
    ``form(vs)``: ``v^T H v`` for ``vs``, a list of tensors shaped like ``params``. Raises
    :class:`TaylorUnsupported` if a W-dependent value meets an operation without a rule.
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
            if n.op == "call_function" and any(a in active for a in _flat_nodes((n.args, n.kwargs))):
                _check(n, active)
                active.add(n)
                self._steps.append(n)
        self._output = next(n for n in nodes if n.op == "output").args[0]
        if isinstance(self._output, (list, tuple)):
            self._output = self._output[0]
        # the primal pass; keep only the values the rules read
        needed = {a for n in self._steps for a in _flat_nodes((n.args, n.kwargs))} | set(self._steps)
        if x.ndim == 4 and x.device.type == "cpu":
            # oneDNN's forward convolutions are up to 2-3x faster channels-last; coefficients inherit it
            x = x.contiguous(memory_format=torch.channels_last)
        env: dict[Node, Any] = dict(zip(placeholders, [*params, x, y], strict=True))
        with torch.no_grad():
            for n in nodes:
                if n.op == "get_attr":
                    env[n] = getattr(gm, n.target)
                elif n.op == "call_function":
                    fn = _aten.reshape.default if n.target in _VIEWS else n.target
                    env[n] = fn(*_load(n.args, env), **_load(n.kwargs, env))
        self.loss = env[self._output].detach()
        values = {n: v for n, v in env.items() if n in needed}
        del env
        last: dict[Node, int] = {}
        for i, n in enumerate(self._steps):
            for a in _flat_nodes((n.args, n.kwargs)):
                last[a] = i
        # per step, what every probe reuses: its primal arguments and output, and the jets it frees
        self._calls = [
            (
                n,
                _load(n.args, values),
                _load(n.kwargs, values),
                values[n],
                [a for a in _flat_nodes((n.args, n.kwargs)) if last.get(a) == i and a is not self._output],
            )
            for i, n in enumerate(self._steps)
        ]
        self._active = active

    def form(self, vs: Sequence[Tensor]) -> Tensor:
        """d^2/dt^2 of the loss along W + t v (a 0-dim tensor)."""
        if self._output not in self._active:
            return torch.zeros((), dtype=self.loss.dtype, device=self.loss.device)
        jets: dict[Node, Jet] = {n: (v, None) for n, v in zip(self._param_nodes, vs, strict=True)}
        with torch.no_grad():
            for n, args, kwargs, out, free in self._calls:
                jets[n] = _RULES[n.target](args, kwargs, _load(list(n.args), jets, missing=True), out)
                for a in free:
                    jets.pop(a, None)
        d2 = jets[self._output][1]
        return torch.zeros((), dtype=self.loss.dtype, device=self.loss.device) if d2 is None else d2.reshape(())


def _load(a: Any, env: dict[Node, Any], missing: bool = False) -> Any:
    if isinstance(a, Node):
        return env.get(a) if missing else env[a]
    if isinstance(a, (list, tuple)):
        if missing and not _flat_nodes(a):
            return None
        return type(a)(_load(x, env, missing) for x in a)
    if isinstance(a, dict):
        return {k: _load(v, env, missing) for k, v in a.items()}
    return None if missing else a

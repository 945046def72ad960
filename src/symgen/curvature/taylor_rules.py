"""The rule table of second-order Taylor mode (:mod:`symgen.curvature.taylor`): one rule per ATen operation.

A jet is ``(u', u'')``, the first two Taylor coefficients of a value u(t) along W(t) = W + t v (None for
a value that does not depend on W; ``u''`` None when it is zero). A rule ``rule(args, kwargs, jets, out)``
maps the primal arguments, their jets and the primal output to the output's jet, e.g. for a bilinear
map y = A(x, W): y' = A(x', W) + A(x, v), y'' = A(x'', W) + 2 A(x', v). :func:`check_node` refuses an
operation without a rule, or with a W-dependent argument its rule takes as constant.
Griewank & Walther, Evaluating Derivatives (SIAM 2008), ch. 13; Bettencourt, Johnson & Duvenaud 2019.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

__all__ = ["TaylorUnsupported"]

_aten = torch.ops.aten
# (u', u'' or None) for a tensor that depends on W; a tuple/list of jets for a multi-output op; None: constant
Jet = Any
Args = Sequence[Any]  # primal values of a node's positional arguments
Kwargs = dict[str, Any]
Jets = Any  # the jets of the positional arguments, shaped like them (None where constant)
Rule = Callable[[Args, Kwargs, Jets, Any], Jet]


class TaylorUnsupported(Exception):
    """The traced loss uses an operation that has no Taylor rule here (the caller falls back)."""


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


def _rule_linear_first(op: Any) -> Rule:
    """Ops linear in their first (tensor) argument, the others constant: views, pads, pools, sums."""

    def rule(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
        return _linear(lambda t: op(t, *args[1:], **kwargs), jets[0])

    return rule


def _rule_reshape(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    return _linear(lambda t: t.reshape(out.shape), jets[0])


def _rule_add(sign: float) -> Rule:
    def rule(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
        alpha = sign * kwargs.get("alpha", 1)
        ja: Jet = jets[0]
        jb: Jet = jets[1] if len(jets) > 1 else None
        if jb is not None and alpha != 1:
            jb = _linear(lambda t: alpha * t, jb)
        if ja is None:
            return (_fit(jb[0], out.shape), _fit(jb[1], out.shape))
        if jb is None:
            return (_fit(ja[0], out.shape), _fit(ja[1], out.shape))
        return (_fit(ja[0] + jb[0], out.shape), _fit(_add(ja[1], jb[1]), out.shape))

    return rule


def _rule_mul(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    return _bilinear(torch.mul, args[0], args[1], jets[0], jets[1] if len(jets) > 1 else None)


def _rule_div(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    return _linear(lambda t: t / args[1], jets[0])


def _rule_mm(op: Any) -> Rule:
    def rule(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
        return _bilinear(op, args[0], args[1], jets[0], jets[1])

    return rule


def _rule_addmm(op: Any) -> Rule:
    """beta c + alpha op(a, b) (addmm; baddbmm: attention scores plus a mask): bilinear in (a, b), linear in c."""

    def rule(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        d1 = d2 = None
        if jets[1] is not None or jets[2] is not None:
            d1, d2 = _bilinear(op, args[1], args[2], jets[1], jets[2])
        if alpha != 1:
            d1, d2 = (None if d is None else alpha * d for d in (d1, d2))
        if jets[0] is not None:  # the bias term is linear
            d1, d2 = _add(d1, beta * jets[0][0]), _add(d2, None if jets[0][1] is None else beta * jets[0][1])
        return (_fit(d1, out.shape), _fit(d2, out.shape))

    return rule


def _rule_convolution(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    x, w, _, *cfg = args

    def conv(a: Tensor, b: Tensor) -> Tensor:
        y: Tensor = _aten.convolution(a, b, None, *cfg)
        return y

    d1, d2 = _bilinear(conv, x, w, jets[0], jets[1])
    if jets[2] is not None:  # bias: linear, and its second coefficient is zero
        bias = _channel(jets[2][0], out.ndim)
        d1 = bias.expand(out.shape) if d1 is None else d1 + bias
    return (d1, d2)


def _rule_batch_norm(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
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


def _rule_relu(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    return _linear(lambda t: _aten.threshold_backward(t, out, 0), jets[0])


def _rule_max_pool(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    values, idx = out
    flat = idx.flatten(2)
    return (_linear(lambda t: t.flatten(2).gather(2, flat).view(values.shape), jets[0]), None)


def _rule_log_softmax(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
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


def _rule_softmax(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
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


def _rule_gelu(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    x = args[0]
    phi = torch.exp(-0.5 * x * x) * (0.5 * math.sqrt(2 / math.pi))  # normal density
    return _smooth(0.5 * (1 + torch.erf(x * math.sqrt(0.5))) + x * phi, phi * (2 - x * x), jets[0])


def _rule_tanh(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    f1 = 1 - out * out
    return _smooth(f1, -2 * out * f1, jets[0])


def _rule_sigmoid(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    f1 = out * (1 - out)
    return _smooth(f1, f1 * (1 - 2 * out), jets[0])


def _rule_layer_norm(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
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


def _rule_unpack(op: Any) -> Rule:
    """Linear ops with several outputs (unbind, split): one jet per output."""

    def rule(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
        ones = op(jets[0][0], *args[1:], **kwargs)
        twos = [None] * len(ones) if jets[0][1] is None else op(jets[0][1], *args[1:], **kwargs)
        return [(a, b) for a, b in zip(ones, twos, strict=True)]

    return rule


def _rule_nll(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    def nll(t: Tensor) -> Tensor:
        y: Tensor = _aten.nll_loss_forward(t, *args[1:], **kwargs)[0]
        return y

    return (_linear(nll, jets[0]), None)


def _rule_mse(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    """reduce((x - t)^2): ' = reduce(2 r x'), '' = reduce(2 x'^2 + 2 r x''), r = x - t (t constant)."""
    reduction = args[2] if len(args) > 2 else kwargs.get("reduction", 1)
    reducers: dict[int, Callable[[Tensor], Tensor]] = {0: lambda t: t, 1: torch.mean, 2: torch.sum}
    red = reducers[reduction]
    r = args[0] - args[1]
    x1, x2 = jets[0]
    d2 = 2 * x1 * x1 if x2 is None else torch.addcmul(2 * x1 * x1, r, x2, value=2)
    return (red(2 * r * x1), red(d2))


def _rule_getitem(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
    return None if jets[0] is None else jets[0][args[1]]


def _rule_cat(args: Args, kwargs: Kwargs, jets: Jets, out: Any) -> Jet:
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


RULES: dict[Any, Rule] = {
    _aten.convolution.default: _rule_convolution,
    _aten.addmm.default: _rule_addmm(torch.mm),
    _aten.baddbmm.default: _rule_addmm(torch.bmm),
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
    # scaled_dot_product_attention's math backend (traced in functional.math_attention): softmax whose fully
    # masked rows are 0 instead of NaN; the rule's factor s keeps them 0
    _aten._safe_softmax.default: _rule_softmax,
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
LINEAR_FIRST = (
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
    _aten.mul.Scalar,
    _aten._to_copy.default,
)
RULES.update({op: _rule_linear_first(op) for op in LINEAR_FIRST})


# views whose primal is recomputed with reshape (the primal pass may meet non-viewable strides)
VIEWS = (_aten.view.default, _aten._unsafe_view.default)


# the arguments that may depend on W (the rest must be constant); ops not listed: any argument
FIRST_ONLY = (0,)
ACTIVE_ARGS: dict[Any, tuple[int, ...]] = {
    _aten.div.Tensor: FIRST_ONLY,
    _aten.mse_loss.default: FIRST_ONLY,
    _aten.relu.default: FIRST_ONLY,
    _aten.max_pool2d_with_indices.default: FIRST_ONLY,
    _aten._log_softmax.default: FIRST_ONLY,
    _aten.nll_loss_forward.default: FIRST_ONLY,
    _aten.view.default: FIRST_ONLY,
    _aten._unsafe_view.default: FIRST_ONLY,
    _aten.reshape.default: FIRST_ONLY,
    operator.getitem: FIRST_ONLY,
    _aten.native_batch_norm.default: (0, 1, 2),
    _aten._native_batch_norm_legit_no_training.default: (0, 1, 2),
    _aten._softmax.default: FIRST_ONLY,
    _aten._safe_softmax.default: FIRST_ONLY,
    _aten.gelu.default: FIRST_ONLY,
    _aten.tanh.default: FIRST_ONLY,
    _aten.sigmoid.default: FIRST_ONLY,
    _aten.native_layer_norm.default: (0, 2, 3),
    _aten.unbind.int: FIRST_ONLY,
    _aten.split.Tensor: FIRST_ONLY,
    _aten.split_with_sizes.default: FIRST_ONLY,
    **{op: FIRST_ONLY for op in LINEAR_FIRST},
}


def check_node(n: Node, active: set[Node]) -> None:
    """Raise :class:`TaylorUnsupported` unless node n's W-dependent arguments are ones its rule handles.

    Args:
        n: the graph node.
        active: the nodes that depend on W.
    """
    if n.target not in RULES:
        raise TaylorUnsupported(f"no Taylor rule for {n.target}")
    if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
        raise TaylorUnsupported(f"in-place operation {n.target}")
    if set(flat_nodes(list(n.kwargs.values()))) & active:
        raise TaylorUnsupported(f"{n.target} with a W-dependent keyword argument")
    allowed = ACTIVE_ARGS.get(n.target)
    if allowed is not None and any(i not in allowed and set(flat_nodes(a)) & active for i, a in enumerate(n.args)):
        raise TaylorUnsupported(f"{n.target} with a W-dependent argument its rule takes as constant")
    if n.target is _aten.native_batch_norm.default and n.args[5]:
        raise TaylorUnsupported("BatchNorm with batch statistics (bn_mode='train')")
    if n.target is _aten.gelu.default and n.kwargs.get("approximate", "none") != "none":
        raise TaylorUnsupported("GELU with the tanh approximation")


def flat_nodes(a: Any) -> list[Node]:
    """The graph nodes inside ``a`` (a node, or nested lists and tuples).

    Args:
        a: a node argument.

    Returns:
        The nodes, in order.
    """
    if isinstance(a, Node):
        return [a]
    if isinstance(a, (list, tuple)):
        return [n for x in a for n in flat_nodes(x)]
    return []

"""The ``structured`` empirical-NTK method: layer contributions from activations and backward signals.

For ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / :class:`NTKLinear` layers ``y = W a + b`` the
contribution is ``sum_a (a_i . a_j)(g_ia . g_ja)`` (positions summed for convolutions and sequences),
from forward activations ``a`` and per-output backward signals ``g = d f_a / d y``, never forming the
Jacobian; other parameters fall back to the ``jacobian`` method. Source: Novak, Sohl-Dickstein,
Schoenholz, "Fast finite width neural tangent kernel", arXiv 2206.08720.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from symgen.functional import call
from symgen.ntk.analytic import NTKLinear
from symgen.ntk.jacobian import blocks, jacobian_ntk, to_kernel

__all__: list[str] = []  # internal: reached through symgen.ntk.empirical_ntk_fn


@dataclass
class AffineLayer:
    """A layer ``y = ws * W a + bs * b`` whose NTK contribution is computed from (a, g)."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv1d" | "conv2d"
    weight_key: str | None
    bias_key: str | None
    weight_scale: float
    bias_scale: float
    calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (input a, output y) per call


def affine_layers(model: nn.Module, wrt: Mapping[str, Tensor]) -> list[AffineLayer]:
    """Layers of exactly supported types whose parameters are in ``wrt`` and not shared with other modules."""
    owners: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    out, seen = [], set()
    for name, mod in model.named_modules():
        t = type(mod)
        if t is nn.Linear or t is NTKLinear:
            kind, ws, bs = "linear", getattr(mod, "weight_scale", 1.0), getattr(mod, "bias_scale", 1.0)
        elif t in (nn.Conv1d, nn.Conv2d):
            if (
                mod.groups != 1
                or mod.padding_mode != "zeros"
                or isinstance(mod.padding, str)
                and mod.padding != "valid"
            ):
                continue  # grouped / non-zero / "same" padding: left to the jacobian fallback
            kind, ws, bs = ("conv1d" if t is nn.Conv1d else "conv2d"), 1.0, 1.0
        else:
            continue
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        prefix = f"{name}." if name else ""
        keys = {}
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            key = prefix + pname
            keys[pname] = key if (p is not None and key in wrt and owners.get(id(p), 0) == 1) else None
        if keys["weight"] is None and keys["bias"] is None:
            continue
        if keys["weight"] is None and getattr(mod, "weight", None) is not None and (prefix + "weight") in wrt:
            continue  # a shared weight: keep the whole layer in the fallback
        out.append(AffineLayer(name, mod, kind, keys["weight"], keys["bias"], float(ws), float(bs)))
    return out


def _as_positions(layer: AffineLayer, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Input ``a`` -> A (N, S, K) and backward signals ``g`` (O, N, *out) -> G (O, N, S, C)."""
    mod = layer.module
    o, n = g.shape[0], g.shape[1]
    if layer.kind == "linear":
        k, c = a.shape[-1], g.shape[-1]
        return a.reshape(n, -1, k), g.reshape(o, n, -1, c)
    assert isinstance(mod, nn.Conv1d | nn.Conv2d)  # affine_layers: kind "conv1d" / "conv2d"
    # padding "same" and non-zero padding modes are left to the jacobian fallback (affine_layers)
    padding = (0,) * len(mod.kernel_size) if isinstance(mod.padding, str) else mod.padding
    if layer.kind == "conv2d":
        cols = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)
    else:
        pad = padding[0]
        cols = F.unfold(
            a.unsqueeze(-1),
            (mod.kernel_size[0], 1),
            dilation=(mod.dilation[0], 1),
            padding=(pad, 0),
            stride=(mod.stride[0], 1),
        )
    c = g.shape[2]
    return cols.transpose(1, 2), g.reshape(o, n, c, -1).transpose(2, 3)


def _pair_contribution(
    layer: AffineLayer, a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, output: str, budget: int
) -> Tensor:
    """sum over weight and bias of <J_layer(x_i), J_layer(x_j)> for one pair of calls, never forming J."""
    A1, G1 = _as_positions(layer, a1, g1)
    A2, G2 = _as_positions(layer, a2, g2)
    o, n1, s1, c = G1.shape
    n2, s2, k = A2.shape[0], A2.shape[1], A2.shape[2]
    ws2 = layer.weight_scale**2 if layer.weight_key else 0.0
    bs2 = layer.bias_scale**2 if layer.bias_key else 0.0
    itemsize = A1.element_size()
    if s1 == 1 and s2 == 1:
        g1f, g2f = G1[:, :, 0].transpose(0, 1), G2[:, :, 0].transpose(0, 1)  # (N, O, C)
        if output == "trace":
            gg = g1f.reshape(n1, o * c) @ g2f.reshape(n2, o * c).T
            return (ws2 * (A1[:, 0] @ A2[:, 0].T) + bs2) * gg if ws2 else bs2 * gg
        gg = to_kernel(g1f.reshape(n1 * o, c) @ g2f.reshape(n2 * o, c).T, n1, n2, o, output)
        aa = ws2 * (A1[:, 0] @ A2[:, 0].T) + bs2 if ws2 else torch.full((n1, n2), bs2, dtype=gg.dtype, device=gg.device)
        return aa[:, :, None, None] * gg
    shape = (n1, n2) if output == "trace" else (n1, n2, o, o)
    res = torch.zeros(shape, dtype=A1.dtype, device=A1.device)
    if bs2:
        b1, b2 = G1.sum(2).transpose(0, 1), G2.sum(2).transpose(0, 1)  # (N, O, C)
        if output == "trace":
            res += bs2 * (b1.reshape(n1, o * c) @ b2.reshape(n2, o * c).T)
        else:
            res += bs2 * to_kernel(b1.reshape(n1 * o, c) @ b2.reshape(n2 * o, c).T, n1, n2, o, output)
    if not ws2:
        return res
    gram_cost = s1 * s2 * (k + o * c)
    jac_cost = o * c * k * (1 if output == "trace" else o)
    if output == "trace" and gram_cost <= jac_cost:
        # sum_{s,t} (A1_is . A2_jt) (sum_a G1_ias . G2_jat)
        rows = max(1, budget // max(1, 2 * n2 * s1 * s2 * itemsize))
        for sl in blocks(n1, rows):
            aa = torch.einsum("nsk,mtk->nmst", A1[sl], A2)
            gg = torch.einsum("ansc,amtc->nmst", G1[:, sl], G2)
            res[sl] += ws2 * (aa * gg).sum((2, 3))
        return res
    # explicit per-sample layer Jacobians J[i, a] = sum_s G_ias A_is^T (cheaper when S^2 > C K)
    j2 = torch.einsum("amsc,msk->mack", G2, A2).reshape(n2 * o, c * k)
    rows = max(1, budget // max(1, 2 * o * c * k * itemsize))
    for sl in blocks(n1, rows):
        nb = sl.stop - sl.start
        j1 = torch.einsum("ansc,nsk->nack", G1[:, sl], A1[sl]).reshape(nb * o, c * k)
        if output == "trace":
            res[sl] += ws2 * (j1.reshape(nb, o * c * k) @ j2.reshape(n2, o * c * k).T)
        else:
            res[sl] += ws2 * to_kernel(j1 @ j2.T, nb, n2, o, output)
    return res


def _backward_signals(f: Tensor, zs: list[Tensor], o: int) -> tuple[Tensor | None, ...]:
    """``d f[:, a] / d z`` for every output a and layer output z: tensors (O, *z.shape) (None if unused)."""
    n = f.shape[0]
    with torch.enable_grad():
        if o == 1:  # one output: a plain backward pass, no batching machinery
            return tuple(
                None if g is None else g.unsqueeze(0) for g in torch.autograd.grad(f.sum(), zs, allow_unused=True)
            )
        basis = torch.eye(o, dtype=f.dtype, device=f.device)[:, None, :].expand(o, n, o)
        try:
            return torch.autograd.grad(
                f, zs, grad_outputs=basis, is_grads_batched=True, allow_unused=True, retain_graph=True
            )
        except RuntimeError:  # an op without a batching rule: one backward pass per output instead
            per_out = [torch.autograd.grad(f[:, a].sum(), zs, retain_graph=True, allow_unused=True) for a in range(o)]
            return tuple(
                None
                if all(g[i] is None for g in per_out)
                else torch.stack([torch.zeros_like(z) if g[i] is None else g[i] for g in per_out])
                for i, z in enumerate(zs)
            )


def _signals(
    model: nn.Module,
    layers: list[AffineLayer],
    wrt: Mapping[str, Tensor],
    fixed: Mapping[str, Tensor],
    x: Tensor,
    o: int,
) -> list[list[tuple[Tensor, Tensor]]] | None:
    """Per layer, per call: (input a (N, ...), backward signals g (O, N, *out)). None if not per-sample."""
    n = x.shape[0]
    bad = []
    for layer in layers:
        layer.calls = []

    def make_hook(layer: AffineLayer) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
            if (
                not inputs
                or not isinstance(out, Tensor)
                or inputs[0].shape[0] != n
                or out.shape[0] != n
                or inputs[0].dim() < (2 if layer.kind == "linear" else 3 if layer.kind == "conv1d" else 4)
            ):
                bad.append(layer.name)
                return None
            layer.calls.append((inputs[0].detach(), out))  # out is in the graph (x requires grad)
            return None

        return hook

    handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        with torch.enable_grad():
            # Differentiate w.r.t. the layer outputs themselves: x requires grad so they are in the graph;
            # the input gradient itself is never requested, so autograd does not compute it.
            f = call(model, wrt, fixed, x.detach().requires_grad_(x.is_floating_point())).reshape(n, o)
    finally:
        for h in handles:
            h.remove()
    if bad:
        return None
    zs = [z for layer in layers for _, z in layer.calls if z.requires_grad]
    if not zs or not f.requires_grad:
        return [
            [(a, torch.zeros((o, *z.shape), dtype=z.dtype, device=z.device)) for a, z in layer.calls]
            for layer in layers
        ]
    grads = _backward_signals(f, zs, o)
    out, i = [], 0
    for layer in layers:
        calls = []
        for a, z in layer.calls:
            g = None
            if z.requires_grad:
                g = grads[i]
                i += 1
            calls.append((a, torch.zeros((o, *z.shape), dtype=z.dtype, device=z.device) if g is None else g.detach()))
        out.append(calls)
        layer.calls = []
    return out


def structured_ntk(
    model: nn.Module,
    wrt: Mapping[str, Tensor],
    fixed: Mapping[str, Tensor],
    x1: Tensor,
    x2: Tensor | None,
    output: str,
    o: int,
    chunk: int | None,
    budget: int,
) -> Tensor:
    layers = affine_layers(model, wrt)
    if not layers:
        return jacobian_ntk(model, wrt, fixed, x1, x2, output, o, chunk, budget)

    size = chunk
    if size is None:  # bound the autograd graph of one collection pass by the memory budget
        _, act, _ = probe(model, wrt, fixed, x1)
        size = max(1, budget // max(1, 4 * act * (o + 2) * next(iter(wrt.values())).element_size()))

    def collect(x: Tensor) -> list[list[tuple[Tensor, Tensor]]] | None:
        found = [_signals(model, layers, wrt, fixed, x[s], o) for s in blocks(x.shape[0], size)]
        parts = [p for p in found if p is not None]
        if len(parts) < len(found):
            return None
        if len(parts) == 1:
            return parts[0]
        return [
            [
                (torch.cat([p[li][ci][0] for p in parts]), torch.cat([p[li][ci][1] for p in parts], dim=1))
                for ci in range(len(parts[0][li]))
            ]
            for li in range(len(layers))
        ]

    rec1 = collect(x1)
    rec2 = rec1 if x2 is None else collect(x2)
    if rec1 is None or rec2 is None:  # a layer not applied per sample (e.g. batch folded into other axes)
        return jacobian_ntk(model, wrt, fixed, x1, x2, output, o, chunk, budget)
    n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    some = next(iter(wrt.values()))
    kernel = torch.zeros((n1, n2) if output == "trace" else (n1, n2, o, o), dtype=some.dtype, device=some.device)
    for layer, calls1, calls2 in zip(layers, rec1, rec2, strict=True):
        for a1, g1 in calls1:
            for a2, g2 in calls2:
                kernel += _pair_contribution(layer, a1, g1, a2, g2, output, budget)
    claimed = {k for layer in layers for k in (layer.weight_key, layer.bias_key) if k}
    rest = {k: v for k, v in wrt.items() if k not in claimed}
    if rest:
        fixed_rest = {**fixed, **{k: v for k, v in wrt.items() if k in claimed}}
        kernel += jacobian_ntk(model, rest, fixed_rest, x1, x2, output, o, chunk, budget)
    return kernel


def probe(
    model: nn.Module, wrt: Mapping[str, Tensor], fixed: Mapping[str, Tensor], x: Tensor
) -> tuple[float, int, list[tuple[AffineLayer, list[tuple[int, int, int]]]]]:
    """Forward FLOPs of one sample (estimated), activation numel, and per supported layer its (S, K, C) per call.

    FLOPs: ``2 S K C`` per call of a supported layer plus ``2 numel`` per other parameter and one per
    activation entry (elementwise work); exact FLOP counting costs seconds on first use.
    """
    layers = affine_layers(model, wrt)
    shapes: dict[int, list[tuple[int, int, int]]] = {id(layer): [] for layer in layers}
    act = [0]

    def make_hook(layer: AffineLayer) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
            if inputs and isinstance(out, Tensor):
                g = torch.zeros((1, *out.shape), dtype=out.dtype, device=out.device)
                try:
                    A, G = _as_positions(layer, inputs[0], g)
                    shapes[id(layer)].append((A.shape[1], A.shape[2], G.shape[3]))
                except RuntimeError:
                    pass

        return hook

    def count(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, Tensor):
            act[0] += out[0].numel() if out.dim() else 1

    handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
    handles += [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            call(model, wrt, fixed, x[:1])
    finally:
        for h in handles:
            h.remove()
    claimed = {k for layer in layers for k in (layer.weight_key, layer.bias_key) if k}
    flops = float(act[0]) + 2.0 * sum(v.numel() for k, v in wrt.items() if k not in claimed)
    flops += sum(2.0 * s * k * c for calls in shapes.values() for s, k, c in calls)
    return flops, act[0], [(layer, shapes[id(layer)]) for layer in layers]

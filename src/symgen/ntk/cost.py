"""The cost model of the empirical NTK's ``method="auto"``: FLOP estimates of the three methods
(``jacobian``, ``ntvp``, ``structured``) from layer shapes, and the per-sample sizes that bound a block.

FLOPs are estimated from the shapes of the affine layers (:func:`symgen.ntk.structured.probe`), not
counted (``torch.utils.flop_counter`` costs seconds on first use). Source: Novak, Sohl-Dickstein,
Schoenholz, "Fast finite width neural tangent kernel", arXiv 2206.08720 (the methods' costs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from symgen.functional import call
from symgen.ntk.structured import affine_layers, probe

__all__: list[str] = []  # internal: reached through symgen.ntk.choose_ntk_method

# Methods whose result stays in the autograd graph of the inputs (the structured method detaches
# its activations and backward signals).
DIFFERENTIABLE_METHODS = ("jacobian", "ntvp")


def per_sample_numel(
    model: nn.Module, p: Mapping[str, Tensor], b: Mapping[str, Tensor], x: Tensor
) -> tuple[int, int, int]:
    """One sample's numel of: all leaf-module outputs, the inputs and the outputs of its affine layers."""
    _, act, _ = probe(model, p, b, x)
    layers = affine_layers(model, p)
    sig = [0, 0]

    def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        if inputs and isinstance(inputs[0], Tensor) and isinstance(out, Tensor):
            sig[0] += inputs[0][0].numel()
            sig[1] += out[0].numel()

    handles = [layer.module.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            call(model, p, b, x[:1])
    finally:
        for h in handles:
            h.remove()
    return act, sig[0], sig[1]


def method_costs(
    model: nn.Module,
    wrt: Mapping[str, Tensor],
    fixed: Mapping[str, Tensor],
    x1: Tensor,
    n2: int,
    output: str,
    o: int,
    budget: int,
) -> tuple[dict[str, float], int]:
    """Estimated FLOPs of each method, and the activation numel of one sample (sizes ntvp's blocks).

    FLOPs are estimated from layer shapes (:func:`symgen.ntk.structured.probe`): exact counting with
    ``torch.utils.flop_counter`` costs seconds on first use.
    """
    n1 = x1.shape[0]
    flops, act, layers = probe(model, wrt, fixed, x1)
    p_all = sum(v.numel() for v in wrt.values())
    oo = o if output == "full" else 1
    itemsize = next(iter(wrt.values())).element_size()
    jac_blocks = max(1, math.ceil(n2 * o * p_all * itemsize * 4 / budget))
    jac_fwd = 3.0 * flops * o * (n1 + n2 * jac_blocks)

    def jacobian_cost(p: int) -> float:
        return jac_fwd * (p / max(1, p_all)) + 2.0 * n1 * n2 * o * oo * p

    costs = {"jacobian": jacobian_cost(p_all), "ntvp": 3.0 * flops * o * (n2 + n1 * n2)}
    claimed_params, contraction = 0, 0.0
    for layer, calls in layers:
        for key in (layer.weight_key, layer.bias_key):
            if key:
                claimed_params += wrt[key].numel()
        for s1, k, c in calls:
            for s2, _, _ in calls:
                if s1 == 1 and s2 == 1:
                    contraction += 2.0 * n1 * n2 * (k + o * c * oo)
                else:
                    gram = s1 * s2 * (k + o * c) if output == "trace" else float("inf")
                    contraction += 2.0 * min(n1 * n2 * gram, (n1 * s1 + n2 * s2) * o * c * k + n1 * n2 * o * oo * c * k)
    rest = p_all - claimed_params
    costs["structured"] = 3.0 * flops * (1 + o) * (n1 + n2) / 3.0 + contraction + (jacobian_cost(rest) if rest else 0.0)
    return costs, act


def cheapest(costs: Mapping[str, float], differentiable: bool) -> str:
    allowed = DIFFERENTIABLE_METHODS if differentiable else tuple(costs)
    return min(allowed, key=lambda k: costs[k])

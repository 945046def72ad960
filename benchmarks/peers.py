"""Shared runs of peer tools for the benchmarks (imported by the scripts in this folder)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as TF


def pyhessian_trace_to_rtol(
    model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], rtol: float, max_probes: int, block: int, seed: int
) -> tuple[float, float, int, float]:
    """PyHessian's Hutchinson, run in blocks of ``block`` probes until its relative standard error reaches
    ``rtol`` or ``max_probes``: returns (mean, relative standard error, probes, seconds)."""
    from pyhessian import hessian as PyHessian

    hc = PyHessian(model, TF.cross_entropy, data=data, cuda=False)
    torch.manual_seed(seed)  # PyHessian draws its probes from the global RNG (a benchmark script, not the library)
    qs: list[float] = []
    t0 = time.perf_counter()
    while len(qs) < max_probes:
        qs += hc.trace(maxIter=block, tol=-math.inf)
        t = torch.tensor(qs)
        if t.std() / math.sqrt(t.numel()) <= rtol * abs(float(t.mean())):
            break
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    t = torch.tensor(qs)
    return float(t.mean()), float(t.std() / math.sqrt(t.numel()) / abs(t.mean())), t.numel(), seconds

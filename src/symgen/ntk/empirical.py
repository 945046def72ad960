"""Empirical (finite-width) neural tangent kernel ``Theta(x, x') = J(x) J(x')^T`` of any torch model.

One kernel function: :func:`empirical_ntk_fn` returns ``kernel(x1, x2=None)`` (neural-tangents'
name and shape); :func:`empirical_ntk` is the one-call form. Three exact methods, one cost model
picking among them (``method="auto"``, cached per input shape inside the kernel):

- ``jacobian``: per-sample Jacobian blocks and large matrix products (:mod:`symgen.ntk.jacobian`).
- ``ntvp``: NTK-vector products, ``Theta v = J(x1) (J(x2)^T v)`` (:mod:`symgen.ntk.jacobian`).
- ``structured``: layer contributions from activations and backward signals, never forming the
  Jacobian (:mod:`symgen.ntk.structured`).

Sources: Jacot et al. arXiv 1806.07572; Novak, Sohl-Dickstein, Schoenholz, "Fast finite width neural
tangent kernel", arXiv 2206.08720 (structured derivatives, NTK-vector products).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from symgen import distributed, memory
from symgen.distributed import GroupSpec
from symgen.errors import ConfigError, MemoryBudgetError
from symgen.functional import bn_mode, jvp_outputs, vjp_outputs
from symgen.ntk import cost
from symgen.ntk.inputs import (
    check_device,
    check_finite,
    check_inputs,
    check_model,
    check_output_fits,
    kernel_bytes,
    output_size,
    resolve_params,
)
from symgen.ntk.jacobian import blocks, jacobian_ntk, ntvp_ntk
from symgen.ntk.layer_norm import composite_layer_norm
from symgen.ntk.streamed import computed, kernel_shape, mirror, stream_kernel
from symgen.ntk.structured import structured_ntk
from symgen.numerics import check_values
from symgen.streaming import model_device

__all__ = [
    "NTK_METHODS",
    "NTK_OUTPUTS",
    "EmpiricalNTKFn",
    "empirical_ntk_fn",
    "empirical_ntk",
    "ntk_vector_product",
    "choose_ntk_method",
]

NTK_METHODS = ("auto", "jacobian", "ntvp", "structured")
NTK_OUTPUTS = ("trace", "mean", "full")
_DEFAULT_BUDGET = 1 << 30  # bytes of Jacobian blocks / intermediates held at once (at most a quarter of the limit)
_BLOCK_TEMPORARIES = 6  # kernel-sized temporaries of one block pair (layer Gram matrices, their products)
_MAX_CACHED_SHAPES = 256  # auto choices kept per kernel (shapes of a training loop repeat)


# ----------------------------------------------------------------------------------------- helpers
def _summed(output: str) -> str:
    """What the methods compute for ``output``: "full" (N1, N2, O, O), else "trace" (the sum over outputs)."""
    return "full" if output == "full" else "trace"


# -------------------------------------------------------------------------------------- ntvp method
def ntk_vector_product(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor,
    v: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """NTK-vector product ``Theta(x1, x2) v = J(x1) (J(x2)^T v)``: one vjp and one jvp, matrix-free.

    Novak, Sohl-Dickstein, Schoenholz arXiv 2206.08720. Use it in iterative solvers.

    Args:
        model: the network.
        x1: inputs (N1, ...).
        x2: inputs (N2, ...).
        v: shaped like ``model(x2)``.
        params: parameters to evaluate at (default the model's trainable ones).
        buffers: buffers to evaluate with (default the model's).

    Returns:
        ``Theta v``, shaped like ``model(x1)``.
    """
    check_inputs(x1, x2)
    p, b = resolve_params(model, params, buffers)
    with bn_mode(model, "eval"):
        g = vjp_outputs(model, p, b, x2, v)
        return jvp_outputs(model, p, b, x1, g)[1]


# -------------------------------------------------------------------------------------- cost model
def choose_ntk_method(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    output: str = "trace",
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    memory_budget: int | None = None,
    differentiable: bool = False,
) -> str:
    """The method ``method="auto"`` uses: the cheapest by an estimate of FLOPs (:mod:`symgen.ntk.cost`).

    Among the methods that keep the inputs' autograd graph when ``differentiable`` (arXiv 2206.08720).

    Args:
        model: the network.
        x1: inputs (N1, ...).
        x2: inputs (N2, ...); None means x1.
        output: "trace", "mean" or "full".
        params: parameters to evaluate at.
        buffers: buffers to evaluate with.
        memory_budget: bytes held at once (default 1 GiB).
        differentiable: only "jacobian" or "ntvp".

    Returns:
        "jacobian", "ntvp" or "structured".
    """
    check_inputs(x1, x2)
    p, b = resolve_params(model, params, buffers)
    with bn_mode(model, "eval"):
        o = output_size(model, p, b, x1)
        costs, _ = cost.method_costs(
            model,
            p,
            b,
            x1,
            x1.shape[0] if x2 is None else x2.shape[0],
            _summed(output),
            o,
            memory_budget or _DEFAULT_BUDGET,
        )
    return cost.cheapest(costs, differentiable)


# ---------------------------------------------------------------------------------------- frontend
class EmpiricalNTKFn:
    """``kernel(x1, x2=None)``: the empirical NTK of one model with fixed settings (see :func:`empirical_ntk_fn`).

    The ``auto`` choice (and the output size) is computed once per (x1 shape, x2 shape or None,
    output, dtype, device) and kept with the kernel, so repeated calls (KIP, attacks) skip the cost
    estimate; :meth:`method_for` tells which method a shape gets.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor] | None,
        buffers: Mapping[str, Tensor] | None,
        output: str,
        method: str,
        differentiable: bool,
        chunk_size: int | None,
        budget: int,
    ) -> None:
        self.model, self.params, self.buffers = model, params, buffers
        self.output, self.method, self.differentiable = output, method, differentiable
        self.chunk_size, self.budget = chunk_size, budget
        # key -> (method, output size O, activation numel of one sample or 0 when not estimated)
        self._plans: dict[tuple[Any, ...], tuple[str, int, int]] = {}

    def _key(self, x1: Tensor, x2: Tensor | None) -> tuple[Any, ...]:
        return (tuple(x1.shape), None if x2 is None else tuple(x2.shape), self.output, x1.dtype, x1.device)

    def _plan(
        self, p: Mapping[str, Tensor], b: Mapping[str, Tensor], x1: Tensor, x2: Tensor | None
    ) -> tuple[str, int, int]:
        key = self._key(x1, x2)
        plan = self._plans.get(key)
        if plan is None:
            o = output_size(self.model, p, b, x1)
            method, act = self.method, 0
            if method in ("auto", "ntvp"):  # ntvp sizes its blocks by the activation estimate
                costs, act = cost.method_costs(
                    self.model,
                    p,
                    b,
                    x1,
                    x1.shape[0] if x2 is None else x2.shape[0],
                    _summed(self.output),
                    o,
                    self.budget,
                )
                if method == "auto":
                    method = cost.cheapest(costs, self.differentiable)
            if len(self._plans) >= _MAX_CACHED_SHAPES:
                self._plans.clear()
            plan = self._plans[key] = (method, o, act)
        return plan

    def method_for(self, x1: Tensor, x2: Tensor | None = None) -> str:
        """The method this kernel uses for inputs shaped like ``x1`` and ``x2`` (computed once, then cached).

        Args:
            x1: inputs (N1, ...).
            x2: inputs (N2, ...); None means x1.

        Returns:
            "jacobian", "ntvp" or "structured".
        """
        check_inputs(x1, x2)
        p, b = resolve_params(self.model, self.params, self.buffers)
        with bn_mode(self.model, "eval"):
            return self._plan(p, b, x1, None if x2 is x1 else x2)[0]

    def __call__(self, x1: Any, x2: Any = None) -> Tensor:
        """``Theta(x1, x2)``: (N1, N2) for ``output="trace"`` or ``"mean"``, (N1, N2, O, O) for ``"full"``.

        ``x1`` / ``x2`` may be tensors or DataLoaders (iterables of batches ``x`` or ``(x, y)``): the kernel
        is then computed block by block over the batches (rows of x1, columns of x2), one pair of batches in
        memory at a time (:meth:`stream`).
        """
        if not isinstance(x1, Tensor) or (x2 is not None and not isinstance(x2, Tensor)):
            return self.stream(x1, x2)
        check_inputs(x1, x2)
        p, b = resolve_params(self.model, self.params, self.buffers)
        check_device(p, x1, x2)
        if x2 is x1:
            x2 = None  # the symmetric case computes each block pair once
        with bn_mode(self.model, "eval"):
            method, o, _ = self._plan(p, b, x1, x2)
            size = self._samples_per_block(p, b, x1, method, o)
        n1, n2 = x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0]
        check_finite(type(self).__name__, p, b, x1, x2)
        item = next(iter(p.values())).element_size()
        quad = _BLOCK_TEMPORARIES * kernel_bytes(1, 1, self.output, o, item)  # per entry of a block pair
        per_sample = max(1, self.budget // size)
        whole = per_sample * (n1 + n2) + quad * n1 * n2
        check_output_fits(n1, n2, self.output, o, x1.dtype, min(whole, self.budget), x1.device)
        if whole <= self.budget:
            return self._checked(self._compute(p, b, x1, x2), slice(0, n1), slice(0, n2))
        # a block pair of s + s samples: their signals (linear in s) and the block's temporaries (quadratic)
        step = int((math.sqrt(per_sample**2 + quad * self.budget) - per_sample) / quad)
        step = max(1, min(step, size // 2))
        rows = blocks(n1, step)
        cols = rows if x2 is None else blocks(n2, step)
        if self.differentiable:  # joined by torch.cat, so the graph reaches every block
            out: list[list[Tensor | None]] = [[None] * len(cols) for _ in rows]
            for i, si in enumerate(rows):
                for j, sj in enumerate(cols):
                    if x2 is None and j < i:
                        continue
                    out[i][j] = self._block(p, b, x1, x2, si, sj)
            if x2 is None:
                for i in range(len(rows)):
                    for j in range(i):
                        out[i][j] = mirror(computed(out[j][i]), self.output)
            return torch.cat([torch.cat([computed(k) for k in r], dim=1) for r in out], dim=0)
        # one preallocated kernel written block by block: the memory is the output and one block pair's work
        kernel = torch.empty(kernel_shape(n1, n2, self.output, o), dtype=x1.dtype, device=x1.device)
        for i, si in enumerate(rows):
            for j, sj in enumerate(cols):
                if x2 is None and j < i:
                    continue
                block = self._block(p, b, x1, x2, si, sj)
                kernel[si, sj] = block
                if x2 is None and j > i:
                    kernel[sj, si] = mirror(block, self.output)
                del block
        return kernel

    def _block(
        self, p: Mapping[str, Tensor], b: Mapping[str, Tensor], x1: Tensor, x2: Tensor | None, si: slice, sj: slice
    ) -> Tensor:
        """The kernel block (rows si, columns sj), checked for non-finite values."""
        other = None if x2 is None and si == sj else (x1 if x2 is None else x2)[sj]
        return self._checked(self._compute(p, b, x1[si], other), si, sj)

    def _checked(self, block: Tensor, si: slice, sj: slice) -> Tensor:
        check_values(
            type(self).__name__,
            f"the kernel block (rows {si.start}:{si.stop}, columns {sj.start}:{sj.stop})",
            block,
            "its inputs, weights and buffers are finite, so the model's output or its derivatives overflow; "
            "compute in float64 or rescale the model",
        )
        return block

    def _compute(self, p: Mapping[str, Tensor], b: Mapping[str, Tensor], x1: Tensor, x2: Tensor | None) -> Tensor:
        model, output, chunk, budget = self.model, _summed(self.output), self.chunk_size, self.budget
        grad_mode = contextlib.nullcontext() if self.differentiable else torch.no_grad()
        # torch.func's d/dx of d f/d W through native_layer_norm is wrong (ntk.layer_norm): the composite then
        norms = composite_layer_norm() if self.differentiable else contextlib.nullcontext()
        with bn_mode(model, "eval"), grad_mode, norms:
            method, o, act = self._plan(p, b, x1, x2)
            if method == "jacobian":
                kernel = jacobian_ntk(model, p, b, x1, x2, output, o, chunk, budget)
            elif method == "ntvp":
                kernel = ntvp_ntk(model, p, b, x1, x2, output, o, chunk, budget, act)
            else:
                kernel = structured_ntk(model, p, b, x1, x2, output, o, chunk, budget)
        if self.output != "mean":
            return kernel
        return kernel / o if self.differentiable else kernel.div_(o)  # in place: no second copy

    def _samples_per_block(
        self, p: Mapping[str, Tensor], b: Mapping[str, Tensor], x1: Tensor, method: str, o: int
    ) -> int:
        """How many samples (rows and columns together) one kernel block may hold within the budget.

        Per sample: the stored activations and backward signals of the affine layers ((1 + O) numbers per
        output entry, the structured method's) or the activations of a Jacobian pass; the smallest block
        (one sample, the largest parameter tensor's Jacobian rows) must fit, else a MemoryBudgetError.
        """
        key = ("block", x1.shape[1:], x1.dtype, method, o)
        if key not in self._plans:
            act, inputs, outputs = cost.per_sample_numel(self.model, p, b, x1)
            item = next(iter(p.values())).element_size()
            biggest = max(p, key=lambda k: p[k].numel())
            # structured: stored layer inputs and O backward signals per layer output, plus a pass's activations
            per_sample = item * (inputs + o * outputs + 2 * act) if method == "structured" else item * 3 * act * o
            # the irreducible block: one sample's Jacobian row of the largest parameter tensor (the jacobian method
            # cannot split a tensor); activations are an estimate, so they size the blocks but do not refuse
            smallest = item * p[biggest].numel()
            if smallest > self.budget:
                raise MemoryBudgetError(
                    f"memory_budget = {self.budget / 2**20:.1f} MiB is below the smallest block of the empirical NTK "
                    f"({method} method): one Jacobian row of the largest parameter tensor '{biggest}' "
                    f"({p[biggest].numel()} entries) needs {smallest} bytes, and blocks of whole samples about "
                    f"{per_sample} bytes each; raise memory_budget to at least {max(smallest, per_sample)} bytes, or "
                    f"pass params= to take the kernel over fewer parameters."
                )
            self._plans[key] = (method, max(1, int(self.budget // max(1, per_sample))), 0)
        return self._plans[key][1]

    def stream(self, data1: Any, data2: Any = None, *, process_group: GroupSpec = "auto") -> Tensor:
        """``Theta`` over DataLoaders (or iterables of batches ``x`` or ``(x, y)``), block by block.

        Row block i (the i-th batch of ``data1``) against every column block (batches of ``data2``, or of
        ``data1`` when None: then only j >= i are computed and mirrored). Memory: two batches, their signals
        within ``memory_budget``, and the (N1, N2) kernel itself.

        Args:
            data1: the row batches.
            data2: the column batches (None: data1, the symmetric kernel).
            process_group: row blocks are shared round robin over the ranks (batch i on rank i mod world) and
                the kernel is summed over ranks, so every rank returns the whole kernel (:mod:`symgen.distributed`).

        Returns:
            The kernel, (N1, N2) or (N1, N2, O, O) by ``output``.
        """
        return stream_kernel(self, data1, data2, distributed.resolve_group(process_group))

    def _o(self, p: Mapping[str, Tensor], x: Tensor) -> int:
        _, b = resolve_params(self.model, self.params, self.buffers)
        with bn_mode(self.model, "eval"):
            return output_size(self.model, p, b, x)


def empirical_ntk_fn(
    model: nn.Module,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    output: str = "trace",
    method: str = "auto",
    differentiable: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | float | None = None,
) -> EmpiricalNTKFn:
    """The empirical NTK of ``model`` as ``kernel(x1, x2=None)`` (neural-tangents' ``empirical_ntk_fn``).

    ``Theta(x1, x2)[i, j, a, b] = <d f_a(x1_i) / d theta, d f_b(x2_j) / d theta>``, i.e.
    ``Theta = J(x1) J(x2)^T`` with J the Jacobian of the outputs w.r.t. the trainable parameters
    (arXiv 1806.07572; methods after arXiv 2206.08720). Outputs are flattened per sample (O = numel of
    ``model(x)[0]``). The model runs in eval mode (BatchNorm uses running statistics,
    ``functional.bn_mode``); its flags are restored after.

    Args:
        model: the network; ``model(x)`` maps a batch (N, ...) to outputs (N, ...).
        params: dict name -> tensor to evaluate at instead of the model's own trainable parameters (read
            at each call when None); the kernel is taken over these.
        buffers: dict name -> tensor of buffers (default the model's).
        output: "trace": (N1, N2), the SUM over outputs ``sum_a Theta[i, j, a, a]``; "mean": (N1, N2),
            the MEAN ``(1/O) sum_a Theta[i, j, a, a]`` (neural-tangents' convention, its ``trace_axes``);
            "full": (N1, N2, O, O).
        method: "jacobian", "ntvp", "structured" or "auto" (cheapest by a FLOP estimate, see
            :func:`choose_ntk_method`; chosen once per input shape).
        differentiable: keep the kernel in the autograd graph of the inputs x1, x2 (KIP moves its
            support set through it; methods "jacobian" / "ntvp"); otherwise it runs under ``no_grad``.
        chunk_size: samples per block (default: from ``memory_budget``).
        memory_budget: bytes of Jacobian blocks / intermediates held at once (default 1 GiB, or a quarter of
            the memory limit of :mod:`symgen.memory` when that is lower). The output itself and the blocks are
            checked against that limit before they are allocated (a MemoryBudgetError that says how to block).

    Returns:
        The kernel function, an :class:`EmpiricalNTKFn`.
    """
    check_model(model)
    if output not in NTK_OUTPUTS:
        raise ConfigError(f"output must be one of {NTK_OUTPUTS}, got {output!r}.")
    if method not in NTK_METHODS:
        raise ConfigError(f"method must be one of {NTK_METHODS}, got {method!r}.")
    if differentiable and method not in ("auto", *cost.DIFFERENTIABLE_METHODS):
        raise ConfigError(
            f"method {method!r} detaches its intermediate results, so it cannot be differentiated "
            f"w.r.t. the inputs; with differentiable=True use one of "
            f"{('auto', *cost.DIFFERENTIABLE_METHODS)}."
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    if memory_budget is not None and (
        isinstance(memory_budget, bool)
        or not isinstance(memory_budget, int | float)
        or not 1 <= memory_budget < math.inf
    ):
        raise ConfigError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}.")
    if memory_budget is None:  # 1 GiB, or a quarter of the memory limit when that is lower (at least 1 MiB)
        memory_budget = min(_DEFAULT_BUDGET, max(1 << 20, memory.limit_bytes(model_device(model)) // 4))
    return EmpiricalNTKFn(model, params, buffers, output, method, bool(differentiable), chunk_size, int(memory_budget))


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    output: str = "trace",
    method: str = "auto",
    differentiable: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | float | None = None,
) -> Tensor:
    """``Theta(x1, x2) = J(x1) J(x2)^T`` in one call: ``empirical_ntk_fn(model, **options)(x1, x2)``.

    Jacot et al. arXiv 1806.07572.

    Args:
        model: the network.
        x1: inputs (N1, ...).
        x2: inputs (N2, ...); None means x1 (the symmetric kernel).
        params: parameters to evaluate at (see :func:`empirical_ntk_fn`).
        buffers: buffers to evaluate with.
        output: "trace" (sum over outputs), "mean" (trace / O, neural-tangents') or "full".
        method: "auto", "jacobian", "ntvp" or "structured".
        differentiable: keep the autograd graph of the inputs.
        chunk_size: samples per block.
        memory_budget: bytes held at once.

    Returns:
        (N1, N2) for "trace" / "mean", (N1, N2, O, O) for "full".
    """
    return empirical_ntk_fn(
        model,
        params=params,
        buffers=buffers,
        output=output,
        method=method,
        differentiable=differentiable,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
    )(x1, x2)

"""The Hessian of a network's loss as a matrix-free symmetric operator."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from symgen import functional as F
from symgen.curvature.model import ModelOperator
from symgen.curvature.products import hvp_function
from symgen.curvature.taylor import TaylorProgram, TaylorUnsupported, trace_loss
from symgen.distributed import GroupSpec
from symgen.errors import ConfigError

__all__ = ["HessianOperator"]


class HessianOperator(ModelOperator):
    """The Hessian H = d^2 L / dW^2 of a model's loss w.r.t. its parameters (see :class:`ModelOperator`
    for ``data``, ``reduction``, ``param_names``, ``bn_mode``, ``batching``, ``chunk_size``, ``cache_graph``, ``process_group``; ``data`` may be a DataLoader, streamed).

    Products ``H v`` are taken by reverse-over-reverse on one retained graph of the gradient per
    batch (``hvp_mode="reverse"``, the fastest on CPU in benchmarks/curvature.py) or by
    forward-over-reverse (``"forward"``). Pearlmutter 1994 (Neural Computation 6:147); the retained
    graph is PyHessian's (arXiv 1912.07145). ``bn_mode="eval"`` is PyHessian's choice. Attention
    (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, ``F.scaled_dot_product_attention``) runs
    through :func:`symgen.functional.math_attention` wherever a graph is differentiated twice or in forward
    mode, and is traced through it for Taylor mode: its fused kernels have no double backward.

    ``taylor``: quadratic forms v^T H v (the probes of ``trace()``: Hutchinson, Hutch++, deflated) by
    second-order Taylor mode (:mod:`symgen.curvature.taylor`), 4 forward convolutions per probe
    against 6 for a product, where every operation of the loss has a rule (convolutions, linear
    layers, eval-mode BatchNorm, LayerNorm, ReLU, GELU, tanh, sigmoid, softmax attention, pooling,
    residual sums, cross-entropy, MSE); otherwise, and with ``taylor=False``, ``v . (H v)``. A fallback is
    visible: ``self.taylor`` turns False, ``self.fallback_reasons["taylor"]`` names the reason (e.g. the
    operation without a Taylor rule) and a :class:`~symgen.curvature.checks.FallbackWarning` (a
    UserWarning) is issued once; likewise ``self.fast_double_backward`` (:class:`ModelOperator`). The loss is traced once per batch shape, so a model whose Python
    control flow depends on the data's values, or that computes part of its loss under
    ``torch.no_grad()`` (the trace does not see grad mode), needs ``taylor=False``.

    ``compile``: ``True`` (inductor) or a ``torch.compile`` backend name compiles the
    forward-over-reverse product (``torch.func.jvp(grad(loss))``; AOTAutograd cannot compile the
    retained graph's double backward), once per operator and input shape. Measured on CPU
    (benchmarks/resnet.py ``--sections compile``, ResNet-20): 1.8x faster than a product that must
    build its retained graph (data streamed over several batches), 1.4x slower than one on a kept
    graph (one batch, the default), after about 100 s of compilation: not the default.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: Any,
        *,
        param_names: Iterable[str] | None = None,
        bn_mode: str = "eval",
        reduction: str = "mean",
        hvp_mode: str = "reverse",
        batching: str = "loop",
        chunk_size: int | None = None,
        cache_graph: bool | None = None,
        process_group: GroupSpec = "auto",
        compile: bool | str = False,
        taylor: bool = True,
    ) -> None:
        if hvp_mode not in ("reverse", "forward"):
            raise ConfigError(f"hvp_mode must be 'reverse' or 'forward', got '{hvp_mode}'.")
        self._compiled = (
            None
            if compile is False or compile is None
            else F.compiled(
                _forward_over_reverse,
                compile,
                "the forward-over-reverse Hessian-vector product (jvp of grad)",
                "use compile=False (the eager retained-graph product)",
            )
        )
        self.hvp_mode = "forward" if self._compiled is not None else hvp_mode
        super().__init__(
            model,
            loss_fn,
            data,
            param_names=param_names,
            bn_mode=bn_mode,
            reduction=reduction,
            batching=batching,
            chunk_size=chunk_size,
            cache_graph=cache_graph,
            process_group=process_group,
        )
        # its custom autograd Functions have no jvp rule: reverse mode only
        if self.fast_double_backward and self.hvp_mode != "reverse":
            self.fast_double_backward = False
            self.fallback_reasons["fast_double_backward"] = "hvp_mode='forward' (its functions have no jvp rule)"
        self.taylor = bool(taylor)  # False after a fallback to v . (H v)
        if not self.taylor:
            self.fallback_reasons["taylor"] = "taylor=False"
        self._traced: dict[tuple[Any, ...], GraphModule] = {}

    def _build_forms(self, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor] | None:
        keys = list(self.params)
        values = [self.params[k] for k in keys]
        sig = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        try:
            if sig not in self._traced:
                buffers = self._buffers()

                def loss(*args: Tensor) -> Tensor:
                    return self.loss_fn(
                        F.call(self.model, dict(zip(keys, args[:-2], strict=True)), buffers, args[-2]), args[-1]
                    )

                self._traced[sig] = trace_loss(loss, values, x, y)
            program = TaylorProgram(self._traced[sig], values, x, y)
        except TaylorUnsupported as e:  # an operation without a rule: the products from now on
            self.fallback("taylor", str(e))
            return None
        except Exception as e:  # noqa: BLE001 - a model make_fx cannot trace: the products (which raise
            # the model's real errors) from now on
            self.fallback("taylor", f"the loss could not be traced ({type(e).__name__}: {e})")
            return None
        params = self.params
        return lambda rows: torch.stack([program.form(list(F.unflatten(r, params).values())) for r in rows])

    def _build_product(self, x: Tensor, y: Tensor) -> Callable[[F.Params], F.Params]:
        if self._compiled is not None:
            fn, params, buffers = self._compiled, self.params, self._buffers()
            return lambda v: fn(self.model, self.loss_fn, params, buffers, x, y, dict(v))
        return hvp_function(self._batch_loss(x, y), self.params, mode=self.hvp_mode)


def _forward_over_reverse(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: F.Params,
    buffers: F.Params,
    x: Tensor,
    y: Tensor,
    v: F.Params,
) -> F.Params:
    """H v of ``loss_fn(model(x), y)`` by ``jvp(grad)``: the function ``compile=True`` compiles."""
    return F.hvp(lambda p: loss_fn(F.call(model, p, buffers, x), y), params, v)

"""The generalized Gauss-Newton matrix of a network's loss as a matrix-free symmetric operator."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from symgen import functional as F
from symgen.curvature.model import ModelOperator
from symgen.distributed import GroupSpec
from symgen.errors import ConfigError

__all__ = ["GGNOperator"]


class GGNOperator(ModelOperator):
    """The generalized Gauss-Newton matrix G = sum_b w_b J_b^T H_b J_b (see :class:`ModelOperator` for
    ``data``, ``reduction``, ``param_names``, ``bn_mode``, ``batching``, ``chunk_size``, ``cache_graph``, ``process_group``; ``data`` may be a DataLoader, streamed).

    J_b = d model(x_b; W) / dW is the Jacobian of batch b's outputs and H_b = d^2 loss_fn / d out^2
    the loss Hessian in output space, taken by autograd on the output, so any loss works. G drops
    the term of H that carries the model's second derivative; it is positive semi-definite whenever
    the loss is convex in the output (mean squared error, cross-entropy), and for those it equals the
    Fisher information. Each product is ``v -> J v`` (a forward-mode product, taken as the derivative
    of ``J^T u`` in ``u`` on a retained graph), ``-> H_b J v`` (in output space), ``-> J^T H_b J v``
    (a vector-Jacobian product); the graph is built in :func:`symgen.functional.math_attention` (J v is a
    double backward, which fused attention kernels lack). Schraudolph 2002 (Neural Computation 14:1723); Martens, arXiv 1412.1193.
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
        batching: str = "loop",
        chunk_size: int | None = None,
        cache_graph: bool | None = None,
        process_group: GroupSpec = "auto",
    ) -> None:
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

    def _build_product(self, x: Tensor, y: Tensor) -> Callable[[F.Params], F.Params]:
        keys = list(self.params)
        leaves = [self.params[k].detach().requires_grad_(True) for k in keys]
        with torch.enable_grad(), F.math_attention():  # J v below is a double backward: no fused attention
            out = F.call(self.model, dict(zip(keys, leaves, strict=True)), self._buffers(), x)
            if not isinstance(out, Tensor):
                raise ConfigError(
                    f"GGNOperator needs a model that returns one tensor (the loss's input); "
                    f"got {type(out).__name__}: wrap the model to return the logits."
                )
            # J^T u is linear in the dummy u, so its derivative in u along v is J v: the forward
            # product on the same retained graph as the backward one. With the fast double backward the
            # build at u = 0 runs no convolution and J v only the tangent's forward ones, as forward mode
            # would (so a first product costs no more convolutions than jvp + vjp, and later ones reuse it)
            u = torch.zeros_like(out, requires_grad=True)
            jtu = torch.autograd.grad(out, leaves, grad_outputs=u, create_graph=True, allow_unused=True)
            o = out.detach().requires_grad_(True)
            g_out = torch.autograd.grad(self.loss_fn(o, y), o, create_graph=True)[0]
        # a parameter outside the graph has zero Jacobian; a loss linear in the output has H_b = 0
        live = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
        jtu_live, keys_live = [jtu[i] for i in live], [keys[i] for i in live]
        return _GGNProduct(self.params, keys, leaves, out, u, o, g_out, jtu_live, keys_live)

    def _batch_forms(self, b: int, x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        """``z_i^T G_b z_i = (J_b z_i)^T H_b (J_b z_i)`` on the batch's retained graph: a forward product and
        one in output space per row, no vector-Jacobian product (about half a GGN-vector product)."""
        fn = self._product(b, x, y)
        if not isinstance(fn, _GGNProduct):
            return super()._batch_forms(b, x, y, rows)
        return torch.stack([fn.form(F.unflatten(r, self.params)) for r in rows]).double()


class _GGNProduct:
    """``v -> J^T H J v`` and ``v -> (J v)^T H (J v)`` for one batch, on its retained graph."""

    def __init__(
        self,
        params: F.Params,
        keys: list[str],
        leaves: list[Tensor],
        out: Tensor,
        u: Tensor,
        o: Tensor,
        g_out: Tensor,
        jtu: list[Tensor],
        live: list[str],
    ) -> None:
        self.params, self.keys, self.leaves, self.out, self.u, self.o = params, keys, leaves, out, u, o
        self.g_out, self.jtu, self.live = g_out, jtu, live

    def _hjv(self, v: F.Params) -> tuple[Tensor, Tensor] | None:
        if not self.live or not self.g_out.requires_grad:
            return None
        jv = torch.autograd.grad(self.jtu, self.u, grad_outputs=[v[k] for k in self.live], retain_graph=True)[0]
        return jv, torch.autograd.grad(self.g_out, self.o, grad_outputs=jv, retain_graph=True)[0]

    def __call__(self, v: F.Params) -> F.Params:
        pair = self._hjv(v)
        if pair is None:
            return {k: torch.zeros_like(self.params[k]) for k in self.keys}
        res = torch.autograd.grad(self.out, self.leaves, grad_outputs=pair[1], retain_graph=True, allow_unused=True)
        return {k: torch.zeros_like(self.params[k]) if r is None else r for k, r in zip(self.keys, res, strict=True)}

    def form(self, v: F.Params) -> Tensor:
        """``(J v)^T H (J v)`` (a 0-d float64 tensor), without the vector-Jacobian product.

        In float32 it carries the rounding of J v: 1.5e-5 relative on an 86k BN CNN (digits, batch 512), as a
        product rounded to float32 and dotted does; the product accumulated in float64 and dotted there gives
        1.2e-7. A trace's sampling error (1e-2 relative at 10 probes) is far above either.
        """
        pair = self._hjv(v)
        if pair is None:
            return self.out.new_zeros((), dtype=torch.float64)
        return (pair[0].double() * pair[1].double()).sum()

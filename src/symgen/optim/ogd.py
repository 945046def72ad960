"""Orthogonal gradient descent (OGD): gradients projected off the span of stored gradients of earlier tasks.

Farajtabar et al., "Orthogonal gradient descent for continual learning" (arXiv 1910.07104): after a task,
store the gradients of the network's outputs ``grad_w f_j(x; w*)`` at (some of) its inputs, orthonormalized
(Gram-Schmidt); on later tasks step with ``g - sum_v (g . v) v``. In the NTK regime the outputs on the
stored inputs then do not move, and Bennani et al. (arXiv 2006.11942) bound the generalisation error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.optim.wrapper import Closure, StepContext, WrapperOptimizer

__all__ = ["OGD", "OGD_OUTPUTS"]

OGD_OUTPUTS = ("all", "average", "ground_truth")

Named = dict[str, Tensor]


@dataclass
class _ImplicitTask:
    """One task kept as J (jvp/vjp of its stacked outputs) and K^+ = half half^T, truncated to ``rank``."""

    order: list[str]
    outs: Callable[[Named], Tensor]
    vjp: Callable[[Tensor], tuple[Named]]
    selected: Named
    half: Tensor
    pinv: Tensor
    rank: int
    model: nn.Module


class OGD(WrapperOptimizer):
    """OGD: the base optimizer steps with g - sum_v (g . v) v, v the stored orthonormal directions (arXiv 1910.07104).

    Around a base optimizer (a CLASS and its keyword arguments, e.g. ``OGD(params, torch.optim.SGD, lr=0.1)``).
    ``step(closure)``: the closure computes the gradient (or, without a closure, ``.grad`` is used as is),
    :meth:`project` removes its components along the stored orthonormal basis, the base optimizer steps.
    :meth:`store_task` adds the gradients of a model's outputs on a task's inputs; :meth:`add_directions`
    adds any vectors (flat, in parameter order). The basis lives in ``state[p]["ogd_basis"]`` (one slice
    (k, *p.shape) per parameter), so ``state_dict()`` / ``load_state_dict`` carry it. ``tol``: new
    directions with singular value below ``tol`` times the block's largest norm are dropped (numerical rank).
    ``max_directions``: refuse to store more (memory: k x number of parameters).
    ``store_task(..., form="implicit")`` keeps the task as its inputs and weights instead of k rows: the step
    projects with one Jacobian-vector and one vector-Jacobian product, ``g - J^T K^+ J g`` (K = J J^T), the same
    projector as the explicit basis at a cost of two passes over the task's inputs instead of two over k x
    parameters; one task only, and not carried by ``state_dict()``. A non-finite loss, gradient or update
    raises :class:`~symgen.errors.DivergenceError` with parameters and optimizer state as before the step.

    Args:
        params: parameters or parameter groups.
        base_optimizer: the optimizer class that takes the step, e.g. ``torch.optim.SGD``.
        tol: relative singular-value floor of new directions.
        max_directions: the most directions to store (None: no limit).
        **kwargs: the base optimizer's arguments (lr, momentum, weight_decay, ...).
    """

    needs_closure = False

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        tol: float = 1e-6,
        max_directions: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0 <= tol < 1:
            raise ConfigError(f"tol must be in [0, 1), got {tol}.")
        if max_directions is not None and max_directions < 1:
            raise ConfigError(f"max_directions must be >= 1 or None, got {max_directions}.")
        super().__init__(params, base_optimizer, {}, **kwargs)
        self.tol = float(tol)
        self.max_directions = max_directions
        self._implicit: _ImplicitTask | None = None

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def num_directions(self) -> int:
        """The number of stored orthonormal directions (the rank of the stored gradients)."""
        if self._implicit is not None:
            return self._implicit.rank
        first = self._params()[0]
        basis = self.state[first].get("ogd_basis") if first in self.state else None
        return 0 if basis is None else int(basis.shape[0])

    def basis(self) -> Tensor:
        """The stored orthonormal directions as rows, flat in parameter order.

        Returns:
            (k, number of parameters).
        """
        ps = self._params()
        if self._implicit is not None:  # rows M^T J with M = U Lambda^{-1/2}: orthonormal, spanning J's rows
            imp = self._implicit
            rows: Named = torch.func.vmap(imp.vjp)(imp.half.T)[0]
            return torch.cat([rows[n].reshape(imp.rank, -1) for n in imp.order], dim=1)
        if self.num_directions == 0:
            return torch.zeros(0, sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
        return torch.cat([self.state[p]["ogd_basis"].reshape(self.num_directions, -1) for p in ps], dim=1)

    @torch.no_grad()
    def add_directions(self, vectors: Tensor) -> int:
        """Orthonormalize the rows of ``vectors`` (k, number of parameters) against the basis and store them.

        Block Gram-Schmidt: projected off the basis twice, then a rank-revealing Cholesky-QR of the block
        (twice); directions of the block's new part with singular value below ``tol`` times the largest
        row norm are dropped.

        Args:
            vectors: (k, number of parameters), flat in the optimizer's parameter order.

        Returns:
            How many directions were kept.
        """
        ps = self._params()
        self._no_implicit()
        total = sum(p.numel() for p in ps)
        if vectors.dim() != 2 or vectors.shape[1] != total:
            raise ShapeError(
                f"vectors must be (k, {total}) (flat, in the order of the optimizer's parameters), got "
                f"{tuple(vectors.shape)}."
            )
        basis = self.basis()
        v = vectors.to(basis.dtype)
        if not bool(torch.isfinite(v).all()):
            raise DivergenceError("OGD.add_directions: a stored gradient is not finite; check the model and data.")
        scale = float(v.norm(dim=1).max()) if v.shape[0] else 0.0
        q = v[:0]
        if scale > 0:
            for _ in range(2):  # project off the stored basis twice ("twice is enough", Kahan/Parlett)
                if basis.shape[0]:
                    v = v - (v @ basis.T) @ basis
            # rank-revealing Cholesky-QR: the Gram matrix's eigenvectors give the block's orthonormal span
            evals, evecs = torch.linalg.eigh(v @ v.T)
            # the Gram matrix resolves singular values down to ~sqrt(eps) of the largest: never keep below that
            floor = max(self.tol, 10.0 * torch.finfo(v.dtype).eps ** 0.5)
            keep = evals > (floor * scale) ** 2
            q = (evecs[:, keep] / evals[keep].sqrt()).T @ v
            if q.shape[0]:  # second pass: orthogonal to working precision
                if basis.shape[0]:
                    q = q - (q @ basis.T) @ basis
                evals, evecs = torch.linalg.eigh(q @ q.T)
                q = (evecs / evals.clamp(min=torch.finfo(q.dtype).tiny).sqrt()).T @ q
        basis = torch.cat([basis, q])
        new = q
        if self.max_directions is not None and basis.shape[0] > self.max_directions:
            raise ConfigError(
                f"OGD would store {basis.shape[0]} directions, more than max_directions="
                f"{self.max_directions}; store fewer samples or outputs (outputs='average')."
            )
        offset = 0
        for p in ps:
            self.state[p]["ogd_basis"] = basis[:, offset : offset + p.numel()].reshape(basis.shape[0], *p.shape).clone()
            offset += p.numel()
        return len(new)

    def _no_implicit(self) -> None:
        if self._implicit is not None:
            raise ConfigError(
                "OGD holds a task in implicit form, which supports one task only; store every task "
                "with form='explicit' to combine several."
            )

    def store_task(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor | None = None,
        *,
        outputs: str = "all",
        batch_size: int = 64,
        form: str = "explicit",
    ) -> int:
        """Store the gradients of ``model``'s outputs on inputs ``x`` at its current weights (after a task).

        ``outputs``: "all" (every logit of every sample, OGD-ALL), "average" (the mean logit, OGD-AVE) or
        "ground_truth" (the logit of label ``y``, OGD-GTL; needs ``y``). The model's parameters must be the
        optimizer's, in the same order. ``form``: "explicit" (orthonormal rows) or "implicit" (see the class).

        Args:
            model: the model after the task.
            x: the task's inputs (n, ...).
            y: the task's labels (needed for "ground_truth").
            outputs: which outputs' gradients to store.
            batch_size: inputs per Jacobian call.
            form: "explicit" or "implicit".

        Returns:
            The number of directions added.
        """
        if outputs not in OGD_OUTPUTS:
            raise ConfigError(f"outputs must be one of {OGD_OUTPUTS}, got {outputs!r}.")
        if form not in ("explicit", "implicit"):
            raise ConfigError(f"form must be 'explicit' or 'implicit', got {form!r}.")
        self._no_implicit()
        if form == "implicit" and self.num_directions:
            raise ConfigError(
                "form='implicit' needs an OGD with no stored directions (one task only); use "
                "form='explicit' for every task."
            )
        if outputs == "ground_truth" and (y is None or y.shape[0] != x.shape[0]):
            raise ShapeError("outputs='ground_truth' needs labels y with one entry per input of x.")
        names = dict((id(p), n) for n, p in model.named_parameters())
        ps = self._params()
        if any(id(p) not in names for p in ps):
            raise ConfigError(
                "OGD.store_task: the optimizer holds parameters that are not the model's; build OGD "
                "on model.parameters()."
            )
        from torch.func import functional_call, jacrev, vmap

        order = [names[id(p)] for p in ps]
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def out(pr: dict[str, Tensor], xi: Tensor) -> Tensor:
            f: Tensor = functional_call(model, ({**params, **pr}, buffers), (xi[None],))[0].reshape(-1)
            return f.mean()[None] if outputs == "average" else f

        selected = {n: params[n] for n in order}
        if form == "implicit":
            return self._store_implicit(model, params, buffers, order, x, y, outputs, batch_size)
        added = 0
        was_training = model.training
        model.eval()
        try:
            for i in range(0, x.shape[0], batch_size):
                jac = vmap(jacrev(out), in_dims=(None, 0))(selected, x[i : i + batch_size])
                rows = torch.cat([jac[n].reshape(jac[n].shape[0], jac[n].shape[1], -1) for n in order], dim=2)
                if y is not None and outputs == "ground_truth":
                    rows = rows[torch.arange(rows.shape[0]), y[i : i + batch_size].long()][:, None]
                added += self.add_directions(rows.reshape(-1, rows.shape[-1]))
        finally:
            model.train(was_training)
        return added

    def _store_implicit(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        order: list[str],
        x: Tensor,
        y: Tensor | None,
        outputs: str,
        batch_size: int,
    ) -> int:
        """Keep J (the stacked output gradients on ``x``) as jvp/vjp closures and the truncated K^+ = U L^-1 U^T."""
        from torch.func import functional_call, jvp, vjp, vmap

        params = {n: t.clone() for n, t in params.items()}
        buffers = {n: t.detach().clone() for n, t in buffers.items()}
        x = x.detach()
        labels = None if y is None else y.detach().long()

        def outs(sel: Named) -> Tensor:
            f: Tensor = functional_call(model, ({**params, **sel}, buffers), (x,))
            f = f.reshape(f.shape[0], -1)
            if outputs == "average":
                return f.mean(1)
            if outputs == "ground_truth":
                return f[torch.arange(f.shape[0], device=f.device), labels]
            return f.reshape(-1)

        selected = {n: params[n] for n in order}
        was_training = model.training
        model.eval()
        try:
            pulled = vjp(outs, selected)
            out, vjp_fn = pulled[0], pulled[1]
            k = out.shape[0]
            gram = out.new_zeros(k, k)
            eye = torch.eye(k, dtype=out.dtype, device=out.device)
            for i in range(0, k, batch_size):  # K[:, chunk] = J (J^T e_chunk)
                rows = vmap(vjp_fn)(eye[i : i + batch_size])[0]
                gram[:, i : i + batch_size] = vmap(lambda t: jvp(outs, (selected,), (t,))[1])(rows).T
        finally:
            model.train(was_training)
        if not bool(torch.isfinite(gram).all()):
            raise DivergenceError("OGD.store_task: a stored gradient is not finite; check the model and data.")
        gram = (gram + gram.T) / 2
        evals, evecs = torch.linalg.eigh(gram)
        scale2 = float(gram.diagonal().max().clamp(min=0))  # the largest row norm, squared
        floor = max(self.tol, 10.0 * torch.finfo(gram.dtype).eps ** 0.5)
        keep = evals > floor**2 * scale2
        rank = int(keep.sum())
        if self.max_directions is not None and rank > self.max_directions:
            raise ConfigError(
                f"OGD would store {rank} directions, more than max_directions={self.max_directions}; "
                "store fewer samples or outputs (outputs='average')."
            )
        half = evecs[:, keep] / evals[keep].sqrt()
        self._implicit = _ImplicitTask(order, outs, vjp_fn, selected, half, half @ half.T, rank, model)
        return rank

    def _project_implicit(self, imp: _ImplicitTask) -> None:
        from torch.func import jvp

        ps = self._params()
        if all(p.grad is None for p in ps):
            return
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in zip(imp.order, ps, strict=True)}
        model = imp.model
        was_training = model.training
        model.eval()
        try:
            jg = jvp(imp.outs, (imp.selected,), (grads,))[1]
        finally:
            model.train(was_training)
        back = imp.vjp(imp.pinv @ jg)[0]
        for n, p in zip(imp.order, ps, strict=True):
            if p.grad is not None:
                p.grad.sub_(back[n])

    @torch.no_grad()
    def project(self) -> None:
        """``g <- g - V^T (V g)`` for the parameters' gradients (V: the stored orthonormal rows)."""
        if self._implicit is not None:
            with torch.enable_grad():
                self._project_implicit(self._implicit)
            return
        k = self.num_directions
        pairs = [(p, p.grad) for p in self._params() if p.grad is not None]
        if k == 0 or not pairs:
            return
        coef = torch.stack([self.state[p]["ogd_basis"].reshape(k, -1) @ g.reshape(-1) for p, g in pairs]).sum(0)
        for p, g in pairs:
            g.sub_((coef @ self.state[p]["ogd_basis"].reshape(k, -1)).reshape(p.shape))

    def estimate(self, closure: Closure | None, ctx: StepContext) -> Tensor | float | None:
        """The projected gradient in ``.grad``: the closure's (or, without one, the one in ``.grad``).

        Args:
            closure: the step's closure, or None to project the gradient already in ``.grad``.
            ctx: the step's passes.

        Returns:
            The loss (None without a closure).
        """
        loss = ctx.clean(closure, "at W") if closure is not None else None
        ctx.check_grads("at W (before the projection)")
        self.project()
        return loss

"""Sharpness-aware minimization (SAM) and its adaptive variant (ASAM).

Semantics follow the widely used implementation (github.com/davda54/sam): ``base_optimizer`` is
an optimizer class, extra keyword arguments go to it, ``first_step`` climbs to W + e(W),
``second_step`` returns to W and lets the base optimizer step with the gradient taken there.
``step(closure)`` does both through :class:`~symgen.optim.WrapperOptimizer`'s step, computing the
gradient at W itself. Under DistributedDataParallel the ascent direction is the all-reduced gradient
(``ascent="global"``) or each process's own gradient (``ascent="local"``, Foret et al.'s m-sharpness
with m = the per-process batch).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from symgen import distributed
from symgen.distributed import Group
from symgen.errors import ConfigError
from symgen.optim.ddp import all_reduce_mean, ddp_group, is_ddp, no_sync
from symgen.optim.wrapper import Closure, StepContext, WrapperOptimizer, all_finite, divergence

__all__ = ["SAM", "ASCENTS"]

ASCENTS = ("global", "local")
_LOCAL_NEEDS_DDP = (
    "ascent='local' (m-sharpness: each process perturbs the weights along its own gradient) needs "
    "the model wrapped in torch.nn.parallel.DistributedDataParallel: pass model=ddp_model to SAM, or "
    "step with symgen.optim.LossClosure(ddp_model, loss_fn, x, y); in one process use "
    "ascent='global'"
)


def _grads(groups: list[dict[str, Any]]) -> list[Tensor]:
    return [p.grad for g in groups for p in g["params"] if p.grad is not None]


class SAM(WrapperOptimizer):
    """SAM: the base optimizer steps with grad L(W + e), e = rho g / ||g||, g = grad L(W) (arXiv 2010.01412).

    ASAM (``adaptive=True``, arXiv 2102.11600): e = rho w^2 g / ||w g|| (elementwise, the norm over all
    parameters). Foret et al. 2021; Kwon et al. 2021.

    ``step(closure)``, the torch.optim protocol: the closure zeroes gradients, computes the loss, calls
    ``backward`` and returns the loss. It is called twice: at W (the gradient g) and at W + e; the
    parameters return to W and the base optimizer steps. Returns the loss at W. BatchNorm running
    statistics are updated once per step, by the pass at W: the pass at W + e runs inside
    :func:`symgen.functional.frozen_running_stats` of ``model`` (or of the closure's model for a
    :class:`~symgen.optim.LossClosure`). Built from ``model.parameters()`` alone and stepped with a plain
    closure, SAM cannot find the BatchNorm layers: it warns once, the first time one runs in train mode at
    W + e. ``first_step``/``second_step`` remain for hand-written loops. A non-finite loss, gradient or update
    raises :class:`~symgen.errors.DivergenceError` with parameters, optimizer state and BatchNorm statistics
    left as before the step.

    DistributedDataParallel (``model``, or the closure's model for a ``LossClosure``, is the DDP module):
    ``ascent="global"`` (default; the ascent direction is the gradient of the whole batch): the pass at W
    runs inside ``model.no_sync()`` and the gradients are averaged in ONE coalesced all-reduce before e is
    computed, the same step as DDP's own synchronization with one message instead of one per bucket.
    ``ascent="local"``: each process computes e from its own gradient with no communication in the first
    pass (the m-sharpness variant of Foret et al., Sec. 4, with m = the per-process batch); the pass at
    W + e_r is synchronized by DDP, so every process steps with the mean over processes of the gradients
    at their own perturbed weights. Without a known DDP model, ``step`` runs the closure as given (DDP, if
    any, synchronizes both passes: the global direction).

    Args:
        params: parameters or parameter groups (a group may set its own ``rho`` and ``adaptive``).
        base_optimizer: the optimizer class that takes the step, e.g. ``torch.optim.SGD``.
        rho: the radius of the ascent step.
        adaptive: ASAM's scale-invariant ascent.
        model: the model (finds BatchNorm layers and a DDP module); a LossClosure's model is found without it.
        ascent: "global" or "local" (see above).
        **kwargs: the base optimizer's arguments (lr, momentum, weight_decay, ...).
    """

    divergence_hint = "lower the learning rate or rho, or check the data"

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        model: nn.Module | None = None,
        ascent: str = "global",
        **kwargs: Any,
    ) -> None:
        if not rho >= 0:
            raise ConfigError(f"rho must be >= 0, got {rho}.")
        if ascent not in ASCENTS:
            raise ConfigError(
                f"ascent must be one of {ASCENTS} ('global': the all-reduced gradient; 'local': each "
                f"process's own, under DistributedDataParallel), got {ascent!r}."
            )
        if ascent == "local" and model is not None and not is_ddp(model):
            raise ConfigError(f"{_LOCAL_NEEDS_DDP}; got model={type(model).__name__}.")
        self.ascent = ascent
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), model=model, **kwargs)
        # W during a hand-written first_step/second_step, kept apart from ``state`` (the base optimizer's)
        self._at_w: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        norms = [
            ((p.abs() if g["adaptive"] else 1.0) * p.grad).norm(p=2)
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        if not norms:
            raise ConfigError("SAM.first_step(): no parameter has a gradient; call loss.backward() first.")
        total: Tensor = torch.stack([n.to(norms[0].device) for n in norms]).norm(p=2)
        return total

    @torch.no_grad()
    def _ascent(self) -> list[Tensor | None]:
        """e per parameter (None where there is no gradient), from the gradient in ``.grad``."""
        grad_norm = self._grad_norm()
        out: list[Tensor | None] = []
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                g = p.grad
                out.append(None if g is None else (torch.pow(p, 2) if group["adaptive"] else 1.0) * g * scale.to(p))
        return out

    def _check_grads(self, where: str) -> None:
        if not all_finite(_grads(self.param_groups)):
            raise divergence("SAM", self.num_steps + 1, f"gradient {where}", self.divergence_hint)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to W + e(W) (remembering W); the gradient at W must be in ``.grad``.

        Args:
            zero_grad: zero the gradients afterwards.
        """
        self._check_grads("at W")
        ps = [p for g in self.param_groups for p in g["params"]]
        for p, e in zip(ps, self._ascent(), strict=True):
            if e is not None:
                self._at_w[p] = p.detach().clone()
                p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Return to W without stepping."""
        for p, w in self._at_w.items():
            p.copy_(w)
        self._at_w.clear()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to W and step the base optimizer with the gradient taken at W + e(W).

        Args:
            zero_grad: zero the gradients afterwards.
        """
        self.restore()
        self._check_grads("at the perturbed weights W + e")
        self.base_optimizer.step()
        self.num_steps += 1
        if zero_grad:
            self.zero_grad()

    def check_model(self, model: nn.Module | None) -> None:
        """``ascent="local"`` needs a DistributedDataParallel model (a ConfigError otherwise).

        Args:
            model: the step's model, or None when unknown.
        """
        if self.ascent == "local" and not is_ddp(model):
            got = "no model" if model is None else f"model={type(model).__name__}"
            raise ConfigError(f"{_LOCAL_NEEDS_DDP}; got {got}.")

    def estimate(self, closure: Closure | None, ctx: StepContext) -> Tensor | float | None:
        """The gradient at W + e(W) in ``.grad``, e from the gradient at W (always computed here).

        Args:
            closure: the step's closure.
            ctx: the step's passes.

        Returns:
            The loss at W.
        """
        if closure is None:
            raise self._closure_error()
        model = ctx.model
        if is_ddp(model):
            with no_sync(model):
                loss = ctx.clean(closure, "at W", check=False)
            self._synced_first_pass(loss, ddp_group(model), ctx)
        else:
            loss = ctx.clean(closure, "at W")
        if not _grads(self.param_groups):
            raise ConfigError(
                "SAM.step(): the closure left no gradient on any parameter; it must call "
                "loss.backward() (or scaler.scale(loss).backward())."
            )
        ctx.check_grads("at W")
        ctx.move(self._ascent())  # e = rho g / ||g|| is the same for the scaled gradient s g
        self.zero_grad()
        ctx.perturbed(closure, "at the perturbed weights W + e")
        return loss

    def _synced_first_pass(self, loss: Tensor | float, group: Group, ctx: StepContext) -> None:
        """After the pass at W under ``no_sync``: average the gradients over the processes in one all-reduce
        ("global") or keep each process's own ("local"); every process learns whether any process's loss
        (and, for "local", its gradient) was not finite, so that all take the same branch."""
        grads = _grads(self.param_groups)
        bad = torch.tensor([0.0 if bool(torch.isfinite(torch.as_tensor(loss)).all()) else 1.0])
        if self.ascent == "global":
            summed = all_reduce_mean(grads, group, extra=bad)
            bad = bad if summed is None else summed
        else:
            if grads and not bool(torch.isfinite(torch.cat([g.reshape(-1).float() for g in grads])).all()):
                bad += 1.0
            bad = distributed.all_reduce_sum(bad.to(grads[0].device) if grads else bad, group)
        if float(bad) > 0:
            ctx.fail(f"loss or gradient at W on {int(float(bad))} process(es)")

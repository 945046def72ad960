"""Sharpness-aware minimization (SAM) and its adaptive variant (ASAM).

Semantics follow the widely used implementation (github.com/davda54/sam): ``base_optimizer`` is
an optimizer class, extra keyword arguments go to it, ``first_step`` climbs to W + e(W),
``second_step`` returns to W and lets the base optimizer step with the gradient taken there.
``step(closure)`` does both, computing the gradient at W itself. Under DistributedDataParallel the
ascent direction is the all-reduced gradient (``ascent="global"``) or each process's own gradient
(``ascent="local"``, Foret et al.'s m-sharpness with m = the per-process batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from symgen import distributed
from symgen.errors import ConfigError, DivergenceError
from symgen.functional import frozen_running_stats
from symgen.optim.amp import ScaledStep
from symgen.optim.ddp import all_reduce_mean, ddp_group, is_ddp, no_sync
from symgen.optim.wrapper import WrapperOptimizer

__all__ = ["SAM", "ASCENTS"]

ASCENTS = ("global", "local")
_LOCAL_NEEDS_DDP = (
    "ascent='local' (m-sharpness: each process perturbs the weights along its own gradient) needs "
    "the model wrapped in torch.nn.parallel.DistributedDataParallel: pass model=ddp_model to SAM, or "
    "step with symgen.optim.LossClosure(ddp_model, loss_fn, x, y); in one process use "
    "ascent='global'"
)


def _params_with_grad(groups: list[dict[str, Any]]) -> list[Tensor]:
    return [p for g in groups for p in g["params"] if p.grad is not None]


class SAM(WrapperOptimizer):
    """SAM: the base optimizer steps with grad L(W + e), e = rho g / ||g||, g = grad L(W); ASAM
    (``adaptive=True``): e = rho w^2 g / ||w g|| (elementwise, the norm over all parameters).

    Foret et al. 2021 (arXiv 2010.01412); Kwon et al. 2021 (arXiv 2102.11600).

    ``step(closure)``, the torch.optim protocol: the closure zeroes gradients, computes the loss, calls
    ``backward`` and returns the loss. It is called twice: at W (the gradient g) and at W + e; the
    parameters return to W and the base optimizer steps. Returns the loss at W. BatchNorm running
    statistics are updated once per step, by the pass at W: the pass at W + e runs inside
    :func:`symgen.functional.frozen_running_stats` of ``model`` (or of the closure's model for a
    :class:`~symgen.optim.LossClosure`). ``first_step``/``second_step`` remain for hand-written loops.
    A non-finite loss or gradient raises :class:`DivergenceError` with the parameters left at W.

    DistributedDataParallel (``model``, or the closure's model for a ``LossClosure``, is the DDP module):
    ``ascent="global"`` (default; the ascent direction is the gradient of the whole batch): the pass at W
    runs inside ``model.no_sync()`` and the gradients are averaged in ONE coalesced all-reduce before e is
    computed, the same step as DDP's own synchronization with one message instead of one per bucket.
    ``ascent="local"``: each process computes e from its own gradient with no communication in the first
    pass (the m-sharpness variant of Foret et al., Sec. 4, with m = the per-process batch); the pass at
    W + e_r is synchronized by DDP, so every process steps with the mean over processes of the gradients
    at their own perturbed weights. Without a known DDP model, ``step`` runs the closure as given (DDP, if
    any, synchronizes both passes: the global direction).
    """

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
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), **kwargs)
        self.model = model
        self.num_steps = 0
        # W during a step, kept apart from ``state`` (the base optimizer's: Adam initializes an empty entry)
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
        return torch.stack([n.to(norms[0].device) for n in norms]).norm(p=2)

    def _check_grads(self, where: str) -> None:
        for p in _params_with_grad(self.param_groups):
            if not torch.isfinite(p.grad).all():
                raise DivergenceError(
                    f"SAM step {self.num_steps + 1}: non-finite gradient {where}. Parameters "
                    "are left at W; lower the learning rate or rho, or check the data."
                )

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to W + e(W) (remembering W); the gradient at W must be in ``.grad``."""
        self._check_grads("at W")
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._at_w[p] = p.detach().clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
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
        """Return to W and step the base optimizer with the gradient taken at W + e(W)."""
        self.restore()
        self._check_grads("at the perturbed weights W + e")
        self.base_optimizer.step()
        self.num_steps += 1
        if zero_grad:
            self.zero_grad()

    _step_supports_amp_scaling = True  # scaler.step(optimizer) calls step() itself; see symgen.optim.amp

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Tensor] | None = None,  # type: ignore[override]
        scaler: Any = None,
    ) -> Tensor:
        """One SAM step; with ``scaler`` (a ``torch.amp.GradScaler``) the closure backpropagates the scaled loss,
        the gradient at W + e is unscaled once, and an inf/NaN step is skipped (:mod:`symgen.optim.amp`)."""
        amp = ScaledStep(self, scaler, closure, needs_closure=True)
        if closure is None:
            raise ConfigError(
                "SAM.step() needs a closure that zeroes gradients, computes the loss, calls "
                "backward() and returns the loss, e.g. symgen.optim.LossClosure(model, loss_fn, x, y); "
                "or call first_step()/second_step() yourself."
            )
        model = self.model if self.model is not None else getattr(closure, "model", None)
        if self.ascent == "local" and not is_ddp(model):
            got = "no model" if model is None else f"model={type(model).__name__}"
            raise ConfigError(f"{_LOCAL_NEEDS_DDP}; got {got}.")
        closure = torch.enable_grad()(closure)
        # the gradient at W is always computed here: a .grad left by an earlier pass may be stale
        if is_ddp(model):
            with no_sync(model):
                loss = closure()
            finite = self._synced_first_pass(loss, ddp_group(model), amp.active)
        else:
            loss = closure()
            finite = torch.isfinite(torch.as_tensor(loss)).all()
        if amp.active and not (finite and amp.grads_finite()):
            amp.skip()
            return loss.detach() if isinstance(loss, Tensor) else loss
        if not finite:
            where = " on at least one process" if is_ddp(model) else ""
            raise DivergenceError(
                f"SAM step {self.num_steps + 1}: non-finite loss at W{where} (here "
                f"{float(loss)}); parameters untouched; lower the learning rate, or check the data."
            )
        if not _params_with_grad(self.param_groups):
            raise ConfigError(
                "SAM.step(): the closure left no gradient on any parameter; it must call "
                "loss.backward() (or scaler.scale(loss).backward())."
            )
        self.first_step(zero_grad=True)  # e = rho g / ||g|| is the same for the scaled gradient s g
        try:
            frozen = frozen_running_stats(model) if model is not None else contextlib.nullcontext()
            with frozen:  # running statistics are updated once per step, by the pass at W
                perturbed = closure()
        except BaseException:
            self.restore()
            raise
        finite = bool(torch.isfinite(torch.as_tensor(perturbed)).all())
        if amp.active:
            self.restore()
            if not finite:
                amp.skip()
            elif amp.finish():
                self._check_grads("at the perturbed weights W + e")
                self.base_optimizer.step()
                self.num_steps += 1
            else:
                self.zero_grad(set_to_none=True)
            return loss.detach() if isinstance(loss, Tensor) else loss
        if not finite:
            self.restore()
            raise DivergenceError(
                f"SAM step {self.num_steps + 1}: non-finite loss {float(perturbed)} at the "
                "perturbed weights W + e; parameters are left at W; lower the learning rate "
                "or rho."
            )
        self.second_step()
        return loss.detach() if isinstance(loss, Tensor) else loss

    def _synced_first_pass(self, loss: Any, group: Any, amp_active: bool) -> bool:
        """After the pass at W under ``no_sync``: average the gradients over the processes in one all-reduce
        ("global") or keep each process's own ("local"); every process learns whether any process's loss
        (and, for "local", its gradient) was not finite, so that all take the same branch."""
        grads = [p.grad for p in _params_with_grad(self.param_groups)]
        bad = torch.tensor([0.0 if bool(torch.isfinite(torch.as_tensor(loss)).all()) else 1.0])
        if self.ascent == "global":
            bad = all_reduce_mean(grads, group, extra=bad)
        else:
            if grads and not bool(torch.isfinite(torch.cat([g.reshape(-1).float() for g in grads])).all()):
                bad += 1.0
            bad = distributed.all_reduce_sum(bad.to(grads[0].device) if grads else bad, group)
            if float(bad) > 0 and not amp_active:
                raise DivergenceError(
                    f"SAM step {self.num_steps + 1}: non-finite loss or gradient at W on "
                    f"{int(float(bad))} process(es); parameters untouched; lower the learning "
                    "rate, or check the data."
                )
        return float(bad) == 0

"""Sharpness-aware minimization (SAM) and its adaptive variant (ASAM).

Semantics follow the widely used implementation (github.com/davda54/sam): ``base_optimizer`` is
an optimizer class, extra keyword arguments go to it, ``first_step`` climbs to W + e(W),
``second_step`` returns to W and lets the base optimizer step with the gradient taken there.
``step(closure)`` does both, computing the gradient at W itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from symgen.errors import ConfigError, DivergenceError
from symgen.functional import frozen_running_stats
from symgen.optim.amp import ScaledStep
from symgen.optim.wrapper import WrapperOptimizer

__all__ = ["SAM"]


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
    """

    def __init__(self, params: Iterable[Any], base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, adaptive: bool = False, model: nn.Module | None = None, **kwargs: Any) -> None:
        if not rho >= 0:
            raise ConfigError(f"rho must be >= 0, got {rho}.")
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), **kwargs)
        self.model = model
        self.num_steps = 0
        # W during a step, kept apart from ``state`` (the base optimizer's: Adam initializes an empty entry)
        self._at_w: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        norms = [((p.abs() if g["adaptive"] else 1.0) * p.grad).norm(p=2)
                 for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not norms:
            raise ConfigError("SAM.first_step(): no parameter has a gradient; call loss.backward() first.")
        return torch.stack([n.to(norms[0].device) for n in norms]).norm(p=2)

    def _check_grads(self, where: str) -> None:
        for p in _params_with_grad(self.param_groups):
            if not torch.isfinite(p.grad).all():
                raise DivergenceError(f"SAM step {self.num_steps + 1}: non-finite gradient {where}. Parameters "
                                      "are left at W; lower the learning rate or rho, or check the data.")

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
    def step(self, closure: Callable[[], Tensor] | None = None,  # type: ignore[override]
             scaler: Any = None) -> Tensor:
        """One SAM step; with ``scaler`` (a ``torch.amp.GradScaler``) the closure backpropagates the scaled loss,
        the gradient at W + e is unscaled once, and an inf/NaN step is skipped (:mod:`symgen.optim.amp`)."""
        amp = ScaledStep(self, scaler, closure, needs_closure=True)
        if closure is None:
            raise ConfigError("SAM.step() needs a closure that zeroes gradients, computes the loss, calls "
                              "backward() and returns the loss, e.g. symgen.optim.LossClosure(model, loss_fn, x, y); "
                              "or call first_step()/second_step() yourself.")
        model = self.model if self.model is not None else getattr(closure, "model", None)
        closure = torch.enable_grad()(closure)
        # the gradient at W is always computed here: a .grad left by an earlier pass may be stale
        loss = closure()
        finite = torch.isfinite(torch.as_tensor(loss)).all()
        if amp.active and not (finite and amp.grads_finite()):
            amp.skip()
            return loss.detach() if isinstance(loss, Tensor) else loss
        if not finite:
            raise DivergenceError(f"SAM step {self.num_steps + 1}: non-finite loss {float(loss)} at W; "
                                  "parameters untouched; lower the learning rate, or check the data.")
        if not _params_with_grad(self.param_groups):
            raise ConfigError("SAM.step(): the closure left no gradient on any parameter; it must call "
                              "loss.backward() (or scaler.scale(loss).backward()).")
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
            raise DivergenceError(f"SAM step {self.num_steps + 1}: non-finite loss {float(perturbed)} at the "
                                  "perturbed weights W + e; parameters are left at W; lower the learning rate "
                                  "or rho.")
        self.second_step()
        return loss.detach() if isinstance(loss, Tensor) else loss

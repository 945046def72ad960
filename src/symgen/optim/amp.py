"""Mixed precision for closure steps: ``optimizer.step(closure, scaler=scaler)`` with ``torch.amp.GradScaler``.

GradScaler's own ``scaler.step(optimizer)`` unscales the gradients that are in ``.grad`` *before* the
step, so it cannot serve an optimizer whose closure computes new gradients (SAM's two passes, NSO's
1 + 2k); calling ``unscale_`` per pass is the "can't unscale twice" error of davda54/sam. Here the
optimizer unscales once, after its last pass: ``scaler.unscale_(optimizer)`` divides the final
gradient by the scale and records whether it is finite; an inf/NaN step is skipped (parameters and
optimizer state untouched) and ``scaler.update()`` then lowers the scale, exactly as GradScaler skips.

SAM's ascent direction e = rho g / ||g|| is invariant to the scale, so the scaled gradient of the
first pass is used as is. ``scaler.step(optimizer)`` (no closure) still works for a plain step on
gradients already in ``.grad`` (UnitNormSGD); with a closure it raises a :class:`ConfigError`
naming the pattern above.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler

from symgen.errors import ConfigError

__all__ = ["ScaledStep", "PATTERN", "GradScaler"]

PATTERN = (
    "def closure():\n    optimizer.zero_grad()\n    with torch.autocast(device_type, dtype):\n"
    "        loss = loss_fn(model(x), y)\n    scaler.scale(loss).backward()\n    return loss\n"
    "optimizer.step(closure, scaler=scaler)\nscaler.update()"
)


def _stage_stepped(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Mark the optimizer as stepped in the scaler, so a stray ``scaler.step(optimizer)`` raises."""
    try:
        from torch.amp.grad_scaler import OptState

        scaler._per_optimizer_states[id(optimizer)]["stage"] = OptState.STEPPED
    except (ImportError, AttributeError, KeyError, TypeError):  # private API moved: only the guard is lost
        pass


class ScaledStep:
    """The GradScaler side of one optimizer step (a no-op when no scaler, or a disabled one, is given).

    ``active``: the step runs under loss scaling. ``finish()`` unscales the gradient now in ``.grad``
    (once) and returns whether it is finite; ``skip()`` records an inf/NaN step without a finite check.
    ``from_scaler`` is set when ``scaler.step(optimizer)`` called the step (new-style GradScaler contract:
    ``optimizer.grad_scale`` and ``optimizer.found_inf`` are set and the scaler has checked the gradients).

    Args:
        optimizer: the optimizer taking the step.
        scaler: the ``torch.amp.GradScaler`` passed to ``step``, or None.
        closure: the step's closure, or None.
        needs_closure: the optimizer computes gradients at other weights through a closure (SAM, NSO).

    Raises:
        ConfigError: a scaler that is not a GradScaler, or a combination ``scaler.step`` cannot run.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, scaler: GradScaler | None, closure: object, needs_closure: bool = False
    ) -> None:
        self.optimizer = optimizer
        self.scaler = scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None
        self.from_scaler = getattr(optimizer, "grad_scale", None) is not None or hasattr(optimizer, "found_inf")
        name = type(optimizer).__name__
        if scaler is not None and not hasattr(scaler, "unscale_"):
            raise ConfigError(f"{name}.step(scaler=...) expects a torch.amp.GradScaler, got {type(scaler).__name__}.")
        if self.from_scaler and needs_closure:
            raise ConfigError(
                f"GradScaler.step({name}) cannot run {name}: its step computes gradients at "
                f"other weights through a closure. Use this pattern instead:\n{PATTERN}"
            )
        if self.from_scaler and closure is not None:
            raise ConfigError(
                f"GradScaler.step({name}, closure) cannot check the gradients the closure "
                f"computes (it unscales before the step). Use this pattern instead:\n{PATTERN}"
            )
        if self.scaler is not None:
            from symgen.optim.closure import LossClosure  # the closure that never scales its loss

            if isinstance(closure, LossClosure):
                raise ConfigError(
                    f"{name}.step(LossClosure, scaler=...): LossClosure calls loss.backward() "
                    "without scaling the loss; with a GradScaler write the closure yourself:\n"
                    f"{PATTERN}"
                )

    @property
    def active(self) -> bool:
        """Whether the step runs under loss scaling."""
        return self.scaler is not None or self.from_scaler

    def _grads(self) -> list[Tensor]:
        return [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """Whether every gradient in ``.grad`` is finite (one check).

        Returns:
            True when no gradient holds an inf or NaN.
        """
        grads = [g.reshape(-1) for g in self._grads()]
        return not grads or bool(torch.isfinite(torch.cat([g.float() for g in grads])).all())

    @torch.no_grad()
    def finish(self) -> bool:
        """Unscale ``.grad`` once (recording inf/NaN in the scaler).

        Returns:
            True if the step may be taken.
        """
        if self.from_scaler:  # scaler.step(optimizer): it checked the gradients; divide by its scale
            found = getattr(self.optimizer, "found_inf", 0)
            if float(torch.as_tensor(found).sum()) > 0:
                return False
            scale = getattr(self.optimizer, "grad_scale", None)
            if scale is not None:
                inv = 1.0 / torch.as_tensor(scale, dtype=torch.float64)
                for g in self._grads():
                    g.mul_(inv.to(device=g.device, dtype=g.dtype))
            return True
        if self.scaler is None:
            return True
        self.scaler.unscale_(self.optimizer)
        ok = self.grads_finite()
        _stage_stepped(self.scaler, self.optimizer)
        return ok

    @torch.no_grad()
    def skip(self) -> None:
        """Record an inf/NaN step in the scaler (its next ``update()`` lowers the scale); clear ``.grad``."""
        if self.scaler is not None:
            for g in self._grads():
                g.fill_(float("nan"))
            if not self._grads():  # nothing to record the failure on: give the first parameter a NaN grad
                first = next((p for g in self.optimizer.param_groups for p in g["params"]), None)
                if first is not None:
                    first.grad = torch.full_like(first, float("nan"))
            self.scaler.unscale_(self.optimizer)
            _stage_stepped(self.scaler, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

"""The one optimizer step of every wrapper optimizer (SAM, NSO, OGD): a subclass supplies only its gradient.

:class:`WrapperOptimizer` takes a base optimizer CLASS and its keyword arguments and owns the step:
it finds the model (``model=``, or the model of a :class:`~symgen.optim.LossClosure`), checks the
closure, snapshots parameters, BatchNorm buffers and optimizer state, runs the subclass's
:meth:`~WrapperOptimizer.estimate` (which puts the gradient in ``.grad`` through a :class:`StepContext`:
the pass at W, passes at perturbed weights with BatchNorm statistics frozen), handles a GradScaler
(:mod:`symgen.optim.amp`), and lets the base optimizer step. A non-finite loss, gradient or update raises
:class:`~symgen.errors.DivergenceError` with everything restored to before the step; with a GradScaler an
inf/NaN gradient is a skipped step instead. :class:`StepSnapshot` is the same guard for optimizers that are
not wrappers (``UnitNormSGD``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, NoReturn, TypeVar, overload

import torch
from torch import Tensor, nn

from symgen.errors import ConfigError, DivergenceError
from symgen.functional import frozen_running_stats
from symgen.optim.amp import GradScaler, ScaledStep

__all__ = ["WrapperOptimizer", "StepContext", "StepSnapshot", "Closure", "bn_buffers", "model_of"]
__all__ += ["all_finite", "divergence", "call_closure"]

#: A step's closure: zeroes the gradients, computes the loss, calls ``backward``, returns the loss.
Closure = Callable[[], "Tensor | float"]
LossT = TypeVar("LossT", Tensor, float)
T = TypeVar("T")


def bn_buffers(model: nn.Module | None) -> list[Tensor]:
    """The running statistics and batch counts of every BatchNorm layer of ``model`` (none for None).

    Args:
        model: the module, or None.

    Returns:
        The buffers, in module order.
    """
    if model is None:
        return []
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


def model_of(model: nn.Module | None, closure: object) -> nn.Module | None:
    """The model a step runs: ``model`` if given, else the closure's (a :class:`~symgen.optim.LossClosure`'s).

    Args:
        model: the model given to the optimizer, or None.
        closure: the step's closure.

    Returns:
        The module, or None when neither knows it.
    """
    if model is not None:
        return model
    found = getattr(closure, "model", None)
    return found if isinstance(found, nn.Module) else None


@torch.no_grad()
def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every entry of every tensor is finite (one device sync, no copy of the tensors).

    Args:
        tensors: tensors of any shapes and floating dtypes; None entries are skipped.

    Returns:
        True when none holds an inf or NaN.
    """
    oks = [torch.isfinite(t).all() for t in tensors if t is not None and t.is_floating_point()]
    return not oks or bool(torch.stack([ok.to(oks[0].device) for ok in oks]).all())


def _describe(loss: object) -> str:
    return f"{float(torch.as_tensor(loss).detach().float().sum())}"


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the caller's first frame outside symgen.optim, torch.optim and contextlib."""
    inside = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.optim.__file__)))
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(inside) or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    return level


class StepSnapshot:
    """Parameters, BatchNorm buffers and optimizer state at the start of a step; :meth:`restore` puts them back.

    The optimizer state is saved by :meth:`save_state`, just before the update (the only code that writes it).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module | None) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.weights = [p.detach().clone() for p in self.params]
        self.buffers = bn_buffers(model)
        self.saved_buffers = [b.detach().clone() for b in self.buffers]
        self.state: dict[Tensor, dict[str, Any]] | None = None

    def save_state(self) -> None:
        """Copy the optimizer state (momentum, moments, step counts) as it is now."""
        self.state = {
            p: {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in s.items()}
            for p, s in self.optimizer.state.items()
        }

    @torch.no_grad()
    def restore_params(self) -> None:
        """Put the parameters back at the weights of the start of the step (``.grad`` is kept)."""
        for p, w in zip(self.params, self.weights, strict=True):
            p.copy_(w)

    @torch.no_grad()
    def restore(self) -> None:
        """Put parameters, BatchNorm buffers and (if saved) the optimizer state back as they were."""
        self.restore_params()
        for b, s in zip(self.buffers, self.saved_buffers, strict=True):
            b.copy_(s)
        if self.state is not None:
            self.optimizer.state.clear()
            self.optimizer.state.update(self.state)
            self.state = None

    def finite(self) -> tuple[bool, bool]:
        """Whether the parameters, and the BatchNorm running statistics, are finite now (an inf: divergence).

        Returns:
            (parameters finite, running statistics finite).
        """
        return all_finite(self.params), all_finite(self.buffers)


def divergence(name: str, step: int, what: str, hint: str) -> DivergenceError:
    """The error of a diverged step: what went non-finite, at which step, how to fix it.

    Args:
        name: the optimizer's name.
        step: the step's number (1 for the first).
        what: what went non-finite and where, e.g. "loss nan at the weights W".
        hint: how to fix it, e.g. "lower the learning rate, or check the data".

    Returns:
        The :class:`~symgen.errors.DivergenceError` to raise.
    """
    return DivergenceError(
        f"{name} step {step}: non-finite {what}. Parameters, optimizer state and BatchNorm statistics are "
        f"left as they were before the step; {hint}."
    )


def call_closure(closure: Callable[[], T], name: str, step: int) -> T:
    """Run a step's closure with gradients enabled; a DivergenceError it raises (a LossClosure's) names the step.

    Args:
        closure: the closure.
        name: the optimizer's name.
        step: the step's number.

    Returns:
        The closure's loss.
    """
    try:
        with torch.enable_grad():
            return closure()
    except DivergenceError as e:
        if str(e).startswith(f"{name} step"):
            raise
        raise DivergenceError(f"{name} step {step}: {e}") from e


class _Skipped(Exception):
    """Raised inside a step under loss scaling: the step is skipped (GradScaler's inf/NaN behaviour)."""


class StepContext:
    """What one step gives a :meth:`WrapperOptimizer.estimate`: the passes, the weights W, and failing.

    ``params`` are the optimizer's parameters (in ``param_groups`` order), ``weights`` their values W at the
    start of the step (the step puts them back after ``estimate``), ``model`` the model if known, ``number``
    the step's number, ``loss`` the loss of the first pass.
    """

    def __init__(
        self, optimizer: WrapperOptimizer, model: nn.Module | None, snapshot: StepSnapshot, tolerant: bool
    ) -> None:
        self.optimizer = optimizer
        self.model = model
        self.params = snapshot.params
        self.weights = snapshot.weights
        self.number = optimizer.num_steps + 1
        self.tolerant = tolerant
        self.loss: Tensor | float | None = None

    def fail(self, what: str, skip: bool = True) -> NoReturn:
        """Raise the step's :class:`~symgen.errors.DivergenceError` (under loss scaling: skip the step).

        Args:
            what: what went non-finite and where, e.g. "gradient at W + e".
            skip: under loss scaling, a skipped step rather than an error (False: an error always).
        """
        if self.tolerant and skip:
            raise _Skipped(what)
        opt = self.optimizer
        raise divergence(type(opt).__name__, self.number, what, opt.divergence_hint)

    def check_loss(self, loss: object, where: str) -> None:
        """Fail if ``loss`` is not finite.

        Args:
            loss: the loss of a pass.
            where: the weights it was computed at, e.g. "at W + e".
        """
        if not all_finite([torch.as_tensor(loss)]):
            self.fail(f"loss {_describe(loss)} {where}")

    def check_grads(self, where: str) -> None:
        """Fail if any parameter's ``.grad`` is not finite.

        Args:
            where: the weights the gradient was computed at.
        """
        if not all_finite(p.grad for p in self.params):
            self.fail(f"gradient {where}")

    def _call(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        return call_closure(closure, type(self.optimizer).__name__, self.number)

    def clean(
        self, closure: Callable[[], Tensor | float], where: str = "at the clean weights W", check: bool = True
    ) -> Tensor | float:
        """The pass at W: it updates BatchNorm running statistics; its loss is the step's loss.

        Args:
            closure: the step's closure (or any callable that runs the pass and returns its loss).
            where: the weights, for the error message.
            check: fail on a non-finite loss.

        Returns:
            The loss, detached.
        """
        loss = self._call(closure)
        loss = loss.detach() if isinstance(loss, Tensor) else loss
        if self.loss is None:
            self.loss = loss
        if check:
            self.check_loss(loss, where)
        return loss

    def perturbed(self, closure: Callable[[], Tensor | float], where: str) -> Tensor | float:
        """A pass at perturbed weights: BatchNorm running statistics are left as they were.

        Without a known model the statistics cannot be frozen; the first time a BatchNorm layer in train mode
        runs in such a pass, a ``UserWarning`` says to pass ``model=``.

        Args:
            closure: the step's closure.
            where: the weights, for the error message, e.g. "at W + e".

        Returns:
            The loss, detached.
        """
        guard = frozen_running_stats(self.model) if self.model is not None else self.optimizer.watch_batchnorm()
        with guard:
            loss = self._call(closure)
        loss = loss.detach() if isinstance(loss, Tensor) else loss
        if self.loss is None:
            self.loss = loss
        self.check_loss(loss, where)
        return loss

    @torch.no_grad()
    def move(self, deltas: Iterable[Tensor | None], alpha: float = 1.0) -> None:
        """Set the parameters to W + alpha * delta (a None delta leaves that parameter at W).

        Args:
            deltas: one tensor (or None) per parameter, in ``params`` order.
            alpha: the factor (e.g. -1 for the antithetic draw).
        """
        for p, w, d in zip(self.params, self.weights, deltas, strict=True):
            p.copy_(w)
            if d is not None:
                p.add_(d, alpha=alpha)


class WrapperOptimizer(torch.optim.Optimizer):
    """A wrapper around ``base_optimizer``, given as a CLASS with its keyword arguments (lr, momentum, ...).

    As torch's ``ZeroRedundancyOptimizer(optimizer_class=...)`` takes it. Wrapper and base share ``param_groups``
    (per-group hyper-parameters; learning-rate schedulers act on both) and ``state`` (so ``state_dict()``
    holds the base optimizer's momentum and moments and ``load_state_dict`` restores them). A subclass
    implements :meth:`estimate`; ``step(closure)`` does the rest (see the module). ``needs_closure``: whether
    ``step()`` without a closure is an error (SAM, NSO) or steps on the gradient in ``.grad`` (OGD).
    """

    needs_closure: ClassVar[bool] = True
    #: how to fix a diverged step, the end of its error message
    divergence_hint: ClassVar[str] = "lower the learning rate, or check the data"
    _step_supports_amp_scaling = True  # scaler.step(optimizer) calls step() itself; see symgen.optim.amp

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        *,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(base_optimizer, type) or not issubclass(base_optimizer, torch.optim.Optimizer):
            got = (
                f"an instance of {type(base_optimizer).__name__}"
                if isinstance(base_optimizer, torch.optim.Optimizer)
                else repr(base_optimizer)
            )
            raise ConfigError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {got}; "
                "pass the class and its arguments (lr, momentum, ...) as keywords."
            )
        super().__init__(params, {**defaults, **kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.state = self.base_optimizer.state
        self.model = model
        self.num_steps = 0
        self._warned_batchnorm = False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` (the base optimizer's state and groups), keeping wrapper and base shared.

        Args:
            state_dict: from :meth:`state_dict`.
        """
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state

    # -- what a subclass supplies --

    def estimate(self, closure: Closure | None, ctx: StepContext) -> Tensor | float | None:
        """Put this optimizer's gradient estimate in ``.grad``; returns the loss at W.

        Use ``ctx.clean(closure)`` for the pass at W, ``ctx.move(deltas)`` and ``ctx.perturbed(closure, where)``
        for passes at perturbed weights; the step puts the parameters back at W afterwards.

        Args:
            closure: the step's closure (None only when ``needs_closure`` is False).
            ctx: the step's passes, weights and failure.

        Returns:
            The loss at W (None without a closure).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement estimate(closure, ctx).")

    def check_model(self, model: nn.Module | None) -> None:
        """Refuse a step whose model does not fit this optimizer (a ConfigError); by default anything fits.

        Args:
            model: the step's model, or None when unknown.
        """

    def update(self) -> None:
        """Apply the step with the gradient in ``.grad``: the base optimizer's step."""
        self.base_optimizer.step()

    # -- the step --

    @contextlib.contextmanager
    def watch_batchnorm(self) -> Iterator[None]:
        """Warn once if a BatchNorm layer in train mode runs inside (a pass at perturbed weights, model unknown).

        Yields:
            Nothing: the pass runs inside.
        """
        if self._warned_batchnorm:
            yield
            return
        seen: list[nn.Module] = []

        def hook(module: nn.Module, args: object) -> None:
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
                seen.append(module)

        handle = nn.modules.module.register_module_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        if seen and not self._warned_batchnorm:
            self._warned_batchnorm = True
            name = type(self).__name__
            warnings.warn(
                f"{name} does not know the model, so a pass at perturbed weights updated the running statistics "
                f"of BatchNorm layers in train mode (they should be updated once per step, by the pass at W). "
                f"Pass model=model to {name}(...), or step with symgen.optim.LossClosure(model, loss_fn, x, y).",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )

    def _closure_error(self) -> ConfigError:
        return ConfigError(
            f"{type(self).__name__}.step() needs a closure that zeroes gradients, computes the loss, calls "
            "backward() and returns the loss, e.g. symgen.optim.LossClosure(model, loss_fn, x, y)."
        )

    @overload
    def step(self, closure: None = None, scaler: GradScaler | None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], LossT], scaler: GradScaler | None = None) -> LossT: ...

    def step(
        self, closure: Callable[[], LossT] | None = None, scaler: GradScaler | None = None
    ) -> Tensor | float | None:
        """One step: the gradient estimate, then the base optimizer's step.

        With ``scaler`` (a ``torch.amp.GradScaler``) the closure backpropagates the scaled loss, the final
        gradient is unscaled once and an inf/NaN step is skipped (:mod:`symgen.optim.amp`). A non-finite loss,
        gradient or update raises :class:`~symgen.errors.DivergenceError` with parameters, optimizer state
        and BatchNorm statistics as they were before the step.

        Args:
            closure: zeroes gradients, computes the loss, calls ``backward``, returns the loss.
            scaler: a ``torch.amp.GradScaler`` for mixed precision, or None.

        Returns:
            The loss at W (detached), or None without a closure.
        """
        amp = ScaledStep(self, scaler, closure, needs_closure=self.needs_closure)
        if closure is None and self.needs_closure:
            raise self._closure_error()
        with torch.no_grad():
            return self._run(closure, amp, update=True)

    def estimate_gradient(self, closure: Closure) -> Tensor | float | None:
        """Put the gradient estimate in ``.grad`` without stepping (parameters stay at W).

        Args:
            closure: the step's closure.

        Returns:
            The loss at W.
        """
        with torch.no_grad():
            return self._run(closure, ScaledStep(self, None, closure), update=False)

    def _run(self, closure: Closure | None, amp: ScaledStep, update: bool) -> Tensor | float | None:
        model = model_of(self.model, closure)
        self.check_model(model)
        snapshot = StepSnapshot(self, model)
        ctx = StepContext(self, model, snapshot, tolerant=amp.active)
        try:
            loss = self.estimate(closure, ctx)
            snapshot.restore_params()
            if amp.active:
                if not amp.grads_finite():
                    raise _Skipped("gradient")
                if not amp.finish():  # the scaler found inf/NaN and recorded it
                    self.zero_grad(set_to_none=True)
                    return loss
            ctx.check_grads("in the step's gradient estimate")
            if not snapshot.finite()[1]:
                ctx.fail("BatchNorm running statistics after the pass at W", skip=False)
            if not update:
                return loss
            snapshot.save_state()
            self.update()
            if not snapshot.finite()[0]:
                ctx.fail("update: the parameters after the base optimizer's step", skip=False)
        except _Skipped:
            snapshot.restore_params()
            amp.skip()
            return ctx.loss
        except BaseException:
            snapshot.restore()
            self.zero_grad(set_to_none=True)
            raise
        self.num_steps += 1
        return loss

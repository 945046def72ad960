"""Noise stability optimization (NSO): descend F(W) = E_U L(W + U), U ~ N(0, sigma^2 I), which is
about L(W) + sigma^2/2 tr(Hessian), with an antithetic gradient estimator.

Ju, Li, Zhang, "Noise Stability Optimization for Flat Minima with Tight Rates" (arXiv 2306.08553).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from symgen import functional as F
from symgen.errors import ConfigError, DivergenceError
from symgen.optim.amp import ScaledStep
from symgen.optim.closure import LossClosure
from symgen.optim.ddp import all_reduce_mean, ddp_group
from symgen.optim.wrapper import WrapperOptimizer
from symgen.rng import Seed, as_generator

__all__ = ["NSO"]


def _bn_buffers(model: nn.Module | None) -> list[Tensor]:
    if model is None:
        return []
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


class NSO(WrapperOptimizer):
    """NSO: the base optimizer steps with
    g = lam grad L(W) + (1 - lam)/(2k) sum_i [grad L(W + U_i) + grad L(W - U_i)], U_i ~ N(0, sigma^2 I)
    (``antithetic=False``: (1 - lam)/k sum_i grad L(W + U_i)). arXiv 2306.08553, Algorithm 1.

    ``base_optimizer`` is an optimizer class; extra keywords (lr, momentum, weight_decay) go to it.
    ``sigma`` is the noise standard deviation, or with ``relative=True`` the noise-to-weight norm
    ratio of each parameter tensor (std = sigma ||W_l|| / sqrt(numel W_l), so ||U_l|| ~ sigma ||W_l||).
    ``clean_weight`` is lam (0 in all of the paper's runs). ``num_samples`` is k. Noise comes from
    ``generator`` (a seed or a ``torch.Generator``; None = seed 0), per tensor in parameter order.

    ``step(closure)``, the torch.optim protocol; returns the loss at the clean weights W:

    - a :class:`~symgen.optim.LossClosure` (what ``symgen.training.fit`` passes): the 2k perturbed
      copies are evaluated together by ``vmap`` through :mod:`symgen.functional` (the clean pass is
      forward-only when lam = 0; ``chunk_size`` bounds the copies per ``vmap`` call);
    - any other closure (zeroes gradients, computes the loss, calls ``backward``, returns it): it is
      called 1 + 2k times, clean pass first.

    Both draw the same noise, so they take the same step (to round-off). BatchNorm, as in the reference
    code: the clean pass at W updates the running statistics, the perturbed passes use batch statistics
    with the running statistics frozen (:func:`symgen.functional.frozen_running_stats`; the closure path
    needs ``model``, or a ``LossClosure``, to find them). A non-finite loss or gradient raises
    :class:`DivergenceError` naming the step; parameters and BatchNorm statistics are then left as
    they were before the step (also if the closure raises).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        sigma: float = 0.01,
        num_samples: int = 1,
        antithetic: bool = True,
        clean_weight: float = 0.0,
        relative: bool = False,
        model: nn.Module | None = None,
        generator: Seed = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not sigma >= 0:
            raise ConfigError(f"sigma must be >= 0, got {sigma}.")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(
                f"num_samples (k, the number of noise draws per step) must be an integer >= 1, got {num_samples!r}."
            )
        if not 0.0 <= clean_weight <= 1.0:
            raise ConfigError(f"clean_weight (lam) must lie in [0, 1], got {clean_weight}.")
        super().__init__(params, base_optimizer, dict(sigma=sigma, relative=relative), **kwargs)
        for g in self.param_groups:
            if not g["sigma"] >= 0:
                raise ConfigError(f"sigma must be >= 0 in every parameter group, got {g['sigma']}.")
        self.num_samples = num_samples
        self.antithetic = antithetic
        self.clean_weight = float(clean_weight)
        self.model = model
        self.generator = as_generator(generator)
        self.chunk_size = chunk_size
        self.num_steps = 0
        self._last_loss: Any = None
        self.passes_per_step = 1 + (2 * num_samples if antithetic else num_samples)

    # -- pieces shared by both paths --

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _signs(self) -> tuple[float, ...]:
        return (1.0, -1.0) if self.antithetic else (1.0,)

    @torch.no_grad()
    def _draw_noise(self) -> list[Tensor]:
        """U for every parameter, shape (k, *p.shape); drawn in parameter order, k at a time."""
        items = [(p, g) for g in self.param_groups for p in g["params"]]
        keys = [str(i) for i in range(len(items))]
        noise = F.gaussian_noise(
            {k: p for k, (p, _) in zip(keys, items, strict=True)},
            {k: g["sigma"] for k, (_, g) in zip(keys, items, strict=True)},
            self.generator,
            self.num_samples,
            relative={k: g["relative"] for k, (_, g) in zip(keys, items, strict=True)},
        )
        return list(noise.values())

    def _fail(self, what: str) -> None:
        raise DivergenceError(
            f"NSO step {self.num_steps + 1}: non-finite {what}. Parameters and BatchNorm "
            "statistics are left as before the step; lower the learning rate or sigma, "
            "or check the data."
        )

    @contextlib.contextmanager
    def _restored_on_error(self, model: nn.Module | None, params: list[Tensor] | None) -> Any:
        """On any exception (divergence, a failing closure), put parameters and BN statistics back."""
        bn = _bn_buffers(model)
        saved_bn = [b.detach().clone() for b in bn]
        saved_p = [p.detach().clone() for p in params] if params is not None else []
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for p, w in zip(params or [], saved_p, strict=True):
                    p.copy_(w)
                for b, s in zip(bn, saved_bn, strict=True):
                    b.copy_(s)
            self.zero_grad(set_to_none=True)
            raise

    @staticmethod
    def _finite(x: Any) -> bool:
        return bool(torch.isfinite(torch.as_tensor(x)).all())

    @staticmethod
    def _grads_finite(params: list[Tensor]) -> bool:
        grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.cat(grads)).all())  # one check, one sync

    def _sample_name(self, i: int, s: float) -> str:
        sign = "+" if s > 0 else "-"
        return f"W {sign} U_{i + 1} (noise draw {i + 1} of {self.num_samples})"

    # -- the step --

    _step_supports_amp_scaling = True  # scaler.step(optimizer) calls step() itself; see symgen.optim.amp

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Tensor] | None = None,  # type: ignore[override]
        scaler: Any = None,
    ) -> Tensor:
        """One NSO step; with ``scaler`` (a ``torch.amp.GradScaler``) the closure backpropagates the scaled
        loss, the averaged gradient is unscaled once and an inf/NaN step is skipped (:mod:`symgen.optim.amp`)."""
        amp = ScaledStep(self, scaler, closure, needs_closure=True)
        if closure is None:
            raise ConfigError(
                "NSO.step() needs a closure that zeroes gradients, computes the loss, calls "
                "backward() and returns it, e.g. symgen.optim.LossClosure(model, loss_fn, x, y)."
            )
        if amp.active:
            loss = self._estimate_sequential(closure, tolerate=True)
            if loss is None or not amp.grads_finite():
                amp.skip()
            elif amp.finish():
                self.base_optimizer.step()
                self.num_steps += 1
            else:
                self.zero_grad(set_to_none=True)
            return self._last_loss
        loss = self.estimate_gradient(closure)
        self.base_optimizer.step()
        self.num_steps += 1
        return loss

    def estimate_gradient(self, closure: Callable[[], Tensor]) -> Tensor:
        """Put the NSO gradient estimate in ``.grad`` without stepping; returns the clean loss.

        A :class:`LossClosure` takes the vectorized path, any other closure is called 1 + 2k times.
        With sigma = 0 in every group the estimate is grad L(W) itself: one pass, so the step is the base
        optimizer's exactly.
        """
        if all(g["sigma"] == 0 for g in self.param_groups):
            return self._estimate_clean(closure)
        if isinstance(closure, LossClosure) and closure.vectorizable:
            return self._estimate_vectorized(closure)
        return self._estimate_sequential(closure)

    def _estimate_clean(self, closure: Callable[[], Tensor]) -> Tensor:
        model = self.model if self.model is not None else getattr(closure, "model", None)
        with self._restored_on_error(model, None):
            loss = torch.enable_grad()(closure)()
            self._last_loss = loss.detach() if isinstance(loss, Tensor) else loss
            if not self._finite(loss):
                self._fail(f"loss {float(loss)} at the clean weights W")
            if not self._grads_finite(self._params()):
                self._fail("gradient at the clean weights W")
        return self._last_loss

    # -- closure path: 1 + 2k calls --

    def _estimate_sequential(self, closure: Callable[[], Tensor], tolerate: bool = False) -> Tensor | None:
        """``tolerate`` (mixed precision): a non-finite loss returns None, non-finite gradients are kept
        (the scaler skips the step) instead of raising."""
        if tolerate:
            bad: list[str] = []
            fail = bad.append
        else:
            fail = self._fail
        params = self._params()
        model = self.model if self.model is not None else getattr(closure, "model", None)
        closure = torch.enable_grad()(closure)
        lam = self.clean_weight
        with self._restored_on_error(model, params):
            saved_p = [p.detach().clone() for p in params]
            # clean pass: updates BatchNorm running statistics (train mode) and gives grad L(W)
            loss = closure()
            self._last_loss = loss.detach() if isinstance(loss, Tensor) else loss
            if not self._finite(loss):
                fail(f"loss {float(loss)} at the clean weights W")
            acc = [torch.zeros_like(p) for p in params]
            if lam > 0:
                if not self._grads_finite(params):
                    fail("gradient at the clean weights W")
                for a, p in zip(acc, params, strict=True):
                    if p.grad is not None:
                        a.add_(p.grad, alpha=lam)
            noise = self._draw_noise()
            weight = (1.0 - lam) / (self.num_samples * len(self._signs()))
            frozen = F.frozen_running_stats(model) if model is not None else contextlib.nullcontext()
            with frozen:  # the perturbed passes leave the running statistics as the clean pass set them
                for i in range(self.num_samples):
                    for s in self._signs():
                        with torch.no_grad():
                            for p, w, u in zip(params, saved_p, noise, strict=True):
                                p.copy_(w).add_(u[i], alpha=s)
                        loss_i = closure()
                        if not self._finite(loss_i):
                            fail(f"loss {float(loss_i)} at {self._sample_name(i, s)}")
                        if not self._grads_finite(params):
                            fail(f"gradient at {self._sample_name(i, s)}")
                        for a, p in zip(acc, params, strict=True):
                            if p.grad is not None:
                                a.add_(p.grad, alpha=weight)
            with torch.no_grad():
                for p, w, a in zip(params, saved_p, acc, strict=True):
                    p.copy_(w)
                    p.grad = a
        if tolerate and any(w.startswith("loss") for w in bad):
            return None
        return loss.detach() if isinstance(loss, Tensor) else loss

    # -- vectorized path: the 2k copies under vmap --

    def _named(self, model: nn.Module) -> list[str]:
        names = {id(p): n for n, p in model.named_parameters()}
        out = []
        for p in self._params():
            if id(p) not in names:
                raise ConfigError(
                    "NSO with a LossClosure: an optimized parameter is not a parameter of the "
                    "closure's model; build NSO from model.parameters(), or pass a plain closure."
                )
            out.append(names[id(p)])
        return out

    def _estimate_vectorized(self, closure: LossClosure) -> Tensor:
        model, loss_fn, x, y = closure.model, closure.loss_fn, closure.x, closure.y
        # DistributedDataParallel: its reducer averages .grad in backward, which torch.func does not fill:
        # evaluate the wrapped module and average the estimate over the processes ourselves (below)
        ddp = ddp_group(model)
        if ddp is not None:
            model = model.module
        params = self._params()
        names = self._named(model)
        lam = self.clean_weight
        # this path never writes the parameters before the final step: only BN statistics need saving
        with self._restored_on_error(model, None):
            # clean pass on the module itself: BatchNorm running statistics update in place
            loss = closure.evaluate(backward=lam > 0, check=False)
            if not self._finite(loss):
                self._fail(f"loss {float(loss)} at the clean weights W")
            g_clean = None
            if lam > 0:
                g_clean = {
                    n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                    for n, p in zip(names, params, strict=True)
                }
            w0 = {n: p.detach() for n, p in zip(names, params, strict=True)}
            noise = dict(zip(names, self._draw_noise(), strict=True))
            signs = self._signs()
            m = self.num_samples * len(signs)
            stacked = F.perturbed_copies(w0, noise, signs)
            # every copy gets its own buffers: train-mode BatchNorm writes into them, they are discarded
            buffers = F.expand_buffers(F.buffers_of(model), m)

            def member_loss(p: F.Params, b: F.Params, xx: Tensor, yy: Tensor) -> Tensor:
                return loss_fn(F.call(model, p, b, xx), yy)

            values, grads = F.ensemble_value_and_grad(
                member_loss, stacked, buffers, x, y, in_dims=(0, None, None), chunk_size=self.chunk_size
            )
            # one finiteness check over every member's loss and gradient; locate a failure only if there is one
            ok = torch.isfinite(torch.cat([values.reshape(m, 1)] + [grads[n].reshape(m, -1) for n in names], 1)).all(1)
            if not bool(ok.all()):
                j = int((~ok).nonzero()[0, 0])
                what = "loss" if not self._finite(values[j]) else "gradient"
                self._fail(f"{what} at {self._sample_name(j % self.num_samples, signs[j // self.num_samples])}")
            if g_clean is not None and not bool(
                torch.isfinite(torch.cat([g.reshape(-1) for g in g_clean.values()])).all()
            ):
                self._fail("gradient at the clean weights W")
            with torch.no_grad():
                for p, n in zip(params, names, strict=True):
                    g = (1.0 - lam) * grads[n].mean(0)
                    if g_clean is not None:
                        g = g + lam * g_clean[n]
                    p.grad = g.detach()
            if ddp is not None:
                all_reduce_mean([p.grad for p in params], ddp)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the noise generator's, so a resumed run draws the same noise."""
        out = super().state_dict()
        out["generator_state"] = self.generator.get_state()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if generator_state is not None:
            self.generator.set_state(generator_state)

"""Noise stability optimization (NSO): descend F(W) = E_U L(W + U), U ~ N(0, sigma^2 I), which is
about L(W) + sigma^2/2 tr(Hessian), with an antithetic gradient estimator.

Ju, Li, Zhang, "Noise Stability Optimization for Flat Minima with Tight Rates" (arXiv 2306.08553).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from symgen import functional as F
from symgen.errors import ConfigError
from symgen.optim.closure import LossClosure
from symgen.optim.ddp import all_reduce_mean, ddp_group
from symgen.optim.wrapper import Closure, StepContext, WrapperOptimizer
from symgen.rng import Seed, as_generator

__all__ = ["NSO"]


class NSO(WrapperOptimizer):
    """NSO: the base optimizer steps with g = lam grad L(W) + (1 - lam)/(2k) sum_i [grad L(W + U_i) + grad L(W - U_i)].

    U_i ~ N(0, sigma^2 I) (``antithetic=False``: (1 - lam)/k sum_i grad L(W + U_i)); arXiv 2306.08553,
    Algorithm 1. ``sigma`` is the noise standard deviation, or with ``relative=True`` the noise-to-weight norm
    ratio of each parameter tensor (std = sigma ||W_l|| / sqrt(numel W_l), so ||U_l|| ~ sigma ||W_l||).
    Noise comes from ``generator`` per tensor in parameter order.

    ``step(closure)``, the torch.optim protocol; returns the loss at the clean weights W:

    - a :class:`~symgen.optim.LossClosure` (what ``symgen.training.fit`` passes): the 2k perturbed
      copies are evaluated together by ``vmap`` through :mod:`symgen.functional` (the clean pass is
      forward-only when lam = 0; ``chunk_size`` bounds the copies per ``vmap`` call);
    - any other closure (zeroes gradients, computes the loss, calls ``backward``, returns it): it is
      called 1 + 2k times, clean pass first.

    Both draw the same noise, so they take the same step (to round-off). BatchNorm, as in the reference
    code: the clean pass at W updates the running statistics, the perturbed passes use batch statistics
    with the running statistics frozen (:func:`symgen.functional.frozen_running_stats`; the closure path
    needs ``model``, or a ``LossClosure``, to find them, and warns once without). A non-finite loss,
    gradient or update raises :class:`~symgen.errors.DivergenceError` naming the step; parameters, optimizer
    state and BatchNorm statistics are then left as they were before the step (also if the closure raises).

    Args:
        params: parameters or parameter groups (a group may set its own ``sigma`` and ``relative``).
        base_optimizer: the optimizer class that takes the step, e.g. ``torch.optim.SGD``.
        sigma: the noise standard deviation (or ratio, with ``relative``).
        num_samples: k, the number of noise draws per step.
        antithetic: evaluate W - U_i too.
        clean_weight: lam, the weight of the clean gradient (0 in all of the paper's runs).
        relative: sigma is relative to each tensor's weight norm.
        model: the model (finds BatchNorm layers); a LossClosure's model is found without it.
        generator: a seed or a ``torch.Generator`` (None: seed 0).
        chunk_size: the most perturbed copies per ``vmap`` call (None: all).
        **kwargs: the base optimizer's arguments (lr, momentum, weight_decay, ...).
    """

    divergence_hint = "lower the learning rate or sigma, or check the data"

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
        super().__init__(params, base_optimizer, dict(sigma=sigma, relative=relative), model=model, **kwargs)
        for g in self.param_groups:
            if not g["sigma"] >= 0:
                raise ConfigError(f"sigma must be >= 0 in every parameter group, got {g['sigma']}.")
        self.num_samples = num_samples
        self.antithetic = antithetic
        self.clean_weight = float(clean_weight)
        self.generator = as_generator(generator)
        self.chunk_size = chunk_size
        self.passes_per_step = 1 + (2 * num_samples if antithetic else num_samples)

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

    def _sample_name(self, i: int, s: float) -> str:
        sign = "+" if s > 0 else "-"
        return f"W {sign} U_{i + 1} (noise draw {i + 1} of {self.num_samples})"

    def estimate(self, closure: Closure | None, ctx: StepContext) -> Tensor | float | None:
        """The NSO gradient estimate in ``.grad``; returns the clean loss.

        A :class:`~symgen.optim.LossClosure` takes the vectorized path, any other closure is called 1 + 2k
        times. With sigma = 0 in every group the estimate is grad L(W) itself: one pass, so the step is the
        base optimizer's exactly.

        Args:
            closure: the step's closure.
            ctx: the step's passes.

        Returns:
            The loss at W.
        """
        if closure is None:
            raise self._closure_error()
        if all(g["sigma"] == 0 for g in self.param_groups):
            loss = ctx.clean(closure)
            ctx.check_grads("at the clean weights W")
            return loss
        if isinstance(closure, LossClosure) and closure.vectorizable:
            return self._estimate_vectorized(closure, ctx)
        return self._estimate_sequential(closure, ctx)

    # -- closure path: 1 + 2k calls --

    def _estimate_sequential(self, closure: Closure, ctx: StepContext) -> Tensor | float:
        params, lam = ctx.params, self.clean_weight
        # clean pass: updates BatchNorm running statistics (train mode) and gives grad L(W)
        loss = ctx.clean(closure)
        acc = [torch.zeros_like(p) for p in params]
        if lam > 0:
            ctx.check_grads("at the clean weights W")
            for a, p in zip(acc, params, strict=True):
                if p.grad is not None:
                    a.add_(p.grad, alpha=lam)
        noise = self._draw_noise()
        weight = (1.0 - lam) / (self.num_samples * len(self._signs()))
        for i in range(self.num_samples):
            for s in self._signs():
                ctx.move([u[i] for u in noise], alpha=s)
                where = f"at {self._sample_name(i, s)}"
                ctx.perturbed(closure, where)  # the running statistics stay as the clean pass set them
                ctx.check_grads(where)
                for a, p in zip(acc, params, strict=True):
                    if p.grad is not None:
                        a.add_(p.grad, alpha=weight)
        for p, a in zip(params, acc, strict=True):
            p.grad = a
        return loss

    # -- vectorized path: the 2k copies under vmap --

    def _named(self, model: nn.Module, params: list[Tensor]) -> list[str]:
        names = {id(p): n for n, p in model.named_parameters()}
        out = []
        for p in params:
            if id(p) not in names:
                raise ConfigError(
                    "NSO with a LossClosure: an optimized parameter is not a parameter of the "
                    "closure's model; build NSO from model.parameters(), or pass a plain closure."
                )
            out.append(names[id(p)])
        return out

    def _estimate_vectorized(self, closure: LossClosure, ctx: StepContext) -> Tensor | float:
        model, loss_fn, x, y = closure.model, closure.loss_fn, closure.x, closure.y
        # DistributedDataParallel: its reducer averages .grad in backward, which torch.func does not fill:
        # evaluate the wrapped module and average the estimate over the processes ourselves (below)
        ddp = ddp_group(model)
        if ddp is not None and isinstance(model.module, nn.Module):
            model = model.module
        params, lam = ctx.params, self.clean_weight
        names = self._named(model, params)
        # clean pass on the module itself: BatchNorm running statistics update in place
        loss = ctx.clean(lambda: closure.evaluate(backward=lam > 0, check=False))
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
            where = f"at {self._sample_name(j % self.num_samples, signs[j // self.num_samples])}"
            ctx.check_loss(values[j], where)
            ctx.fail(f"gradient {where}")
        if g_clean is not None:
            ctx.check_grads("at the clean weights W")
        for p, n in zip(params, names, strict=True):
            g = (1.0 - lam) * grads[n].mean(0)
            if g_clean is not None:
                g = g + lam * g_clean[n]
            p.grad = g.detach()
        if ddp is not None:
            all_reduce_mean([g for g in (p.grad for p in params) if g is not None], ddp)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the noise generator's, so a resumed run draws the same noise.

        Returns:
            The state dict.
        """
        out = super().state_dict()
        out["generator_state"] = self.generator.get_state()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, the noise generator's state included.

        Args:
            state_dict: from :meth:`state_dict`.
        """
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if generator_state is not None:
            self.generator.set_state(generator_state)

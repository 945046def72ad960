"""Noise stability of a trained model: how much the loss rises under Gaussian weight noise."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from symgen import functional as F
from symgen.errors import ConfigError
from symgen.rng import Seed, as_generator
from symgen.stats import mean_stderr

__all__ = ["NoiseStability", "noise_stability"]


@dataclass
class NoiseStability:
    """``value`` = E_U[L(W + U)] - L(W) +- ``stderr``, with the clean and mean perturbed losses."""

    value: float
    stderr: float
    clean_loss: float
    perturbed_loss: float
    sigma: float
    num_samples: int
    relative: bool


def noise_stability(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], data: Any, sigma: float,
                    num_samples: int = 32, *, relative: bool = False, antithetic: bool = True,
                    bn_mode: str = "eval", param_names: Iterable[str] | None = None, generator: Seed = None,
                    chunk_size: int | None = None) -> NoiseStability:
    """Noise stability E_U[L(W + U)] - L(W), U ~ N(0, sigma^2 I) (about sigma^2/2 tr H for small sigma).

    ``num_samples`` noise draws, evaluated together by ``vmap``; ``antithetic`` also evaluates W - U
    and averages the pair (the same expectation, the first-order term cancels). ``relative``: sigma
    is the noise-to-weight norm ratio per parameter tensor, as in :class:`symgen.optim.NSO`. The loss
    is the sample mean over ``data`` (a batch or a loader), BatchNorm in ``bn_mode`` (running
    statistics untouched). ``param_names``: the perturbed parameters (default all trainable ones).
    ``generator``: an int seed or a ``torch.Generator`` (None = seed 0); the noise is drawn tensor by
    tensor in parameter order on the generator's device (:func:`symgen.functional.gaussian_noise`).
    arXiv 2306.08553.
    """
    if not sigma >= 0:
        raise ConfigError(f"sigma must be >= 0, got {sigma}.")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 2:
        raise ConfigError(f"num_samples must be an integer >= 2 (for a standard error), got {num_samples!r}.")
    all_params = F.params_of(model)
    names = list(all_params) if param_names is None else (
        [param_names] if isinstance(param_names, str) else list(param_names))
    unknown = [n for n in names if n not in all_params]
    if unknown or not names:
        raise ConfigError(f"param_names {unknown or names} are not trainable parameters; "
                          f"valid: {', '.join(all_params)}.")
    w0 = {n: all_params[n] for n in names}
    batches = F.as_batches(data, device=next(iter(w0.values())).device)
    base_buffers = F.buffers_of(model)
    noise = F.gaussian_noise(w0, sigma, as_generator(generator), num_samples, relative=relative)
    signs = (1.0, -1.0) if antithetic else (1.0,)
    stacked = F.perturbed_copies(w0, noise, signs)
    m = num_samples * len(signs)

    def loss_at(p: F.Params, b: F.Params) -> Tensor:
        f = F.loss_function(model, loss_fn, b)
        return F.batches_loss(f, p, batches, "mean")

    with torch.no_grad(), F.bn_mode(model, bn_mode):
        clean = float(loss_at(w0, {k: v.clone() for k, v in base_buffers.items()}))
        if bn_mode == "train":  # each copy normalizes with its own batch statistics, in private buffers
            losses = vmap(loss_at, in_dims=(0, 0), chunk_size=chunk_size)(stacked, F.expand_buffers(base_buffers, m))
        else:
            losses = vmap(loss_at, in_dims=(0, None), chunk_size=chunk_size)(stacked, base_buffers)
    per_draw = losses.view(len(signs), num_samples).mean(0) - clean
    value, stderr = mean_stderr(per_draw)
    return NoiseStability(value, stderr, clean, float(losses.mean()), float(sigma), num_samples, relative)

"""Noise stability of a trained model: how much the loss rises under Gaussian weight noise."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from symgen import distributed
from symgen import functional as F
from symgen.distributed import GroupSpec
from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.numerics import check_batch, check_tensors
from symgen.rng import Seed, as_generator
from symgen.stats import mean_stderr
from symgen.streaming import BatchStream, Data, model_device

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


def noise_stability(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Data,
    sigma: float,
    num_samples: int = 32,
    *,
    relative: bool = False,
    antithetic: bool = True,
    bn_mode: str = "eval",
    param_names: Iterable[str] | None = None,
    generator: Seed = None,
    chunk_size: int | None = None,
    process_group: GroupSpec = "auto",
) -> NoiseStability:
    """Noise stability E_U[L(W + U)] - L(W), U ~ N(0, sigma^2 I) (about sigma^2/2 tr H for small sigma).

    The noise draws are evaluated together by ``vmap``. arXiv 2306.08553.

    Args:
        model: the model.
        loss_fn: L, a mean loss.
        data: a batch, a list of batches or a DataLoader, streamed (one batch in memory at a time, float64
            sums); the loss is the sample mean over it.
        sigma: the noise scale.
        num_samples: the number of noise draws.
        relative: sigma is the noise-to-weight norm ratio per parameter tensor, as in :class:`symgen.optim.NSO`.
        antithetic: also evaluate W - U and average the pair (the same expectation, the first-order term
            cancels).
        bn_mode: BatchNorm mode (running statistics untouched).
        param_names: the perturbed parameters (default all trainable ones).
        generator: an int seed or a ``torch.Generator`` (None = seed 0); the noise is drawn tensor by
            tensor in parameter order on the generator's device (:func:`symgen.functional.gaussian_noise`).
        chunk_size: noise draws per ``vmap`` chunk (None: all at once).
        process_group: each rank streams its shard and the sums are all-reduced (:mod:`symgen.distributed`).

    Returns:
        The :class:`NoiseStability`.
    """
    if not sigma >= 0:
        raise ConfigError(f"sigma must be >= 0, got {sigma}.")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 2:
        raise ConfigError(f"num_samples must be an integer >= 2 (for a standard error), got {num_samples!r}.")
    all_params = F.params_of(model)
    names = (
        list(all_params)
        if param_names is None
        else ([param_names] if isinstance(param_names, str) else list(param_names))
    )
    unknown = [n for n in names if n not in all_params]
    if unknown or not names:
        raise ConfigError(
            f"param_names {unknown or names} are not trainable parameters; valid: {', '.join(all_params)}."
        )
    w0 = {n: all_params[n] for n in names}
    group = distributed.resolve_group(process_group)
    stream = BatchStream(data, device=model_device(model), allow_empty=group is not None)
    base_buffers = F.buffers_of(model)
    noise = F.gaussian_noise(w0, sigma, as_generator(generator), num_samples, relative=relative)
    signs = (1.0, -1.0) if antithetic else (1.0,)
    stacked = F.perturbed_copies(w0, noise, signs)
    m = num_samples * len(signs)
    # float64 sums over the stream: [clean, m perturbed losses, count], each batch weighted by its size; then
    # a flag: this rank met NaN or inf (its error is raised after the sum, the other ranks raise too)
    acc = torch.zeros(m + 3, dtype=torch.float64, device=model_device(model))
    err: DivergenceError | None = None
    count = 0
    try:
        check_tensors("noise_stability", "weight", w0)
        check_tensors("noise_stability", "buffer", base_buffers)
        # the fused nn.MultiheadAttention fast path has no vmap batching rule (a slow loop per draw): math SDPA
        with torch.no_grad(), F.bn_mode(model, bn_mode), F.math_attention():
            for bi, (x, y) in enumerate(stream):
                check_batch("noise_stability", x, y, batch=bi, offset=count)
                count += x.shape[0]

                def loss_at(p: F.Params, b: F.Params, x: Tensor = x, y: Tensor = y) -> Tensor:
                    return F.loss_function(model, loss_fn, b)(p, x, y)

                n_b = float(x.shape[0])
                clean_b = loss_at(w0, _clone(base_buffers))
                if not bool(torch.isfinite(clean_b).all()):
                    raise DivergenceError(
                        f"noise_stability: the loss at the unperturbed weights on batch {bi} is {float(clean_b)} though "
                        "its inputs, weights and buffers are finite (the loss or the model's output overflowed)."
                    )
                acc[0] += n_b * float(clean_b)
                if bn_mode == "train":  # each copy normalizes with its own batch statistics, in private buffers
                    losses = vmap(loss_at, in_dims=(0, 0), chunk_size=chunk_size)(
                        stacked, F.expand_buffers(base_buffers, m)
                    )
                else:
                    losses = vmap(loss_at, in_dims=(0, None), chunk_size=chunk_size)(stacked, base_buffers)
                if not bool(torch.isfinite(losses).all()):
                    raise DivergenceError(
                        f"noise_stability: the loss at perturbed weights on batch {bi} holds non-finite values "
                        f"(NaN or inf) though the unperturbed loss is finite; sigma = {sigma} is too large for "
                        "this model (or compute in float64)."
                    )
                acc[1:-2] += n_b * losses.double()
                acc[-2] += n_b
    except DivergenceError as e:
        if group is None:
            raise
        err, acc[-1] = e, 1.0
    if group is not None:
        sig: dict[str, object] = {"num_samples": num_samples, "antithetic": bool(antithetic)}
        sig.update({f"parameter {k}": f"{list(v.shape)} {v.dtype}" for k, v in w0.items()})
        distributed.check_consistent(sig, group, what="noise_stability")
    acc = distributed.all_reduce_sum(acc, group)
    if err is not None:
        raise err
    if float(acc[-1]) > 0:
        raise DivergenceError(
            f"noise_stability: {int(acc[-1])} other rank(s) met NaN or inf (their error names where); "
            "every rank stops here."
        )
    acc = acc[:-1]
    if float(acc[-1]) == 0:
        raise ShapeError("data holds no samples on any rank; pass a batch (x, y) or a non-empty loader.")
    clean, losses = float(acc[0] / acc[-1]), acc[1:-1] / acc[-1]
    per_draw = losses.view(len(signs), num_samples).mean(0) - clean
    value, stderr = mean_stderr(per_draw)
    return NoiseStability(value, stderr, clean, float(losses.mean()), float(sigma), num_samples, relative)


def _clone(buffers: F.Params) -> F.Params:
    return {k: v.clone() for k, v in buffers.items()}

"""Adversarial attacks: FGSM and PGD in an L-inf or L2 ball, the losses they ascend, and accuracy.

Attacks work on anything differentiable in its input: an ``nn.Module``, a plain callable, or a
kernel-regression predictor (the gradient flows through the kernel with respect to the test input).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.labels import correct
from symgen.rng import Seed, as_generator
from symgen.streaming import check_same_device

__all__ = ["Predictor", "LossSpec", "attack_loss", "correct_count", "accuracy", "fgsm", "pgd"]

#: Anything differentiable in its input: an ``nn.Module``, a callable, a kernel predictor.
Predictor = Callable[[Tensor], Tensor]
#: An attack loss: "auto", "ce", "margin", "mse" or a callable ``(out, y) -> (N,)``.
LossSpec = str | Callable[[Tensor, Tensor], Tensor]


def _signed_binary(y: Tensor) -> Tensor:
    """Binary labels {0, 1} or {-1, +1} as floats in {-1, +1}."""
    if y.is_floating_point():
        return torch.sign(y)
    return torch.where(y > 0, 1.0, -1.0).to(torch.get_default_dtype())


def attack_loss(out: Tensor, y: Tensor, loss: LossSpec = "auto") -> Tensor:
    """Per-example loss the attacker ascends, shape ``(N,)``.

    Args:
        out: the outputs.
        y: the labels or targets.
        loss: ``"ce"``: cross-entropy of logits ``(N, C)`` against integer labels. ``"margin"``: the
            Carlini-Wagner margin ``max_{j != y} f_j - f_y`` (for one output: ``-y f`` with y in {-1, +1}),
            which ignores the output scale, so it suits kernel predictors. ``"mse"``: squared error to
            float targets. ``"auto"``: ce for integer labels and several outputs, margin for one output,
            mse for float targets. A callable ``(out, y) -> (N,)`` is used as is.

    Returns:
        The losses ``(N,)``.
    """
    if callable(loss):
        value = loss(out, y)
        if value.ndim != 1:
            raise ShapeError(
                f"a custom attack loss must return one value per example (N,), got shape "
                f"{tuple(value.shape)}; use reduction='none'."
            )
        return value
    single = out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)
    if loss == "auto":
        if y.is_floating_point():
            loss = "mse"
        else:
            loss = "margin" if single else "ce"
    if loss == "mse":
        target = y.to(out.dtype)
        if target.shape != out.shape:
            if not y.is_floating_point() and out.ndim == 2:
                target = F.one_hot(y, out.shape[1]).to(out.dtype)
            else:
                target = target.reshape(out.shape)
        return (out - target).pow(2).reshape(out.shape[0], -1).sum(1)
    if loss == "margin":
        if single:
            return -_signed_binary(y).to(out.dtype) * out.reshape(-1)
        true = out.gather(1, y.view(-1, 1)).squeeze(1)
        others = out.masked_fill(F.one_hot(y, out.shape[1]).bool(), float("-inf"))
        return others.max(1).values - true
    if loss == "ce":
        if single:
            return F.softplus(-_signed_binary(y).to(out.dtype) * out.reshape(-1))
        return F.cross_entropy(out, y, reduction="none")
    raise ConfigError(f"unknown attack loss '{loss}'; use 'auto', 'ce', 'margin', 'mse' or a callable.")


def correct_count(out: Tensor, y: Tensor) -> Tensor:
    """Number of correct predictions: argmax for several outputs, sign for one output (labels {0,1} or
    {-1,1}); float targets ``(N, C)`` (e.g. centred one-hot) are compared by argmax.

    Args:
        out: the outputs.
        y: the labels or targets.

    Returns:
        The count, a 0-dim tensor.
    """
    out = out.detach()
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        pred = out.reshape(-1) > 0
        return (pred == (_signed_binary(y).to(out.device) > 0)).sum()
    labels = y.argmax(1) if (y.is_floating_point() and y.ndim == 2) else y
    return correct(out, labels).sum()


def accuracy(out: Tensor, y: Tensor) -> float:
    """Fraction correct (see :func:`correct_count`); nan for no samples.

    Args:
        out: the outputs.
        y: the labels or targets.

    Returns:
        The fraction.
    """
    return correct_count(out, y).item() / out.shape[0] if out.shape[0] else math.nan


def _check_attack_args(x: Tensor, y: Tensor, eps: float, norm: str, clamp: tuple[float, float] | None) -> None:
    if not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"eps must be a finite number >= 0 (the radius of the {norm} ball), got {eps}.")
    if norm not in ("linf", "l2"):
        raise ConfigError(f"norm must be 'linf' or 'l2', got '{norm}'.")
    if x.shape[0] != y.shape[0]:
        raise ShapeError(f"x has {x.shape[0]} examples but y has {y.shape[0]}; pass one label per input.")
    if clamp is not None:
        lo, hi = clamp
        if lo > hi:
            raise ConfigError(f"clamp=(lo, hi) needs lo <= hi, got {clamp}.")
        if x.numel() and (x.min().item() < lo or x.max().item() > hi):
            raise ConfigError(
                f"inputs lie in [{x.min().item():.4g}, {x.max().item():.4g}], outside "
                f"clamp={clamp}; clamp the data first or pass a wider range (or None)."
            )


def _per_example_norm(t: Tensor) -> Tensor:
    """L2 norm of each example, shaped to broadcast against ``t``."""
    return t.reshape(t.shape[0], -1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _per_example_norm(delta).clamp_min(1e-30)).clamp(max=1.0)
    return delta * scale


def _step(grad: Tensor, step_size: float, norm: str) -> Tensor:
    if norm == "linf":
        return step_size * grad.sign()
    # A zero gradient gives a zero step rather than NaN.
    return step_size * grad / _per_example_norm(grad).clamp_min(1e-30)


def _apply(x: Tensor, delta: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    # Clamping moves every coordinate towards x (which lies in the range), so it never leaves the ball.
    out = x + delta
    return out.clamp(clamp[0], clamp[1]) if clamp is not None else out


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    # Sampled on the generator's device (CPU by default) so a seed gives the same start on any device.
    gdev = generator.device
    if norm == "linf":
        d = (2 * torch.rand(x.shape, generator=generator, device=gdev, dtype=x.dtype) - 1) * eps
    else:
        # Uniform in the L2 ball: Gaussian direction, radius eps * U^(1/d).
        g = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype)
        dim = g[0].numel()
        u = torch.rand((x.shape[0],), generator=generator, device=gdev, dtype=x.dtype)
        r = (eps * u.pow(1.0 / dim)).view(-1, *([1] * (x.ndim - 1)))
        d = g / _per_example_norm(g).clamp_min(1e-30) * r
    return d.to(x.device)


def _input_grad(predict: Predictor, x_adv: Tensor, y: Tensor, loss: LossSpec) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        values = attack_loss(predict(x_adv), y, loss)
        # Summing keeps per-example gradients separate (examples do not interact in eval mode).
        total = values.sum()
        if not torch.isfinite(total):
            raise DivergenceError(
                "the attack loss is not finite; check the predictor's outputs "
                "(a kernel solve with too small a ridge, or NaN weights)."
            )
        (grad,) = torch.autograd.grad(total, x_adv)
    return grad, values.detach()


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    if batch_size is None or batch_size >= n:
        return [slice(0, n)]
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 or None, got {batch_size}.")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def fgsm(
    predict: Predictor,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: str = "linf",
    clamp: tuple[float, float] | None = None,
    loss: LossSpec = "auto",
    batch_size: int | None = None,
) -> Tensor:
    """Fast gradient (sign) method: one step of length eps along the loss gradient.

    x_adv = clip(x + eps * sign(grad_x L))  (linf) or x + eps * g / ||g||_2 (l2); arXiv 1412.6572.

    Args:
        predict: the model or any callable x -> outputs.
        x: the clean inputs.
        y: the labels (or float targets).
        eps: the radius of the ball.
        norm: "linf" or "l2".
        clamp: the valid input range (lo, hi), or None.
        loss: the loss ascended (:func:`attack_loss`).
        batch_size: samples attacked per pass (None: all at once).

    Returns:
        x_adv.
    """
    _check_attack_args(x, y, eps, norm, clamp)
    if isinstance(predict, nn.Module):
        check_same_device(predict, x)
    out = torch.empty_like(x)
    for sl in _chunks(x.shape[0], batch_size):
        xb = x[sl].detach()
        grad, _ = _input_grad(predict, xb, y[sl], loss)
        delta = _project(_step(grad, eps, norm), eps, norm)
        out[sl] = _apply(xb, delta, clamp).detach()
    return out


def pgd(
    predict: Predictor,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float | None = None,
    steps: int = 10,
    *,
    norm: str = "linf",
    clamp: tuple[float, float] | None = None,
    random_start: bool = True,
    loss: LossSpec = "auto",
    batch_size: int | None = None,
    generator: Seed = None,
) -> Tensor:
    """Projected gradient ascent on the loss inside the eps-ball (Madry et al., arXiv 1706.06083).

    x_{k+1} = Proj_{B_eps(x)} clip(x_k + alpha * step(grad_x L(f(x_k), y))), step = sign (linf) or
    g / ||g||_2 (l2).

    Args:
        predict: the model or any callable x -> outputs.
        x: the clean inputs.
        y: the labels (or float targets).
        eps: the radius of the ball.
        step_size: alpha (default 2.5 eps / steps).
        steps: the number of steps.
        norm: "linf" or "l2".
        clamp: the valid input range (lo, hi), or None.
        random_start: start uniformly in the ball (else at x).
        loss: the loss ascended (:func:`attack_loss`).
        batch_size: samples attacked per pass (None: all at once).
        generator: a seed or a ``torch.Generator`` for the random start (None = seed 0).

    Returns:
        The last iterate.
    """
    _check_attack_args(x, y, eps, norm, clamp)
    if isinstance(predict, nn.Module):
        check_same_device(predict, x)
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}.")
    if step_size is None:
        step_size = 2.5 * eps / steps
    if not math.isfinite(step_size) or step_size < 0:
        raise ConfigError(f"step_size must be a finite number >= 0, got {step_size}.")
    generator = as_generator(generator)
    out = torch.empty_like(x)
    for sl in _chunks(x.shape[0], batch_size):
        xb, yb = x[sl].detach(), y[sl]
        delta = _random_start(xb, eps, norm, generator) if random_start and eps > 0 else torch.zeros_like(xb)
        x_adv = _apply(xb, delta, clamp)
        for _ in range(steps):
            grad, _ = _input_grad(predict, x_adv, yb, loss)
            delta = _project(x_adv - xb + _step(grad, step_size, norm), eps, norm)
            x_adv = _apply(xb, delta, clamp).detach()
        out[sl] = x_adv
    return out

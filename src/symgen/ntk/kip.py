"""Kernel inducing points (KIP): distil a dataset into a few learned support examples.

A support set (X_s, y_s) is optimized so that kernel ridge regression from it predicts the real
training data: loss = 0.5 mean((K_ts (K_ss + ridge tr(K_ss)/n I)^-1 y_s - y_t)^2) on freshly
sampled class-balanced target batches, minimized by Adam over X_s (and y_s when learning labels).
Source: Nguyen, Chen, Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", arXiv 2011.00050.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from symgen.data import class_balanced_indices
from symgen.errors import CheckpointError, ConfigError, DivergenceError, MissingDataError, ShapeError
from symgen.io import atomic_write
from symgen.labels import accuracy, centred_one_hot
from symgen.ntk.regression import Kernel, kernel_regression
from symgen.rng import Seed, as_generator

__all__ = ["kip", "kip_loss", "centred_one_hot", "class_balanced_indices", "save_support", "load_support"]


def kip_loss(
    kernel: Kernel, x_support: Tensor, y_support: Tensor, x_target: Tensor, y_target: Tensor, ridge: float
) -> tuple[Tensor, Tensor]:
    """``(loss, prediction)`` with loss = 0.5 mean((K_ts (K_ss + ridge tr(K_ss)/n I)^-1 y_s - y_t)^2).

    Differentiable in the support set; the solve is ``symgen.ntk.kernel_regression`` (arXiv 2011.00050).

    Args:
        kernel: ``kernel(a, b) -> K``, differentiable in its inputs.
        x_support: X_s (n, ...).
        y_support: y_s (n, C).
        x_target: X_t (m, ...).
        y_target: y_t (m, C).
        ridge: the ridge, relative to tr(K_ss)/n.

    Returns:
        ``(loss, prediction)``, the prediction (m, C).
    """
    m, n = x_target.shape[0], x_support.shape[0]
    # One kernel call for both blocks: [K_ts; K_ss] = K([X_t; X_s], X_s).
    k_all = kernel(torch.cat([x_target, x_support]), x_support)
    if k_all.shape != (m + n, n):
        raise ShapeError(f"kernel(a, b) must return a ({m + n}, {n}) matrix here, got {tuple(k_all.shape)}.")
    k_ts, k_ss = k_all[:m], k_all[m:]
    # Dividing both kernels by s = tr(K_ss)/n turns the trace-relative ridge into a plain ridge:
    # K_ts (K_ss + r s I)^-1 = (K_ts / s)(K_ss / s + r I)^-1, and gradients still flow through s.
    scale = torch.diagonal(k_ss).sum() / n
    if not torch.isfinite(scale) or scale.item() <= 0:
        raise DivergenceError(
            f"tr(K_ss)/n = {scale.item()} is not a positive finite number; the kernel "
            "must be positive semi-definite and finite on the support set."
        )
    pred = kernel_regression(k_ss / scale, y_support, k_ts / scale, ridge)
    loss = 0.5 * (pred - y_target).pow(2).mean()
    if not torch.isfinite(loss):
        raise DivergenceError(
            f"the KIP loss is not finite (ridge={ridge}); the support kernel solve is "
            "singular or the kernel returned NaN. Increase ridge or use float64."
        )
    return loss, pred


def kip(
    x_target: Tensor,
    y_target: Tensor,
    kernel: Kernel,
    support_per_class: int = 1,
    steps: int = 1000,
    lr: float = 0.01,
    learn_labels: bool = False,
    ridge: float = 1e-6,
    generator: Seed = None,
    *,
    target_per_class: int = 10,
    num_classes: int | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[Tensor, Tensor, dict[str, list[float]]]:
    """Learn a support set of ``support_per_class`` examples per class by kernel inducing points.

    Init: a class-balanced sample of real examples with centred one-hot labels e_y - 1/C. Each step
    draws ``target_per_class`` fresh examples of every class and takes an Adam step on
    loss = 0.5 mean((K_ts (K_ss + ridge tr(K_ss)/n I)^-1 y_s - y_t)^2) over X_s (and y_s if
    ``learn_labels``). arXiv 2011.00050.

    Args:
        x_target: the real inputs.
        y_target: their integer labels.
        kernel: ``kernel(a, b) -> K`` (a: (n_a, ...), b: (n_b, ...)), differentiable in its inputs, e.g.
            ``lambda a, b: analytic_ntk(a.flatten(1), b.flatten(1), depth=3)[1]`` or a finite network's
            ``symgen.ntk.empirical_ntk_fn(model, differentiable=True)``.
        support_per_class: support examples per class.
        steps: Adam steps.
        lr: Adam's learning rate.
        learn_labels: learn y_s too.
        ridge: the relative ridge.
        generator: a seed or a ``torch.Generator`` (None = seed 0) for the initial subset and the target batches.
        target_per_class: target examples per class per step.
        num_classes: C (default: max label + 1).
        callback: ``callback(step, loss)`` after each step.

    Returns:
        ``(x_support, y_support, history)``, history holding per step ``loss`` and ``batch_accuracy``
        (argmax accuracy on the target batch).
    """
    if y_target.ndim != 1 or y_target.is_floating_point():
        raise ShapeError(
            f"y_target must be integer class labels of shape (N,), got dtype {y_target.dtype} "
            f"shape {tuple(y_target.shape)}."
        )
    if x_target.shape[0] != y_target.shape[0]:
        raise ShapeError(f"x_target has {x_target.shape[0]} examples, y_target {y_target.shape[0]}.")
    if not x_target.is_floating_point():
        raise ShapeError(f"x_target must be a floating tensor, got {x_target.dtype}.")
    if support_per_class < 1:
        raise ConfigError(f"support_per_class must be >= 1, got {support_per_class}.")
    if target_per_class < 1:
        raise ConfigError(f"target_per_class must be >= 1, got {target_per_class}.")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}.")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr}.")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ConfigError(f"ridge must be a finite number >= 0, got {ridge}.")
    if y_target.numel() and y_target.min().item() < 0:
        raise ShapeError("class labels must be 0..C-1; got a negative label.")
    num_classes = num_classes if num_classes is not None else int(y_target.max().item()) + 1
    if int(y_target.max().item()) >= num_classes:
        raise ShapeError(f"labels go up to {int(y_target.max().item())} but num_classes={num_classes}.")

    generator = as_generator(generator)
    dtype, device = x_target.dtype, x_target.device
    init = class_balanced_indices(y_target, support_per_class, num_classes, generator).to(device)
    x_s = x_target[init].detach().clone().requires_grad_(True)
    y_s = centred_one_hot(y_target[init], num_classes, dtype).to(device).requires_grad_(learn_labels)
    opt = torch.optim.Adam([x_s, y_s] if learn_labels else [x_s], lr=lr)

    # Per class member lists once; a batch is then C small randperms.
    members = [torch.nonzero(y_target.cpu() == c).flatten() for c in range(num_classes)]
    short = [(c, len(m)) for c, m in enumerate(members) if len(m) < target_per_class]
    if short and steps > 0:
        raise ConfigError(
            f"classes {short} (class, count) have fewer than target_per_class="
            f"{target_per_class} examples; lower target_per_class."
        )

    history: dict[str, list[float]] = {"step": [], "loss": [], "batch_accuracy": []}
    for step in range(steps):
        batch = torch.cat([m[torch.randperm(len(m), generator=generator)[:target_per_class]] for m in members]).to(
            device
        )
        x_t = x_target[batch]
        y_t = centred_one_hot(y_target[batch], num_classes, dtype).to(device)
        loss, pred = kip_loss(kernel, x_s, y_s, x_t, y_t, ridge)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if x_s.grad is None or not torch.isfinite(x_s.grad).all():
            raise DivergenceError(f"KIP gradient became non-finite at step {step}; lower lr or raise ridge.")
        opt.step()
        value = loss.item()
        history["step"].append(step)
        history["loss"].append(value)
        history["batch_accuracy"].append(accuracy(pred.detach(), y_target[batch]))
        if callback is not None:
            callback(step, value)
    return x_s.detach(), y_s.detach(), history


def save_support(path: str | Path, x_support: Tensor, y_support: Tensor, **meta: Any) -> Path:
    """Save a distilled set (and JSON-able metadata) atomically with ``torch.save``.

    Args:
        path: the file.
        x_support: the support inputs.
        y_support: the support labels.
        **meta: metadata stored with them.

    Returns:
        ``path``.
    """
    payload = {
        "format": "symgen-kip-support-v1",
        "x_support": x_support.detach().cpu(),
        "y_support": y_support.detach().cpu(),
        "meta": dict(meta),
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_support(path: str | Path, device: torch.device | str | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Load ``(x_support, y_support, meta)`` written by :func:`save_support`.

    Args:
        path: the file.
        device: where the tensors go.

    Returns:
        ``(x_support, y_support, meta)``.

    Raises:
        CheckpointError: not a readable distilled-set file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"no distilled set at {path}; write one with save_support() first.")
    try:
        payload = torch.load(path, map_location=device or "cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: torch raises many types
        raise CheckpointError(f"{path} is not a readable distilled-set file ({type(e).__name__}: {e}).") from None
    if not isinstance(payload, dict) or payload.get("format") != "symgen-kip-support-v1":
        raise CheckpointError(
            f"{path} is not a symgen KIP support file (missing format tag); it must be written by save_support()."
        )
    x, y = payload["x_support"], payload["y_support"]
    if x.shape[0] != y.shape[0]:
        raise CheckpointError(f"{path}: {x.shape[0]} support inputs but {y.shape[0]} labels.")
    return x, y, payload.get("meta", {})

"""Helpers shared by the audit's sections: seeded subsamples, batched logits, batch-means splits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from symgen.errors import DivergenceError, ShapeError

__all__ = ["subsample", "curvature_subsample", "logits", "check_logits", "batch_means"]


def subsample(n: int, k: int | None, gen: torch.Generator) -> Tensor:
    """``min(k, n)`` distinct indices, drawn with ``gen`` (all of them, in order, when k >= n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:k].sort().values


def curvature_subsample(n: int, k: int, seed: int) -> Tensor:
    """The training subsample of the Hessian and noise sections: a prefix of one seeded permutation,
    so both use the same samples when their sizes agree."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 10))[:k]


def logits(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """``model(x)`` without gradients, in batches of ``batch_size``."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def check_logits(out: Tensor, x: Tensor, y: Tensor) -> None:
    """Logits (N, K) with a logit per label and finite values, or a :class:`ShapeError` / :class:`DivergenceError`."""
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise ShapeError(
            f"the model must map inputs (N, ...) to logits (N, K); for inputs {tuple(x.shape)} it "
            f"returned {tuple(out.shape)}."
        )
    if int(y.max()) >= out.shape[1]:
        raise ShapeError(
            f"labels go up to {int(y.max())} but the model has {out.shape[1]} outputs; audit a "
            "classifier with one logit per class."
        )
    if not torch.isfinite(out).all():
        raise DivergenceError("the model's outputs contain NaN or inf; check the checkpoint and the input scale.")


def batch_means(n: int, groups: int) -> list[Tensor]:
    """Split ``range(n)`` into up to ``groups`` contiguous, nearly equal batches (batch-means standard errors)."""
    groups = max(1, min(groups, n))
    return [t for t in torch.arange(n).tensor_split(groups) if t.numel()]

"""Helpers shared by the audit's sections: the random streams, seeded subsamples, batched logits,
batch-means splits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from symgen import rng
from symgen.errors import DivergenceError, ShapeError

__all__ = [
    "STREAMS",
    "stream_seed",
    "stream",
    "subsample",
    "curvature_subsample",
    "logits",
    "check_logits",
    "batch_means",
]

#: The audit's random streams, one key each: every use draws from ``rng.derive(seed, key)`` of the run's
#: seed, so no two uses share draws and a section's numbers do not depend on which other sections ran.
STREAMS: dict[str, int] = {
    "performance": 0,  # training and test subsamples
    "invariance": 1,  # test subsample
    "scale_symmetries": 2,  # training subsample
    "scale_symmetries_check": 3,  # random rescalings (and dropout masks) that confirm a symmetry
    "curvature_subsample": 4,  # the training subsample the Hessian and noise sections share
    "hessian_lanczos": 5,  # the Lanczos start of the eigenvalues, trace deflation and first SLQ run
    "hessian_trace": 6,  # Hutchinson probes
    "hessian_density": 7,  # the further SLQ runs
    "ggn_lanczos": 8,  # the GGN's Lanczos start
    "noise_stability": 9,  # noise draws, one sub-stream per sigma
    "ntk": 10,  # test subsamples
    "robustness": 11,  # test subsample
    "robustness_attack": 12,  # PGD random starts
    "ggn_trace": 13,  # the GGN's Hutchinson probes
    "performance_order": 14,  # the order batches are measured in (a uniform subsample if the clock stops it)
}


def stream_seed(seed: int, name: str, *index: int) -> int:
    """The seed of stream ``name`` of the run seed ``seed``: ``rng.derive(seed, STREAMS[name])``.

    Args:
        seed: the audit's integer seed.
        name: a key of :data:`STREAMS`.
        *index: sub-streams of the stream (e.g. one per noise level), each ``rng.derive(parent, i)``.

    Returns:
        The stream's integer seed.
    """
    out = rng.derive(seed, STREAMS[name])
    for i in index:
        out = rng.derive(out, i)
    return out


def stream(seed: int, name: str, *index: int) -> torch.Generator:
    """A CPU generator seeded with :func:`stream_seed`.

    Args:
        seed: the audit's integer seed.
        name: a key of :data:`STREAMS`.
        *index: sub-stream indices.

    Returns:
        A fresh ``torch.Generator``.
    """
    return torch.Generator().manual_seed(stream_seed(seed, name, *index))


def subsample(n: int, k: int | None, gen: torch.Generator) -> Tensor:
    """``min(k, n)`` distinct indices, drawn with ``gen`` (all of them, in order, when k >= n).

    Args:
        n: the number of data points.
        k: how many to keep (None: all).
        gen: the generator of the draw.

    Returns:
        The sorted indices.
    """
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:k].sort().values


def curvature_subsample(n: int, k: int, seed: int) -> Tensor:
    """The training subsample of the Hessian and noise sections: a prefix of one seeded permutation
    (stream ``curvature_subsample``), so both use the same data points when their sizes agree.

    Args:
        n: the number of training data points.
        k: how many to keep.
        seed: the audit's integer seed.

    Returns:
        The indices, in the permutation's order.
    """
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=stream(seed, "curvature_subsample"))[:k]


def logits(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """``model(x)`` without gradients, in batches of ``batch_size``.

    Args:
        model: the classifier.
        x: the inputs.
        batch_size: the largest batch.

    Returns:
        The logits.
    """
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def check_logits(out: Tensor, x: Tensor, y: Tensor) -> None:
    """Logits (N, K) with a logit per label and finite values, or a :class:`ShapeError` / :class:`DivergenceError`.

    Args:
        out: the model's outputs.
        x: the inputs they came from.
        y: the labels.
    """
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
    """Split ``range(n)`` into up to ``groups`` contiguous, nearly equal batches (batch-means standard errors).

    Args:
        n: the number of items.
        groups: the number of batches wanted.

    Returns:
        The batches' index tensors (none empty).
    """
    groups = max(1, min(groups, n))
    return [t for t in torch.arange(n).tensor_split(groups) if t.numel()]

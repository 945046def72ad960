"""Summary statistics with their uncertainty: one mean-and-standard-error for the whole package."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["mean_stderr", "binomial_stderr"]


def mean_stderr(values: Tensor | Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error s / sqrt(n) (unbiased s; inf for one value, nan for none).

    Args:
        values: the n samples (any shape; flattened).

    Returns:
        ``(mean, stderr)`` as floats.
    """
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = v.numel()
    if n == 0:
        return math.nan, math.nan
    mean = float(v.mean())
    return mean, (float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf)


def binomial_stderr(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of a proportion p measured on n trials.

    Args:
        p: the measured proportion.
        n: the number of trials (nan when ``n <= 0``).

    Returns:
        The standard error.
    """
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else math.nan

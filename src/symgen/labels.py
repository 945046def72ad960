"""Class labels: centred one-hot regression targets and classification accuracy, one definition each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from symgen.errors import ShapeError

__all__ = ["centred_one_hot", "accuracy", "correct"]


def centred_one_hot(y: Tensor, num_classes: int, dtype: torch.dtype | None = None) -> Tensor:
    """Kernel-regression targets e_y - 1/C (each row sums to zero), as in Jacot et al. (arXiv 1806.07572).

    Args:
        y: integer labels, shape (n,), values in [0, num_classes).
        num_classes: C.
        dtype: floating dtype of the result (default: torch's default dtype).

    Returns:
        (n, C) tensor.
    """
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ShapeError(f"centred_one_hot: labels must be an integer tensor, got dtype {y.dtype}; pass y.long().")
    return F.one_hot(y, num_classes).to(dtype or torch.get_default_dtype()) - 1.0 / num_classes


def correct(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row correctness argmax(logits) == label; a row with a non-finite logit counts as wrong.

    Args:
        logits: (..., n, C) scores.
        labels: (n,) integer labels.

    Returns:
        bool tensor of shape (..., n).
    """
    return (logits.argmax(-1) == labels.to(logits.device)) & torch.isfinite(logits).all(-1)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows with argmax(logits) == label (non-finite rows count as wrong).

    Args:
        logits: (n, C) scores.
        labels: (n,) integer labels.

    Returns:
        accuracy in [0, 1] as a Python float (nan for n = 0).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ShapeError(
            f"accuracy: expected logits (n, C) and labels (n,), got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    if labels.numel() == 0:
        return float("nan")
    return float(correct(logits, labels).double().mean())

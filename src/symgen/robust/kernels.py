"""Kernel-regression predictors and NTK eigen-feature robustness (Tsilivis & Kempe 2022, arXiv 2210.05577).

The kernel predictor f(x) = K(x, X)(K(X, X) + ridge I)^-1 Y is differentiable in the test input, so
the attacks of :mod:`symgen.robust.attacks` apply to it. Feature robustness splits it into one
feature per eigenpair of the train Gram matrix and scores each feature for usefulness (accuracy on
clean inputs) and robustness (accuracy under attack).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from symgen.errors import DivergenceError, ShapeError
from symgen.labels import centred_one_hot
from symgen.ntk.regression import kernel_eigh, kernel_regression
from symgen.robust.attacks import accuracy

__all__ = [
    "KernelPredictor",
    "kernel_predictor",
    "regression_targets",
    "eigen_features",
    "FeatureRobustness",
    "ntk_feature_robustness",
]


class KernelPredictor:
    """f(x) = K(x, X) alpha with alpha = (K(X, X) + ridge I)^-1 Y fixed, differentiable in x.

    ``alpha`` is solved once by ``symgen.ntk.kernel_regression`` (:func:`kernel_predictor`).

    Args:
        kernel: any callable ``(a, b) -> K`` that is differentiable in ``a`` (``analytic_ntk`` kernels are;
            for a finite network ``symgen.ntk.empirical_ntk_fn(model, differentiable=True)``).
        x_train: X.
        alpha: the weights (n[, C]).
    """

    def __init__(self, kernel: Callable[[Tensor, Tensor], Tensor], x_train: Tensor, alpha: Tensor):
        self.kernel = kernel
        self.x_train = x_train
        self.alpha = alpha

    def __call__(self, x: Tensor) -> Tensor:
        """f(x) = K(x, X) alpha.

        Args:
            x: test inputs, shaped like ``x_train`` apart from the batch dim.

        Returns:
            the predictions, ``(m,)`` or ``(m, C)``.
        """
        return self.kernel(x, self.x_train) @ self.alpha


def kernel_predictor(
    kernel: Callable[[Tensor, Tensor], Tensor], x_train: Tensor, y_train: Tensor, ridge: float = 0.0
) -> KernelPredictor:
    """The kernel ridge regression predictor x -> K(x, X)(K(X, X) + ridge I)^-1 Y as a callable.

    Source: Kempe et al., arXiv 2307.02693.

    Args:
        kernel: a callable ``(a, b) -> K``, differentiable in ``a``.
        x_train: X.
        y_train: integer labels (centred one-hot targets e_y - 1/C for C > 2 classes, +-1 for 2) or
            float targets (used as they are).
        ridge: the ridge.

    Returns:
        The :class:`KernelPredictor`.
    """
    targets = regression_targets(y_train)
    with torch.no_grad():
        k_train = kernel(x_train, x_train)
        if not torch.isfinite(k_train).all():
            raise DivergenceError(
                "the kernel returned non-finite values on the training inputs; "
                "check the kernel's parameters and the data."
            )
        eye = torch.eye(k_train.shape[0], dtype=k_train.dtype, device=k_train.device)
        # The weights alpha are kernel_regression's prediction for "test points" whose kernel row is
        # e_i, so the (single) solve stays in symgen.ntk.
        alpha = kernel_regression(k_train, targets.to(k_train.dtype), eye, ridge)
    if not torch.isfinite(alpha).all():
        raise DivergenceError(
            f"the kernel solve gave non-finite weights (ridge={ridge}); increase the ridge or use float64."
        )
    return KernelPredictor(kernel, x_train, alpha)


def regression_targets(y: Tensor, num_classes: int | None = None) -> Tensor:
    """Integer labels -> regression targets: +-1 for two classes, centred one-hot e_y - 1/C otherwise.

    Args:
        y: integer labels.
        num_classes: C (default: max label + 1).

    Returns:
        The targets.
    """
    if y.is_floating_point():
        return y
    classes = num_classes if num_classes is not None else int(y.max().item()) + 1
    if classes <= 2:
        return torch.where(y > 0, 1.0, -1.0).to(torch.get_default_dtype())
    return centred_one_hot(y, classes)


def eigen_features(
    k_train: Tensor, k_test_train: Tensor, y_train: Tensor, ridge: float = 0.0, num_features: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split kernel regression into one feature per eigenpair of the train Gram matrix.

    With K = sum_i lambda_i v_i v_i^T: f_i(x) = K(x, X) v_i v_i^T Y / (lambda_i + ridge), and
    sum_i f_i(x) = K(x, X)(K + ridge I)^-1 Y (Tsilivis & Kempe 2022, arXiv 2210.05577).

    Args:
        k_train: K(X, X), (n, n).
        k_test_train: K(x, X), (m, n).
        y_train: Y, (n[, C]).
        ridge: the ridge.
        num_features: keep the first this many (default all).

    Returns:
        ``(eigenvalues (k,), features (m, k[, C]), directions (n, k), coefficients (k[, C]))`` in
        decreasing eigenvalue order.
    """
    n = k_train.shape[0]
    if k_train.ndim != 2 or k_train.shape[1] != n:
        raise ShapeError(f"k_train must be square (n, n), got {tuple(k_train.shape)}.")
    if k_test_train.ndim != 2 or k_test_train.shape[1] != n:
        raise ShapeError(f"k_test_train must be (m, {n}), got {tuple(k_test_train.shape)}.")
    if y_train.shape[0] != n:
        raise ShapeError(f"y_train has {y_train.shape[0]} rows, the Gram matrix {n}.")
    k = n if num_features is None else min(num_features, n)
    if not (torch.isfinite(k_train).all() and torch.isfinite(k_test_train).all()):
        raise DivergenceError(
            "the kernel matrices hold non-finite values; the eigen-feature solve is "
            "undefined. Check the kernel and the data."
        )
    evals, evecs = kernel_eigh(k_train)
    evals, evecs = evals[:k], evecs[:, :k]
    denom = evals + ridge
    if not torch.isfinite(denom).all() or (denom.abs() < 1e-300).any():
        raise DivergenceError("an eigenvalue plus ridge is zero; the kernel solve is singular. Pass ridge > 0.")
    y = y_train.to(k_train.dtype)
    single = y.ndim == 1
    y2 = y.view(n, -1)
    coeff = (evecs.mT @ y2) / denom[:, None]  # (k, C)
    proj = k_test_train @ evecs  # (m, k)
    feats = proj[:, :, None] * coeff[None]  # (m, k, C)
    if not torch.isfinite(feats).all():
        raise DivergenceError("eigen-features are not finite; increase the ridge or use float64.")
    if single:
        return evals, feats[..., 0], evecs, coeff[:, 0]
    return evals, feats, evecs, coeff


@dataclass
class FeatureRobustness:
    """Per eigen-feature scores (index 0 = largest eigenvalue) and the full predictor's accuracy."""

    eigenvalues: list[float]
    usefulness: list[float]
    robustness: list[float]
    correlation: list[float]
    robust_correlation: list[float]
    predictor_accuracy: float
    predictor_robust_accuracy: float
    extra: dict[str, Any] = field(default_factory=dict)


def _correlation(f: Tensor, y: Tensor) -> float:
    """E[<y, f(x)>] / sqrt(E ||f(x)||^2 E ||y||^2), the scale-free usefulness of Ilyas et al."""
    f2, y2 = f.reshape(f.shape[0], -1), y.to(f.dtype).reshape(y.shape[0], -1)
    num = (f2 * y2).sum(1).mean()
    den = (f2.pow(2).sum(1).mean() * y2.pow(2).sum(1).mean()).sqrt().clamp_min(1e-300)
    return (num / den).item()


def ntk_feature_robustness(
    kernel: Callable[[Tensor, Tensor], Tensor],
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    attack: Callable[..., Tensor],
    *,
    ridge: float = 0.0,
    num_features: int = 20,
) -> FeatureRobustness:
    """Usefulness and robustness of each NTK eigen-feature (Tsilivis & Kempe 2022, arXiv 2210.05577).

    Feature i: f_i(x) = K(x, X) v_i v_i^T Y / (lambda_i + ridge) (the features sum to the kernel
    predictor). usefulness_i = accuracy of sign f_i (one output, two classes) or argmax f_i on
    clean test data; robustness_i = the same under attack. ``correlation`` = E<y, f_i> /
    sqrt(E||f_i||^2 E||y||^2), likewise under attack.

    Args:
        kernel: a callable ``(a, b) -> K``, differentiable in ``a``.
        x_train: the training inputs.
        y_train: integer labels (+-1 for two classes, else centred one-hot targets).
        x_test: the test inputs.
        y_test: their labels.
        attack: ``attack(f_i, x_test, y_test) -> x_adv``, an attack on that feature alone.
        ridge: the ridge.
        num_features: the number of leading features scored.

    Returns:
        The :class:`FeatureRobustness`.
    """
    if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise ShapeError(
            f"x_train/y_train ({x_train.shape[0]}/{y_train.shape[0]}) or x_test/y_test "
            f"({x_test.shape[0]}/{y_test.shape[0]}) differ in length."
        )
    num_classes = int(torch.cat([y_train, y_test]).max().item()) + 1 if not y_train.is_floating_point() else None
    targets = regression_targets(y_train, num_classes)
    test_targets = regression_targets(y_test, num_classes)
    with torch.no_grad():
        k_train = kernel(x_train, x_train)
        k_test = kernel(x_test, x_train)
    targets = targets.to(k_train.dtype)
    evals, feats, evecs, coeff = eigen_features(k_train, k_test, targets, ridge, num_features)
    predictor = kernel_predictor(kernel, x_train, targets, ridge)
    clean_pred = predictor(x_test).detach()
    adv = attack(predictor, x_test, y_test)
    robust_pred = predictor(adv).detach()

    usefulness, robustness, corr, robust_corr = [], [], [], []
    for i in range(evals.shape[0]):
        v_i, c_i = evecs[:, i], coeff[i]

        def feature(x: Tensor, v_i: Tensor = v_i, c_i: Tensor = c_i) -> Tensor:
            proj = kernel(x, x_train) @ v_i
            return proj * c_i if c_i.ndim == 0 else proj[:, None] * c_i[None]

        f_clean = feats[:, i]
        x_adv = attack(feature, x_test, y_test)
        f_adv = feature(x_adv).detach()
        usefulness.append(accuracy(f_clean, y_test))
        robustness.append(accuracy(f_adv, y_test))
        corr.append(_correlation(f_clean, test_targets))
        robust_corr.append(_correlation(f_adv, test_targets))
    return FeatureRobustness(
        eigenvalues=evals.tolist(),
        usefulness=usefulness,
        robustness=robustness,
        correlation=corr,
        robust_correlation=robust_corr,
        predictor_accuracy=accuracy(clean_pred, y_test),
        predictor_robust_accuracy=accuracy(robust_pred, y_test),
        extra={"num_train": int(x_train.shape[0]), "ridge": ridge},
    )

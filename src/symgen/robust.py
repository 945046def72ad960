"""Adversarial robustness: FGSM / PGD attacks, PGD adversarial training, and NTK eigen-feature robustness.

Attacks work on anything differentiable in its input: an ``nn.Module``, a plain callable, or a
kernel-regression predictor (the gradient flows through the kernel with respect to the test
input). Feature robustness follows Tsilivis & Kempe 2022 (arXiv 2210.05577): the kernel
predictor is split into one feature per eigenpair of the train Gram matrix, and each feature is
scored for usefulness (accuracy on clean inputs) and robustness (accuracy under attack).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.functional import bn_mode
from symgen.ntk.regression import kernel_eigh, kernel_regression
from symgen.rng import Seed, as_generator
from symgen.streaming import check_same_device
from symgen.training import LossClosure, fit

__all__ = [
    "fgsm",
    "pgd",
    "attack_loss",
    "accuracy",
    "correct_count",
    "KernelPredictor",
    "kernel_predictor",
    "regression_targets",
    "adversarial_training",
    "eigen_features",
    "FeatureRobustness",
    "ntk_feature_robustness",
]

Predictor = Callable[[Tensor], Tensor]
LossSpec = str | Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# losses and accuracy
# --------------------------------------------------------------------------------------------


def _signed_binary(y: Tensor) -> Tensor:
    """Binary labels {0, 1} or {-1, +1} as floats in {-1, +1}."""
    if y.is_floating_point():
        return torch.sign(y)
    return torch.where(y > 0, 1.0, -1.0).to(torch.get_default_dtype())


def attack_loss(out: Tensor, y: Tensor, loss: LossSpec = "auto") -> Tensor:
    """Per-example loss the attacker ascends, shape ``(N,)``.

    ``"ce"``: cross-entropy of logits ``(N, C)`` against integer labels. ``"margin"``: the
    Carlini-Wagner margin ``max_{j != y} f_j - f_y`` (for one output: ``-y f`` with y in {-1, +1}),
    which ignores the output scale, so it suits kernel predictors. ``"mse"``: squared error to
    float targets. ``"auto"``: ce for integer labels and several outputs, margin for one output,
    mse for float targets. A callable ``(out, y) -> (N,)`` is used as is.
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
    {-1,1}); float targets ``(N, C)`` (e.g. centred one-hot) are compared by argmax."""
    out = out.detach()
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        pred = out.reshape(-1) > 0
        return (pred == (_signed_binary(y).to(out.device) > 0)).sum()
    labels = y.argmax(1) if (y.is_floating_point() and y.ndim == 2) else y
    return (out.argmax(1) == labels.to(out.device)).sum()


def accuracy(out: Tensor, y: Tensor) -> float:
    """Fraction correct (see :func:`correct_count`); nan for no samples."""
    return correct_count(out, y).item() / out.shape[0] if out.shape[0] else math.nan


# --------------------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------------------


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
    g / ||g||_2 (l2); ``step_size`` alpha defaults to 2.5 eps / steps. Random start: uniform in the
    ball, drawn from ``generator`` (a seed or a ``torch.Generator``; None = seed 0). Returns the last iterate.
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


# --------------------------------------------------------------------------------------------
# kernel-regression predictor (differentiable in the test input)
# --------------------------------------------------------------------------------------------


class KernelPredictor:
    """f(x) = K(x, X) alpha with alpha = (K(X, X) + ridge I)^-1 Y fixed, differentiable in x.

    ``kernel`` is any callable ``(a, b) -> K`` that is differentiable in ``a`` (``analytic_ntk``
    kernels are; for a finite network ``symgen.ntk.empirical_ntk_fn(model, differentiable=True)``).
    ``alpha`` is solved once by ``symgen.ntk.kernel_regression``.
    """

    def __init__(self, kernel: Callable[[Tensor, Tensor], Tensor], x_train: Tensor, alpha: Tensor):
        self.kernel = kernel
        self.x_train = x_train
        self.alpha = alpha

    def __call__(self, x: Tensor) -> Tensor:
        return self.kernel(x, self.x_train) @ self.alpha


def kernel_predictor(
    kernel: Callable[[Tensor, Tensor], Tensor], x_train: Tensor, y_train: Tensor, ridge: float = 0.0
) -> KernelPredictor:
    """The kernel ridge regression predictor x -> K(x, X)(K(X, X) + ridge I)^-1 Y as a callable.

    Integer labels become centred one-hot targets (e_y - 1/C) for C > 2 classes and +-1 for 2;
    float targets are used as they are. Source: Kempe et al., arXiv 2307.02693.
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
    """Integer labels -> regression targets: +-1 for two classes, centred one-hot e_y - 1/C otherwise."""
    if y.is_floating_point():
        return y
    classes = num_classes if num_classes is not None else int(y.max().item()) + 1
    if classes <= 2:
        return torch.where(y > 0, 1.0, -1.0).to(torch.get_default_dtype())
    return F.one_hot(y, classes).to(torch.get_default_dtype()) - 1.0 / classes


# --------------------------------------------------------------------------------------------
# adversarial training
# --------------------------------------------------------------------------------------------


def _training_batch(x_adv: Tensor, y: Tensor, x: Tensor, clean_weight: float) -> tuple[Tensor, ...]:
    """The batch one adversarial-training step trains on: ``(x_adv, y)``, plus the clean ``x`` if it is weighted."""
    return (x_adv, y, x) if clean_weight > 0 else (x_adv, y)


def adversarial_training(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    attack: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 10,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    batch_size: int = 128,
    clean_weight: float = 0.0,
    generator: Seed = None,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """PGD adversarial training: min_theta E max_{||d|| <= eps} L(f(x + d), y) (Madry, arXiv 1706.06083).

    :func:`symgen.training.fit` with the attack as its batch transform. ``optimizer``: an instance built
    on ``model.parameters()`` (e.g. ``torch.optim.Adam(model.parameters(), lr=1e-3)``; any optimizer of
    the step protocol, SAM and NSO included). ``data`` is ``(x, y)`` (shuffled into minibatches of
    ``batch_size`` by ``generator``: a seed or a ``torch.Generator``, None = seed 0) or a re-iterable of
    ``(x, y)`` batches (a DataLoader). ``attack(model, x, y) -> x_adv``, e.g.
    ``functools.partial(pgd, eps=0.1, steps=7)``; an attack accepting ``generator`` gets the same
    generator (the shuffling and the attacks' random starts are one stream). Attacks run in eval mode
    (BatchNorm statistics untouched); updates in train mode. The loss is
    ``(1 - clean_weight) L(x_adv) + clean_weight L(x)``. Returns the history ``{"epoch", "loss",
    "adv_accuracy"}`` (per epoch, on the adversarial training batches at the weights before each step).
    """
    if not 0.0 <= clean_weight <= 1.0:
        raise ConfigError(f"clean_weight must lie in [0, 1], got {clean_weight}.")
    g = as_generator(generator)
    try:
        takes_generator = "generator" in inspect.signature(attack).parameters
    except (TypeError, ValueError):
        takes_generator = False
    kwargs: dict[str, Any] = {"generator": g} if takes_generator else {}

    def adversarial(model: nn.Module, xb: Tensor, yb: Tensor) -> tuple[Tensor, ...]:
        with bn_mode(model, "eval"):
            x_adv = attack(model, xb, yb, **kwargs).detach()
        return _training_batch(x_adv, yb, xb, clean_weight)

    class CleanMixClosure(LossClosure):
        """loss = (1 - clean_weight) L(f(x_adv), y) + clean_weight L(f(x), y)."""

        vectorizable = False

        def __init__(
            self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x_adv: Tensor, y: Tensor, x: Tensor
        ) -> None:
            super().__init__(model, loss_fn, x_adv, y)
            self.x_clean = x

        def compute(self) -> tuple[Tensor, Tensor]:
            out = self.model(self.x)
            loss = self.loss_fn(out, self.y)
            return (1 - clean_weight) * loss + clean_weight * self.loss_fn(self.model(self.x_clean), self.y), out

    hist = fit(
        model,
        data,
        optimizer,
        loss_fn=loss_fn,
        epochs=epochs,
        batch_size=batch_size,
        generator=g,
        device=device,
        transform=adversarial,
        closure=CleanMixClosure if clean_weight > 0 else LossClosure,
        metrics={"adv_accuracy": accuracy},
    )
    return {"epoch": hist["epoch"], "loss": hist["loss"], "adv_accuracy": hist["adv_accuracy"]}


# --------------------------------------------------------------------------------------------
# NTK eigen-features (Tsilivis & Kempe 2022)
# --------------------------------------------------------------------------------------------


def eigen_features(
    k_train: Tensor, k_test_train: Tensor, y_train: Tensor, ridge: float = 0.0, num_features: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split kernel regression into one feature per eigenpair of the train Gram matrix.

    With K = sum_i lambda_i v_i v_i^T: f_i(x) = K(x, X) v_i v_i^T Y / (lambda_i + ridge), and
    sum_i f_i(x) = K(x, X)(K + ridge I)^-1 Y (Tsilivis & Kempe 2022, arXiv 2210.05577).
    Returns ``(eigenvalues (k,), features (m, k[, C]), directions (n, k), coefficients (k[, C]))``
    in decreasing eigenvalue order, the first ``num_features`` (default all).
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
    clean test data; robustness_i = the same on ``attack(f_i, x_test, y_test)``, an attack on that
    feature alone. ``correlation`` = E<y, f_i> / sqrt(E||f_i||^2 E||y||^2), likewise under attack.
    Integer labels become +-1 (two classes) or centred one-hot targets.
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

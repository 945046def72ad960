"""Homogeneous max-margin classifiers (hard-margin SVM without intercept), margins, linear-net predictors.

beta_SVM = argmin ||beta||^2 subject to y_i <beta, x_i> >= 1 (no intercept, like the homogeneous
networks whose implicit bias it describes). Solved exactly through its dual, a non-negative least
squares problem (Lawson-Hanson active set, ``scipy.optimize.nnls``), then certified by the KKT
conditions. Sources: Soudry et al., arXiv 1710.10345; Chen & Zhu, arXiv 2303.04198.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from symgen.augment import OrbitAugment
from symgen.errors import ConfigError, DivergenceError, NotSeparableError, ShapeError

__all__ = [
    "MaxMarginSolution",
    "hard_margin_svm",
    "max_margin_direction",
    "invariant_max_margin",
    "normalized_margin",
    "end_to_end_predictor",
]

# Separability floor: data whose max normalized margin (margin / max ||x_i||) is below this are
# treated as not separable through the origin; float64 cannot certify smaller margins reliably.
_MIN_RELATIVE_MARGIN = 1e-6


@dataclass(frozen=True)
class MaxMarginSolution:
    """Solution of the homogeneous hard-margin SVM and its convergence certificate.

    ``beta`` (shape of one input) has y_i <beta, x_i> >= 1 with equality on the support vectors;
    ``margin`` = 1/||beta|| is the geometric margin; ``dual`` alpha >= 0 with beta = sum alpha_i y_i x_i.
    ``kkt_residual``: max of primal infeasibility, complementarity and relative duality gap.
    """

    beta: Tensor
    margin: float
    dual: Tensor
    support: Tensor
    kkt_residual: float

    @property
    def direction(self) -> Tensor:
        """beta / ||beta||."""
        return self.beta / self.beta.norm()


def _prepare(x: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.ndim < 2:
        raise ShapeError(f"X must have shape (n, *features) with n samples; got {tuple(x.shape)}.")
    if y.shape != (x.shape[0],):
        raise ShapeError(f"y must have shape (n,) = ({x.shape[0]},) to match X {tuple(x.shape)}; got {tuple(y.shape)}.")
    yn = y.detach().cpu().double().numpy()
    if not np.all(np.isin(yn, (-1.0, 1.0))):
        raise ConfigError(
            f"labels must be -1 or +1; got values {sorted(set(np.unique(yn).tolist()))[:5]}. "
            "Map binary labels with y = 2*y - 1."
        )
    xn = x.detach().cpu().double().reshape(x.shape[0], -1).numpy()
    if not np.all(np.isfinite(xn)):
        raise ConfigError("X contains NaN or inf; the max-margin problem needs finite inputs.")
    return xn, yn, tuple(x.shape[1:])


def hard_margin_svm(x: Tensor, y: Tensor, *, tol: float = 1e-7, max_iter: int | None = None) -> MaxMarginSolution:
    """Homogeneous hard-margin SVM: min ||beta||^2 s.t. y_i <beta, x_i> >= 1, solved exactly and certified.

    With z_i = y_i x_i / R (R = max ||x_i||), NNLS min_{a >= 0} ||Z^T a||^2 + (1 - 1^T a)^2 has KKT
    conditions that make alpha = a / s (s = 1 - 1^T a > 0) the SVM dual solution; s = gamma^2 / (1 + gamma^2)
    for the normalized margin gamma, and s = 0 iff 0 lies in the convex hull of the z_i (not separable).
    Source: Lawson & Hanson (1974) NNLS; Soudry et al., arXiv 1710.10345.

    Args:
        x: inputs (N, ...).
        y: labels +-1, shape (N,).
        tol: the largest accepted KKT residual.
        max_iter: NNLS iterations (default 50 (N + d + 1)).

    Returns:
        The :class:`MaxMarginSolution`.

    Raises:
        NotSeparableError: no hyperplane through the origin separates the data.
        DivergenceError: NNLS does not converge, or the KKT residual exceeds ``tol``.
    """
    from scipy.optimize import nnls

    xn, yn, shape = _prepare(x, y)
    n, d = xn.shape
    z = yn[:, None] * xn
    scale = float(np.linalg.norm(z, axis=1).max())
    if scale == 0.0:
        raise NotSeparableError("all inputs are zero; no hyperplane through the origin separates them.")
    zs = z / scale
    a_mat = np.vstack([zs.T, np.ones((1, n))])
    b_vec = np.zeros(d + 1)
    b_vec[-1] = 1.0
    iters = max_iter if max_iter is not None else 50 * (n + d + 1)
    try:
        a, _ = nnls(a_mat, b_vec, maxiter=iters)
    except RuntimeError as e:  # scipy raises when the active-set loop hits maxiter
        raise DivergenceError(
            f"the NNLS solver of the max-margin QP did not converge in {iters} iterations "
            f"({e}); pass a larger max_iter or rescale the data."
        ) from None
    s = 1.0 - float(a.sum())
    gamma_est = math.sqrt(max(s, 0.0) / max(1.0 - s, 1e-300))
    if s <= _MIN_RELATIVE_MARGIN**2:
        raise NotSeparableError(
            f"the {n} labelled points are not linearly separable through the origin (max normalized margin "
            f"{gamma_est:.2e} <= {_MIN_RELATIVE_MARGIN:.0e}): some convex combination of the y_i x_i is 0. "
            "Use a soft-margin method, more features, or check the labels."
        )
    alpha = a / s  # dual for the scaled data zs
    beta_s = zs.T @ alpha
    beta_s, alpha = _polish(zs, beta_s, alpha)
    res = _kkt_residual(zs, beta_s, alpha)
    if res > tol:
        raise DivergenceError(
            f"the max-margin QP solution fails its KKT check: residual {res:.2e} > tol {tol:.1e} "
            f"(n={n}, d={d}, normalized margin {1.0 / np.linalg.norm(beta_s):.2e}). The data may be nearly "
            "non-separable or badly scaled; rescale features or raise tol."
        )
    beta = beta_s / scale  # y_i <beta, x_i> = <beta_s, zs_i>
    alpha_o = alpha / scale**2  # beta = Z^T alpha_o
    like = torch.as_tensor(x)
    dtype = like.dtype if like.is_floating_point() else torch.float64
    beta_t = torch.as_tensor(beta, dtype=dtype, device=like.device).reshape(shape)
    support = torch.as_tensor(np.nonzero(alpha > 0)[0], dtype=torch.long)
    return MaxMarginSolution(
        beta=beta_t,
        margin=float(1.0 / np.linalg.norm(beta)),
        dual=torch.as_tensor(alpha_o, dtype=torch.float64),
        support=support,
        kkt_residual=res,
    )


def _polish(zs: np.ndarray, beta: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One exact re-solve on the active set: min-norm beta with <beta, z_i> = 1 on the support."""
    sup = alpha > 0
    if not sup.any():
        return beta, alpha
    zsup = zs[sup]
    # beta = Zs^T a_s with Zs Zs^T a_s = 1: the stationarity + active-constraint equations.
    a_s, *_ = np.linalg.lstsq(zsup @ zsup.T, np.ones(int(sup.sum())), rcond=None)
    if np.all(a_s >= 0):
        new_alpha = np.zeros_like(alpha)
        new_alpha[sup] = a_s
        new_beta = zsup.T @ a_s
        if _kkt_residual(zs, new_beta, new_alpha) <= _kkt_residual(zs, beta, alpha):
            return new_beta, new_alpha
    return beta, alpha


def _kkt_residual(zs: np.ndarray, beta: np.ndarray, alpha: np.ndarray) -> float:
    margins = zs @ beta
    primal = max(0.0, 1.0 - float(margins.min()))  # y_i <beta, x_i> >= 1
    dual = max(0.0, -float(alpha.min()))  # alpha >= 0
    compl = float(np.max(np.abs(alpha * (margins - 1.0)))) / max(float(alpha.max()), 1e-300)
    stat = float(np.linalg.norm(beta - zs.T @ alpha)) / max(float(np.linalg.norm(beta)), 1e-300)
    nb2 = float(beta @ beta)
    gap = abs(float(alpha.sum()) - nb2) / max(nb2, 1e-300)  # strong duality: 1^T alpha = ||beta||^2
    return max(primal, dual, compl, stat, gap)


def max_margin_direction(x: Tensor, y: Tensor, *, tol: float = 1e-7) -> Tensor:
    """The unit-norm homogeneous hard-margin SVM direction beta_SVM / ||beta_SVM||.

    Args:
        x: inputs (N, ...).
        y: labels +-1, shape (N,).
        tol: the largest accepted KKT residual (:func:`hard_margin_svm`).

    Returns:
        The direction, shaped like one input.
    """
    return hard_margin_svm(x, y, tol=tol).direction


def invariant_max_margin(x: Tensor, y: Tensor, action, *, method: str = "augment", tol: float = 1e-7) -> Tensor:
    """Unit direction of the G-invariant max-margin classifier: the SVM on orbit-augmented data.

    Both methods agree for a unitary (permutation) action (arXiv 2303.04198, Thm. 4.3).

    Args:
        x: inputs (N, ...).
        y: labels +-1, shape (N,).
        action: the group action on inputs.
        method: ``"augment"`` solves the SVM on {(g x_i, y_i)}; ``"reynolds"`` on {(P_G x_i, y_i)},
            P_G = |G|^-1 sum_g rho(g).
        tol: the largest accepted KKT residual.

    Returns:
        The direction, shaped like one input.

    Raises:
        ConfigError: an unknown ``method``.
    """
    if method == "augment":
        xa, ya = OrbitAugment(action)(x, y)
        return max_margin_direction(xa, ya, tol=tol)
    if method == "reynolds":
        return max_margin_direction(action.orbit(torch.as_tensor(x)).mean(0), y, tol=tol)
    raise ConfigError(f"method must be 'augment' or 'reynolds'; got '{method}'.")


def normalized_margin(beta: Tensor, x: Tensor, y: Tensor) -> float:
    """min_i y_i <beta, x_i> / ||beta|| (negative if some point is misclassified).

    Args:
        beta: a linear predictor, as many entries as one input.
        x: inputs (N, ...).
        y: labels +-1, shape (N,).

    Returns:
        The margin.

    Raises:
        ShapeError: ``beta`` and one input differ in size.
    """
    x = torch.as_tensor(x)
    beta = torch.as_tensor(beta).to(x.dtype if x.is_floating_point() else torch.float64)
    if beta.numel() != x[0].numel():
        raise ShapeError(
            f"beta has {beta.numel()} entries but each input has {x[0].numel()} (X shape {tuple(x.shape)})."
        )
    y = torch.as_tensor(y, dtype=beta.dtype, device=x.device)
    scores = x.reshape(x.shape[0], -1).to(beta.dtype) @ beta.reshape(-1).to(x.device)
    return float((y * scores).min() / beta.norm())


def end_to_end_predictor(model: nn.Module, input_shape: Sequence[int] | None = None, *, check: bool = True) -> Tensor:
    """beta with model(x) = <beta, x> for a linear network without bias: beta_i = model(e_i).

    Uses ``model.predictor()`` when the model has one.

    Args:
        model: a linear network with a scalar output per input.
        input_shape: the shape of one input (default: ``model.shape``).
        check: verify f(0) = 0 and f(a u + b v) = a f(u) + b f(v) on random probes.

    Returns:
        beta, of shape ``input_shape``.

    Raises:
        ShapeError: no input shape, or an output that is not one scalar per input.
        ConfigError: the check fails.
    """
    if input_shape is None:
        shape = getattr(model, "shape", None)
        if shape is None:
            raise ShapeError("end_to_end_predictor needs input_shape=(...) (one input without batch dim).")
        input_shape = shape
    shape = tuple(int(s) for s in input_shape)
    d = math.prod(shape)
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    device = p.device if p is not None else None

    def f(inp: Tensor) -> Tensor:
        out = model(inp)
        if out.ndim > 1:
            if out.shape[1:].numel() != 1:
                raise ShapeError(
                    f"end_to_end_predictor needs a scalar output per input; the model returns shape {tuple(out.shape)}."
                )
            out = out.reshape(out.shape[0])
        return out

    predictor = getattr(model, "predictor", None)
    with torch.no_grad():
        beta = (
            predictor().reshape(shape)
            if predictor is not None
            else f(torch.eye(d, dtype=dtype, device=device).reshape(d, *shape)).reshape(shape)
        )
        if check:
            gen = torch.Generator().manual_seed(0)
            u, v = torch.randn(2, *shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
            zero = torch.zeros_like(u)
            outs = f(torch.stack([u, v, 2.0 * u - 3.0 * v, zero]))
            tol = 1e3 * torch.finfo(dtype).eps * (1.0 + float(outs[:3].abs().sum()))
            if (
                float((outs[2] - (2.0 * outs[0] - 3.0 * outs[1])).abs()) > tol
                or float(outs[3].abs()) > tol
                or float((outs[0] - (u.reshape(-1) @ beta.reshape(-1))).abs()) > tol
            ):
                raise ConfigError(
                    "end_to_end_predictor: the model is not a linear function without bias "
                    "(f(0) != 0 or f(2u - 3v) != 2f(u) - 3f(v)); it has no single predictor beta."
                )
    return beta

"""Task overlap through the NTK: principal angles between two tasks' NTK feature subspaces, and the
linearized (kernel) prediction of a network's outputs after it trains on a new task (forgetting).

With J_A = U_A S_A V_A^T the Jacobian of the outputs on task A's inputs (rows: samples x outputs), the NTK
overlap matrix of Doan et al. (arXiv 2010.04003) is ``O = V_A^T V_B``; its singular values are the cosines
of the principal angles between the spans of the two tasks' gradients. It needs only kernels:
``O = S_A^-1 U_A^T Theta_AB U_B S_B^-1`` with ``Theta_AA = U_A S_A^2 U_A^T``. Training on B moves A's
outputs by ``Theta_AB Theta_BB^-1 (I - exp(-lr Theta_BB t / n)) (y_B - f(X_B))`` (arXiv 1902.06720), which
vanishes when the subspaces are orthogonal: the forgetting that OGD removes (arXiv 1910.07104, 2006.11942).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from symgen.errors import ConfigError, ShapeError
from symgen.ntk.regression import gd_dynamics, kernel_eigh, kernel_regression

__all__ = ["NTKOverlap", "overlap_from_kernels", "ntk_overlap", "task_kernels", "predict_after_training"]


@dataclass
class NTKOverlap:
    """The NTK overlap matrix ``overlap`` (rank_a, rank_b) = V_A^T V_B and its singular values ``cosines``.

    ``cosines`` (descending, in [0, 1]) are the cosines of the principal angles ``principal_angles``
    between the tasks' kernel feature subspaces (restricted to the top ``num_components`` each when given:
    the PCA view of arXiv 2010.04003). ``mean_squared_cosine`` = ||O||_F^2 / min(rank_a, rank_b), in [0, 1]:
    0 for orthogonal tasks, 1 when one subspace contains the other.
    """

    overlap: Tensor
    cosines: Tensor
    principal_angles: Tensor
    rank_a: int
    rank_b: int

    @property
    def mean_squared_cosine(self) -> float:
        """sum_i cos^2(theta_i) / min(rank_a, rank_b): 1 for nested subspaces, 0 for orthogonal ones."""
        return float((self.cosines**2).sum() / max(1, min(self.rank_a, self.rank_b)))


def _basis(k: Tensor, name: str, rtol: float, num_components: int | None) -> tuple[Tensor, Tensor]:
    evals, evecs = kernel_eigh(k)
    if not bool(torch.isfinite(evals).all()) or float(evals[0]) <= 0:
        raise ShapeError(
            f"{name} must be a symmetric PSD kernel with a positive top eigenvalue; got top "
            f"eigenvalue {float(evals[0])}."
        )
    keep = int((evals > rtol * evals[0]).sum())
    if num_components is not None:
        keep = min(keep, num_components)
    return evals[:keep].sqrt(), evecs[:, :keep]


def overlap_from_kernels(
    k_aa: Tensor, k_ab: Tensor, k_bb: Tensor, *, num_components: int | None = None, rtol: float = 1e-8
) -> NTKOverlap:
    """The overlap of two tasks from their kernel blocks. Source: arXiv 2010.04003.

    Args:
        k_aa: Theta_AA (n_a, n_a).
        k_ab: Theta_AB (n_a, n_b).
        k_bb: Theta_BB (n_b, n_b).
        num_components: keep at most the top k eigendirections of each task (PCA).
        rtol: eigendirections with eigenvalue below ``rtol * lambda_max`` are dropped (the numerical rank).

    Returns:
        The :class:`NTKOverlap`.
    """
    if num_components is not None and num_components < 1:
        raise ConfigError(f"num_components must be >= 1 or None, got {num_components}.")
    if not 0 <= rtol < 1:
        raise ConfigError(f"rtol must be in [0, 1), got {rtol}.")
    for name, k in (("k_aa", k_aa), ("k_bb", k_bb)):
        if k.dim() != 2 or k.shape[0] != k.shape[1]:
            raise ShapeError(f"{name} must be a square kernel matrix, got {tuple(k.shape)}.")
    if k_ab.shape != (k_aa.shape[0], k_bb.shape[0]):
        raise ShapeError(
            f"k_ab must have shape ({k_aa.shape[0]}, {k_bb.shape[0]}) to match k_aa and k_bb, got {tuple(k_ab.shape)}."
        )
    s_a, u_a = _basis(k_aa, "k_aa", rtol, num_components)
    s_b, u_b = _basis(k_bb, "k_bb", rtol, num_components)
    o = (u_a.T @ k_ab.to(u_a.dtype) @ u_b) / s_a[:, None] / s_b[None, :]
    cos = torch.linalg.svdvals(o).clamp(0.0, 1.0)
    return NTKOverlap(
        overlap=o, cosines=cos, principal_angles=torch.arccos(cos), rank_a=int(s_a.numel()), rank_b=int(s_b.numel())
    )


def _flat_full(k: Tensor) -> Tensor:
    """(N1, N2, O, O) -> (N1 O, N2 O), rows (i, a), columns (j, b)."""
    n1, n2, o, _ = k.shape
    return k.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)


def _inputs(task: Tensor | tuple[Tensor, ...] | list[Tensor], name: str) -> Tensor:
    x = task[0] if isinstance(task, (tuple, list)) and len(task) else task
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ShapeError(
            f"{name} must be inputs x (N, ...) or a pair (x, y) with N >= 1, got "
            f"{type(x).__name__ if not isinstance(x, Tensor) else tuple(x.shape)}."
        )
    return x


def task_kernels(
    model: nn.Module,
    x_a: Tensor,
    x_b: Tensor,
    *,
    output: str = "full",
    method: str = "auto",
    params: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Theta_AA, Theta_AB, Theta_BB)`` of ``model``'s empirical NTK, float64.

    Args:
        model: the model.
        x_a: task A's inputs.
        x_b: task B's inputs.
        output: ``"full"`` flattens outputs into rows (sample, output) (the gradients of every logit),
            ``"trace"`` sums over outputs.
        method: the Jacobian method of ``empirical_ntk_fn``.
        params: the parameters (default: the model's).

    Returns:
        The three blocks.
    """
    from symgen.ntk.empirical import empirical_ntk_fn

    if output not in ("full", "trace"):
        raise ConfigError(f"output must be 'full' or 'trace', got {output!r}.")
    kernel = empirical_ntk_fn(model, output=output, method=method, params=params)
    blocks = [kernel(x_a), kernel(x_a, x_b), kernel(x_b)]
    if output == "full":
        blocks = [_flat_full(k) for k in blocks]
    return blocks[0].double(), blocks[1].double(), blocks[2].double()


def ntk_overlap(
    model: nn.Module,
    task_a: Tensor | tuple[Tensor, ...],
    task_b: Tensor | tuple[Tensor, ...],
    *,
    output: str = "full",
    num_components: int | None = None,
    rtol: float = 1e-8,
    method: str = "auto",
    params: dict[str, Tensor] | None = None,
) -> NTKOverlap:
    """Principal angles between the NTK feature subspaces of two tasks at ``model``'s current weights.

    Source: arXiv 2010.04003.

    Args:
        model: the model.
        task_a: inputs x (N, ...) or pairs (x, y) (targets unused).
        task_b: likewise.
        output: ``"full"``: the span of the gradients of every output (the subspace OGD protects);
            ``"trace"``: one summed output.
        num_components: see :func:`overlap_from_kernels`.
        rtol: see :func:`overlap_from_kernels`.
        method: the Jacobian method of ``empirical_ntk_fn``.
        params: the parameters (default: the model's).

    Returns:
        The :class:`NTKOverlap`.
    """
    x_a, x_b = _inputs(task_a, "task_a"), _inputs(task_b, "task_b")
    k_aa, k_ab, k_bb = task_kernels(model, x_a, x_b, output=output, method=method, params=params)
    return overlap_from_kernels(k_aa, k_ab, k_bb, num_components=num_components, rtol=rtol)


def predict_after_training(
    k_train: Tensor,
    k_eval_train: Tensor,
    f_train: Tensor,
    f_eval: Tensor,
    y_train: Tensor,
    t: float | list[float] | Tensor | None = None,
    lr: float | None = None,
    *,
    normalization: float | None = None,
    discrete: bool = True,
    ridge: float = 0.0,
) -> Tensor:
    """Linearized outputs on evaluation inputs (e.g. task A's) after training on (X_B, y_B) by GD on MSE.

    ``f_eval + Theta_eB Theta_BB^-1 (I - exp(-lr Theta_BB t / n)) (y_B - f_B)``; rows (sample, output), as
    :func:`task_kernels` with ``output="full"``. Loss ``1/(2n) sum ||f - y||^2``. Source: arXiv 2010.04003.

    Args:
        k_train: Theta_BB (N O, N O).
        k_eval_train: Theta_eB (M O, N O).
        f_train: (N, O), the outputs on X_B when training on B starts.
        f_eval: (M, O), likewise on the evaluation inputs.
        y_train: y_B.
        t: GD steps of size ``lr``, one or several; None: trained to convergence.
        lr: the step size.
        normalization: n (default N).
        discrete: exact discrete steps.
        ridge: regularizes the solve for ``t=None``.

    Returns:
        (M, O) for a scalar or None ``t``, (T, M, O) for T times.
    """
    if f_train.dim() != 2 or f_eval.dim() != 2 or y_train.shape != f_train.shape:
        raise ShapeError(
            f"f_train, y_train must be (N, O) alike and f_eval (M, O); got {tuple(f_train.shape)}, "
            f"{tuple(y_train.shape)}, {tuple(f_eval.shape)}."
        )
    n, o = f_train.shape
    m = f_eval.shape[0]
    if k_train.shape != (n * o, n * o) or k_eval_train.shape != (m * o, n * o):
        raise ShapeError(
            f"kernels must be (N O, N O) = ({n * o}, {n * o}) and (M O, N O) = ({m * o}, {n * o}) "
            f"with rows (sample, output); got {tuple(k_train.shape)} and {tuple(k_eval_train.shape)}. "
            "Use task_kernels(..., output='full')."
        )
    dtype = k_train.dtype
    resid = (y_train - f_train).to(dtype).reshape(-1)
    if t is None:
        drift = kernel_regression(k_train, resid, k_eval_train.to(dtype), ridge)
        return f_eval.to(dtype) + drift.reshape(m, o)
    if lr is None or not lr > 0:
        raise ConfigError(f"lr must be > 0 when t is given, got {lr}.")
    norm = float(n if normalization is None else normalization)
    out = gd_dynamics(k_train, k_eval_train.to(dtype), resid, t, lr, normalization=norm, discrete=discrete)
    shape = (m, o) if out.dim() == 1 else (out.shape[0], m, o)
    return f_eval.to(dtype) + out.reshape(shape) if out.dim() == 1 else f_eval.to(dtype)[None] + out.reshape(shape)

"""symgen.ntk: empirical and analytic neural tangent kernels, kernel regression and dynamics, KIP.

One empirical kernel function, ``empirical_ntk_fn(model, ...) -> kernel(x1, x2=None)``, serves KIP
(``differentiable=True``), the audit, the robustness tools and the benchmarks.

Sources: Jacot et al. arXiv 1806.07572; Lee et al. arXiv 1902.06720; Novak et al. arXiv 1912.02803 and
2206.08720 (fast finite-width NTK); Kempe et al. arXiv 2307.02693.
"""

from symgen.ntk.analytic import ACTIVATIONS, Erf, NTKLinear, analytic_ntk, ntk_mlp
from symgen.ntk.convolutional import CONV_PADDINGS, CONV_READOUTS, NTKConv, analytic_conv_ntk, ntk_cnn
from symgen.ntk.empirical import (
    NTK_METHODS,
    NTK_OUTPUTS,
    EmpiricalNTKFn,
    choose_ntk_method,
    empirical_ntk,
    empirical_ntk_fn,
    ntk_vector_product,
)
from symgen.ntk.kip import centred_one_hot, class_balanced_indices, kip, kip_loss, load_support, save_support
from symgen.ntk.learning_curves import LearningCurve, fit_power_law, learning_curve
from symgen.ntk.overlap import NTKOverlap, ntk_overlap, overlap_from_kernels, predict_after_training, task_kernels
from symgen.ntk.regression import eigen_projections, gd_dynamics, kernel_eigh, kernel_regression, residual_decay

__all__ = [
    "NTK_METHODS",
    "NTK_OUTPUTS",
    "EmpiricalNTKFn",
    "empirical_ntk_fn",
    "empirical_ntk",
    "ntk_vector_product",
    "choose_ntk_method",
    "ACTIVATIONS",
    "Erf",
    "NTKLinear",
    "analytic_ntk",
    "ntk_mlp",
    "kernel_regression",
    "gd_dynamics",
    "kernel_eigh",
    "eigen_projections",
    "residual_decay",
    "kip",
    "kip_loss",
    "centred_one_hot",
    "class_balanced_indices",
    "save_support",
    "load_support",
    "CONV_READOUTS",
    "CONV_PADDINGS",
    "analytic_conv_ntk",
    "NTKConv",
    "ntk_cnn",
    "LearningCurve",
    "learning_curve",
    "fit_power_law",
    "NTKOverlap",
    "ntk_overlap",
    "overlap_from_kernels",
    "task_kernels",
    "predict_after_training",
]

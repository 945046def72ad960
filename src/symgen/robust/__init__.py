"""Adversarial robustness: FGSM / PGD attacks, PGD adversarial training, and NTK eigen-feature robustness.

Attacks work on anything differentiable in its input: an ``nn.Module``, a plain callable, or a
kernel-regression predictor (the gradient flows through the kernel with respect to the test
input). Feature robustness follows Tsilivis & Kempe 2022 (arXiv 2210.05577): the kernel
predictor is split into one feature per eigenpair of the train Gram matrix, and each feature is
scored for usefulness (accuracy on clean inputs) and robustness (accuracy under attack).

Modules: ``attacks`` (losses, accuracy, FGSM, PGD), ``kernels`` (kernel predictors, eigen-features),
``adversarial`` (adversarial training on ``symgen.training.fit``).
"""

from __future__ import annotations

from symgen.robust.adversarial import adversarial_training
from symgen.robust.attacks import LossSpec, Predictor, accuracy, attack_loss, correct_count, fgsm, pgd
from symgen.robust.kernels import (
    FeatureRobustness,
    KernelPredictor,
    eigen_features,
    kernel_predictor,
    ntk_feature_robustness,
    regression_targets,
)

__all__ = [
    "Predictor",
    "LossSpec",
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

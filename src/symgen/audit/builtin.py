"""The built-in sections of the audit, each one :class:`~symgen.audit.registry.Section`, registered on import
(``symgen.audit`` imports this module, so every entry point sees them).

The cost models are calibrated on measured runs (benchmarks/audit.py, CIFAR ResNet-18 on 2 cores:
predicted against measured wall time): the NTK's per-sample Jacobian rows cost about 7 batched backward
passes per row; a forward pass under weight noise 2.5x a batch-16 forward; a Hessian-vector product
about two and a half backward passes. The audit re-plans from the measured throughput after each section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from symgen.audit import figures
from symgen.audit.precision import Target
from symgen.audit.registry import Context, Limit, Section, Sizes, register

if TYPE_CHECKING:
    from symgen.audit.limits import AuditLimits
    from symgen.audit.planning import Timing
    from symgen.audit.result import SectionResult

__all__ = ["BUILTIN"]


def _n(k: int | None, n: int) -> int:
    return n if k is None else min(k, n)


def _performance(sec: SectionResult, c: Context) -> None:
    from symgen.audit.sections import evaluation

    evaluation.performance(sec, c.model, c.train, c.test, c.lim, c.seed, c.same, c.group, clock=c.clock)


def _invariance(sec: SectionResult, c: Context) -> None:
    from symgen.audit.sections import evaluation

    evaluation.invariance(sec, c.model, c.action, c.test, c.lim, c.seed, clock=c.clock)


def _robustness(sec: SectionResult, c: Context) -> None:
    from symgen.audit.sections import evaluation

    evaluation.robustness(sec, c.model, c.test, c.lim, c.seed, clock=c.clock)


def _ntk(sec: SectionResult, c: Context) -> None:
    from symgen.audit.sections import ntk

    ntk.ntk(sec, c.model, c.test, c.lim, c.seed, clock=c.clock)


def _scale(sec: SectionResult, c: Context) -> None:
    from symgen.audit.sections import scale_symmetries

    scale_symmetries.scale_symmetries(sec, c.model, c.train, c.lim, c.seed)


def _hessian(sec: SectionResult, c: Context) -> None:
    from symgen.audit.sections import curvature

    curvature.hessian(sec, c.model, c.train, c.lim, c.seed, c.group, clock=c.clock)


def _noise(sec: SectionResult, c: Context) -> None:
    from symgen.audit.sections import curvature

    curvature.noise_stability(sec, c.model, c.train, c.lim, c.seed, c.result, c.group, clock=c.clock)


def _cost_performance(lim: AuditLimits, t: Timing, z: Sizes) -> float:
    return (_n(lim.eval_num_data, z.n_train) + _n(lim.test_num_data, z.n_test)) * t.forward


def _cost_invariance(lim: AuditLimits, t: Timing, z: Sizes) -> float:
    return _n(lim.invariance_num_data, z.n_test) * z.group_order * t.forward


def _cost_robustness(lim: AuditLimits, t: Timing, z: Sizes) -> float:
    return _n(lim.pgd_num_data, z.n_test) * (1 + len(lim.pgd_eps) * (lim.pgd_steps + 1)) * t.backward


def _cost_ntk(lim: AuditLimits, t: Timing, z: Sizes) -> float:
    return 7.0 * min(lim.ntk_num_data * lim.ntk_subsamples, z.n_test) * t.outputs * t.backward


def _cost_scale(lim: AuditLimits, t: Timing, z: Sizes) -> float:
    return _n(lim.symmetry_num_data, z.n_train) * (4 + 2 * t.layers) * t.forward


def _cost_hessian(lim: AuditLimits, t: Timing, z: Sizes) -> float:
    hvp = 2.5 * t.backward  # a Hessian-vector product per sample
    lanczos = max(lim.eigen_iters, lim.density_steps if lim.density_runs > 0 else 0)
    probes = max(3, lim.hutchinson_probes)
    # the eigenvalue run, the probes, the GGN's Lanczos and its trace probes, the further SLQ runs
    matvecs = probes + lanczos + lim.eigen_iters + probes + max(lim.density_runs - 1, 0) * lim.density_steps
    return _n(lim.hessian_num_data, z.n_train) * matvecs * hvp


def _cost_noise(lim: AuditLimits, t: Timing, z: Sizes) -> float:
    draws = 1 + 2 * len(lim.noise_sigmas) * lim.noise_num_samples
    return 2.5 * _n(lim.noise_num_data, z.n_train) * draws * t.forward


BUILTIN: tuple[Section, ...] = (
    Section(
        "performance",
        "Accuracy and loss",
        _performance,
        limits=(Limit("eval_num_data", minimum=100), Limit("test_num_data")),
        cost=_cost_performance,
        share=0.05,
        targets={
            "train_accuracy": Target(abs=0.02),
            "test_accuracy": Target(abs=0.02),
            "train_loss": Target(rel=0.1),
            "test_loss": Target(rel=0.1),
        },
        meanings={
            "train_accuracy": "Share of training samples classified correctly.",
            "test_accuracy": "Share of held-out samples classified correctly.",
            "train_loss": "Mean cross-entropy on the training samples.",
            "test_loss": "Mean cross-entropy on held-out samples; far above the training loss means overfitting.",
        },
        docs="accuracy and cross-entropy on the train and test splits | binomial / sample standard error; "
        "target 0.02 absolute (accuracy), 10 % (loss) | `symgen.robust.accuracy`",
        run_rank=0,
        required=True,
    ),
    Section(
        "invariance",
        "Invariance under the group action",
        _invariance,
        limits=(Limit("invariance_num_data", minimum=16),),
        cost=_cost_invariance,
        share=0.10,
        targets={
            "osp": Target(rel=0.05),
            "kl": Target(rel=0.1),
            "logit_deviation": Target(rel=0.1),
            "orbit_accuracy": Target(abs=0.03),
        },
        figure="invariance",
        draw=figures.draw_invariance,
        meanings={
            "osp": "Mean number of orbit elements g x given the same class as x: |G| is perfectly invariant, "
            "1 is not at all.",
            "kl": "Mean symmetric KL between the predictions for x and g x: 0 is perfectly invariant.",
            "kl_max": "The worst symmetric KL over samples and group elements.",
            "logit_deviation": "Relative change of the logits when the input is transformed: 0 is invariant.",
            "orbit_accuracy": "Accuracy over all transformed inputs g x.",
        },
        docs="OSP (orbit same predictions, 1..\\|G\\|), symmetric KL between p(x) and p(gx) (mean and max), "
        "relative logit deviation, accuracy on whole orbits; per group element in a figure | standard error "
        "over 16 batches of samples; target 5-10 % | `symgen.metrics.invariance_metrics`",
        run_rank=10,
        needs_action=True,
    ),
    Section(
        "scale_symmetries",
        "Weight-space scale symmetries",
        _scale,
        limits=(Limit("symmetry_num_data", minimum=4),),
        cost=_cost_scale,
        share=0.05,
        meanings={
            "groups": "Parameter groups whose filters can be rescaled without changing the function.",
            "filters": "Independent scale factors (one per filter of a symmetric group).",
            "parameter_fraction": "Share of parameters whose scale the loss does not see.",
            "max_check_change": "Largest relative output change under a random rescaling: about 1e-6 or less confirms.",
        },
        docs="parameter groups whose filters can be rescaled without changing the model (a conv/linear layer "
        "feeding a normalization), independent scale factors, share of parameters, numeric confirmation | "
        "exact (numerically confirmed to ~1e-14) | `symgen.symmetry.find_scale_symmetries`",
        run_rank=40,
    ),
    Section(
        "hessian",
        "Hessian: trace, top eigenvalues, density",
        _hessian,
        limits=(
            Limit("hessian_num_data", minimum=8),
            Limit("hutchinson_probes", minimum=3),
            Limit("eigen_iters", minimum=5),
            Limit("density_steps", minimum=5),
            Limit("top_eigenvalues"),
            Limit("density_runs"),
        ),
        cost=_cost_hessian,
        share=0.35,
        targets={
            "trace": Target(rel=0.1),
            "density_trace": Target(rel=0.2),
            "ggn_trace": Target(rel=0.1),
            "density_positive_part": Target(rel=0.2),
            "density_negative_part": Target(rel=0.3),
            "eigenvalue_": Target(rel=0.05),
            "ggn_top_eigenvalue": Target(rel=0.05),
        },
        figure="hessian_density",
        draw=figures.draw_hessian,
        meanings={
            "trace": "Sum of the Hessian's eigenvalues (mean curvature x parameters): larger is sharper; "
            "negative when negative curvature outweighs positive (see the density's parts and the GGN trace).",
            "density_trace": "The trace implied by the spectral density; it must agree with `trace` within the errors.",
            "density_positive_part": "Integral of lambda over lambda > 0 of the density (x dim): the positive "
            "curvature in the trace.",
            "density_negative_part": "Integral of lambda over lambda < 0 of the density (x dim): the negative "
            "curvature in the trace.",
            "ggn_trace": "Trace of the Gauss-Newton matrix (PSD, never negative; lower variance than the Hessian's).",
            "ggn_top_eigenvalue": "Largest curvature of the Gauss-Newton matrix, the positive part of the Hessian.",
            "smallest_ritz_value": "Most negative curvature found: clearly below 0 means a saddle, not a minimum.",
            "eigenvalue_": "The {}. largest Hessian eigenvalue (curvature along its direction).",
        },
        docs="top eigenvalues (Lanczos), tr(H) (Hutchinson deflated by that Lanczos basis; its probes v^T H v "
        "by second-order Taylor mode where the model's operations allow), spectral density (stochastic Lanczos "
        "quadrature, the eigenvalue run as its first run; figure) with its positive and negative parts "
        "(integrals of lambda over lambda > 0 and < 0), most negative Ritz value; beside them the trace and top "
        "eigenvalue of the generalized Gauss-Newton matrix J^T H_loss J (`ggn_trace`, `ggn_top_eigenvalue`; "
        "PSD); BatchNorm in eval mode, all trainable parameters | standard error of the traces; Lanczos error "
        "bound of each eigenvalue; target 10 % (traces), 5 % (eigenvalues) | `symgen.curvature.HessianOperator`, "
        "`symgen.curvature.GGNOperator`",
        run_rank=50,
    ),
    Section(
        "noise_stability",
        "Noise stability",
        _noise,
        limits=(Limit("noise_num_data", minimum=8), Limit("noise_num_samples", minimum=2), Limit("noise_sigmas")),
        cost=_cost_noise,
        share=0.15,
        targets={"loss_increase@": Target(rel=0.25)},
        figure="noise_stability",
        draw=figures.draw_noise,
        meanings={"loss_increase@": "Mean loss increase under Gaussian weight noise of std {}."},
        docs="E_U[L(W+U)] - L(W), U ~ N(0, sigma^2 I), at several sigma, beside the second-order prediction "
        "sigma^2/2 tr(H) | standard error over antithetic draws; target 25 % | `symgen.metrics.noise_stability`",
        run_rank=60,
    ),
    Section(
        "ntk",
        "Empirical neural tangent kernel",
        _ntk,
        limits=(Limit("ntk_num_data", minimum=8), Limit("ntk_subsamples", minimum=1)),
        cost=_cost_ntk,
        share=0.15,
        targets={
            "effective_rank": Target(rel=0.1),
            "log10_condition_number": Target(rel=0.1),
            "target_alignment": Target(abs=0.05),
        },
        figure="ntk_spectrum",
        draw=figures.draw_ntk,
        meanings={
            "effective_rank": "How many NTK eigen-directions carry the kernel's mass.",
            "log10_condition_number": "Orders of magnitude between the largest and smallest NTK eigenvalue.",
            "target_alignment": "How well the NTK matches the labels' similarity (1 = perfectly aligned).",
        },
        docs="empirical NTK (summed over outputs) on disjoint test subsamples: effective rank exp(entropy of the "
        "normalized eigenvalues), log10 condition number, kernel-target alignment <K, YY^T>/(\\|K\\| \\|YY^T\\|) "
        "with centred one-hot Y; spectra in a figure | standard error over the subsamples; target 10 %, 0.05 "
        "absolute (alignment) | `symgen.ntk.empirical.empirical_ntk`",
        run_rank=30,
    ),
    Section(
        "robustness",
        "PGD robust accuracy",
        _robustness,
        limits=(Limit("pgd_num_data", minimum=16), Limit("pgd_steps", minimum=2), Limit("pgd_eps")),
        cost=_cost_robustness,
        share=0.15,
        targets={"robust_accuracy@": Target(abs=0.05), "clean_accuracy": Target(abs=0.05)},
        figure="robustness",
        draw=figures.draw_robustness,
        meanings={
            "robust_accuracy@": "Accuracy under the worst L_inf perturbation PGD finds of size {} x input range.",
            "clean_accuracy": "Accuracy of the attacked subsample before the attack.",
        },
        docs="PGD (L_inf, random start) robust accuracy at eps = 1 %, 3 %, 10 % of the input range; pixels stay "
        "in [0, 1] for image data | binomial standard error; target 0.05 absolute | `symgen.robust.pgd`",
        run_rank=20,
    ),
)

for _section in BUILTIN:
    register(_section)

"""The audit's HTML page: every number with its uncertainty and what it means, each section's cost,
and where a section did not run, why, in place of its figure. Rendering only; the shell writes it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from symgen.audit.result import AuditResult

__all__ = ["render_audit_page", "meaning", "FIGURE_OF"]

# The figure each section draws (draw_figures), for the placeholder of a section that did not run.
FIGURE_OF = {
    "invariance": "invariance",
    "hessian": "hessian_density",
    "noise_stability": "noise_stability",
    "ntk": "ntk_spectrum",
    "robustness": "robustness",
}

_MEANING = {
    "train_accuracy": "Share of training samples classified correctly.",
    "test_accuracy": "Share of held-out samples classified correctly.",
    "train_loss": "Mean cross-entropy on the training samples.",
    "test_loss": "Mean cross-entropy on held-out samples; far above the training loss means overfitting.",
    "osp": "Mean number of orbit elements g x given the same class as x: |G| is perfectly invariant, 1 is not at all.",
    "kl": "Mean symmetric KL between the predictions for x and g x: 0 is perfectly invariant.",
    "kl_max": "The worst symmetric KL over samples and group elements.",
    "logit_deviation": "Relative change of the logits when the input is transformed: 0 is invariant.",
    "orbit_accuracy": "Accuracy over all transformed inputs g x.",
    "groups": "Parameter groups whose filters can be rescaled without changing the function.",
    "filters": "Independent scale factors (one per filter of a symmetric group).",
    "parameter_fraction": "Share of parameters whose scale the loss does not see.",
    "max_check_change": "Largest relative output change under a random rescaling: about 1e-6 or less confirms.",
    "trace": "Sum of the Hessian's eigenvalues (mean curvature x parameters): larger is sharper.",
    "density_trace": "The trace implied by the spectral density; it must agree with `trace` within the errors.",
    "ggn_top_eigenvalue": "Largest curvature of the Gauss-Newton matrix, the positive part of the Hessian.",
    "smallest_ritz_value": "Most negative curvature found: clearly below 0 means a saddle, not a minimum.",
    "effective_rank": "How many NTK eigen-directions carry the kernel's mass.",
    "log10_condition_number": "Orders of magnitude between the largest and smallest NTK eigenvalue.",
    "target_alignment": "How well the NTK matches the labels' similarity (1 = perfectly aligned).",
    "clean_accuracy": "Accuracy of the attacked subsample before the attack.",
}


def meaning(metric: str) -> str:
    """One sentence saying what ``metric`` means.

    Args:
        metric: a metric's name (``loss_increase@0.01`` and the like included).

    Returns:
        The sentence.
    """
    if metric in _MEANING:
        return _MEANING[metric]
    if metric.startswith("eigenvalue_"):
        return f"The {metric.split('_')[1]}. largest Hessian eigenvalue (curvature along its direction)."
    if metric.startswith("robust_accuracy@"):
        return f"Accuracy under the worst L_inf perturbation PGD finds of size {metric.split('@')[1]} x input range."
    if metric.startswith("increase@"):
        return f"Mean loss increase under Gaussian weight noise of std {metric.split('@')[1]}."
    return ""


def _summary_rows(result: AuditResult) -> list[dict[str, Any]]:
    return [{**r, "meaning": meaning(r["metric"])} for r in result.summary_rows()]


def render_audit_page(result: AuditResult, figures: Sequence[Path], *, title: str | None = None) -> str:
    """The self-contained page of an audit (figures embedded), with its numbers as JSON in ``#data``.

    Args:
        result: what the audit measured.
        figures: the PNG files to embed.
        title: the page's title (default: the model's name).

    Returns:
        The HTML.
    """
    from symgen.report import render_page

    data = result.to_dict()
    tables = result.report_tables()
    tables["summary"] = _summary_rows(result)
    drawn = {Path(f).stem for f in figures}
    placeholders = []
    for name, fig in FIGURE_OF.items():
        sec = result.sections.get(name)
        if sec is not None and fig not in drawn:
            why = "; ".join(sec.skipped) or sec.status
            placeholders.append((fig, f"{sec.title}: {sec.status}. {why}"))
    return render_page(
        title or f"symgen audit: {result.model}",
        subtitle=(
            f"data {result.data}, action {result.action or 'none'}, budget {result.budget}, "
            f"device {result.device}, {result.num_params} parameters, {result.seconds:.1f} s"
        ),
        tables=tables,
        figures=figures,
        placeholders=placeholders,
        config={k: data[k] for k in ("model", "data", "action", "budget", "device", "dtype", "seed", "limits")},
        data_json=data,
    )

"""The audit's figures: one PNG per section that has something to draw."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from symgen.audit.registry import Section
    from symgen.audit.result import AuditResult, SectionResult

__all__ = [
    "draw_figures",
    "draw_png",
    "draw_invariance",
    "draw_hessian",
    "draw_noise",
    "draw_ntk",
    "draw_robustness",
    "DPI",
]

DPI = 110  # the page shows figures at their own size: 6.5 x 4 inches is 715 x 440 pixels


def element_labels(action: str | None, order: int) -> list[str]:
    """Readable names of the group elements: rotations in degrees, flips, shifts.

    Args:
        action: the action's name.
        order: the group's order.

    Returns:
        One label per group element.
    """
    if action == "c4" and order == 4:
        return ["id", "rot 90", "rot 180", "rot 270"]
    if action == "d4" and order == 8:
        return ["id", "rot 90", "rot 180", "rot 270", "flip", "flip+90", "flip+180", "flip+270"]
    if action == "shift":
        return [f"shift {k}" for k in range(order)]
    return [f"g{k}" for k in range(order)]


FONT = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
}


def draw_figures(result: AuditResult, outdir: Path) -> list[Path]:
    """PNG figures of the registered sections that ran and draw one (:attr:`Section.draw`) in ``outdir``.

    Figures the audit drew inside its budget (``result.figures``) are written as drawn, and the others
    are not drawn (the budget left no time; their sections say so); without them (None) every figure is
    drawn now. Fonts are readable at the page's size.

    Args:
        result: what the audit measured.
        outdir: the directory (created when missing).

    Returns:
        The PNG files written.
    """
    from symgen.audit.registry import sections
    from symgen.io import atomic_write

    outdir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for section in sections():
        sec = result.sections.get(section.name)
        if sec is None or sec.status != "ok" or section.draw is None or section.figure is None:
            continue
        png = result.figures.get(section.name) if result.figures is not None else draw_png(section, sec, result)
        if png is not None:
            paths.append(atomic_write(outdir / f"{section.figure}.png", png))
    return paths


def draw_png(section: Section, sec: SectionResult, result: AuditResult) -> bytes | None:
    """One section's figure as PNG bytes (None when it has nothing to draw).

    Args:
        section: the registered section (its ``draw``).
        sec: its result.
        result: the whole audit.

    Returns:
        The PNG file's bytes, or None.
    """
    import io

    from symgen.report import pyplot

    if section.draw is None:
        return None
    plt = pyplot()
    with plt.rc_context(FONT):
        fig = section.draw(plt, sec, result)
        if fig is None:
            return None
        buf = io.BytesIO()
        try:
            fig.tight_layout()
            fig.savefig(buf, format="png", dpi=DPI)
        finally:
            plt.close(fig)
    return buf.getvalue()


def draw_invariance(plt: Any, inv: SectionResult, result: AuditResult) -> Any:
    """Agreement with the identity and symmetric KL per group element.

    Args:
        plt: ``matplotlib.pyplot``.
        inv: the invariance section.
        result: the whole audit (the action's name).

    Returns:
        The figure.
    """
    order = inv.details["order"]
    labels = element_labels(result.action, order)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    g = list(range(order))
    ax[0].bar(g, inv.details["agreement"], color="tab:blue")
    ax[0].set(
        xlabel="group element g",
        ylabel="same prediction as x",
        ylim=(0, 1.05),
        title=f"P[class(g x) = class(x)] ({result.action})",
    )
    ax[1].bar(g, inv.details["kl_per_element"], color="tab:orange")
    ax[1].set(xlabel="group element g", ylabel="symmetric KL", title="KL between p(x) and p(g x)")
    for a in ax:
        step = max(1, order // 8)
        a.set_xticks(g[::step], labels[::step], rotation=30 if order > 4 else 0, ha="right" if order > 4 else "center")
    return fig


def draw_hessian(plt: Any, hes: SectionResult, result: AuditResult) -> Any:
    """The Hessian's spectral density (log scale) with the top eigenvalues.

    Args:
        plt: ``matplotlib.pyplot``.
        hes: the Hessian section.
        result: the whole audit.

    Returns:
        The figure, or None without a density.
    """
    if not hes.details.get("density_grid"):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    floor = max(hes.details["density"]) * 1e-7  # the smoothed spikes of single outliers stay visible
    ax.semilogy(hes.details["density_grid"], [max(d, floor) for d in hes.details["density"]], color="tab:green")
    for i, ev in enumerate(hes.details.get("top_eigenvalues", [])):
        ax.axvline(ev, color="tab:red", ls="--", lw=0.8, label="top eigenvalues" if i == 0 else None)
    ax.axvline(0.0, color="0.5", lw=0.6)
    ax.set(xlabel="eigenvalue", ylabel="density", title="Hessian spectral density (SLQ)")
    if hes.details.get("top_eigenvalues"):
        ax.legend()
    return fig


def draw_noise(plt: Any, noise: SectionResult, result: AuditResult) -> Any:
    """Loss increase against the noise level, beside sigma^2/2 tr(H).

    Args:
        plt: ``matplotlib.pyplot``.
        noise: the noise-stability section.
        result: the whole audit.

    Returns:
        The figure, or None without a curve.
    """
    c = noise.details.get("curve")
    if not c:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sig = [r["sigma"] for r in c]
    ax.errorbar(
        sig, [r["increase"] for r in c], yerr=[r["stderr"] for r in c], fmt="o-", capsize=3, label="E[L(W+U)] - L(W)"
    )
    if noise.details.get("predicted"):
        ax.plot(sig, noise.details["predicted"][: len(sig)], "k--", label="sigma^2/2 tr(H)")
    ax.set(xscale="log", xlabel="weight noise std sigma", ylabel="loss increase", title="noise stability")
    ax.set_xticks(sig, [f"{v:g}" for v in sig])
    ax.minorticks_off()
    ax.legend()
    return fig


def draw_ntk(plt: Any, ntk: SectionResult, result: AuditResult) -> Any:
    """The NTK spectra of the subsamples, normalized by the largest eigenvalue.

    Args:
        plt: ``matplotlib.pyplot``.
        ntk: the NTK section.
        result: the whole audit.

    Returns:
        The figure, or None without spectra.
    """
    if not ntk.details.get("spectra"):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, spec in enumerate(ntk.details["spectra"]):
        top = max(spec[0], 1e-300)
        ax.semilogy(range(1, len(spec) + 1), [max(v / top, 1e-16) for v in spec], label=f"subsample {i + 1}")
    ax.set(xlabel="index", ylabel="eigenvalue / largest", title="empirical NTK spectrum")
    ax.legend()
    return fig


def draw_robustness(plt: Any, rob: SectionResult, result: AuditResult) -> Any:
    """Robust accuracy against the attack's size.

    Args:
        plt: ``matplotlib.pyplot``.
        rob: the robustness section.
        result: the whole audit.

    Returns:
        The figure.
    """
    c = rob.details["curve"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.errorbar(
        [0.0] + [r["eps_fraction"] for r in c],
        [rob.details["clean"]] + [r["accuracy"] for r in c],
        yerr=[0.0] + [r["stderr"] for r in c],
        fmt="o-",
        capsize=3,
    )
    ax.set(
        xlabel="eps (fraction of input range, L_inf)", ylabel="accuracy", ylim=(0, 1.05), title="PGD robust accuracy"
    )
    return fig

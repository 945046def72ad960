"""The audit's figures: one PNG per section that has something to draw."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from symgen.audit.result import AuditResult

__all__ = ["draw_figures"]


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
    """PNG figures of the sections that ran (invariance, Hessian density, noise stability, NTK spectrum,
    robustness) in ``outdir``; return their paths. Fonts are readable at the page's size.

    Args:
        result: what the audit measured.
        outdir: the directory (created when missing).

    Returns:
        The PNG files written.
    """
    from symgen.report import pyplot

    plt = pyplot()
    with plt.rc_context(FONT):
        return _draw(result, outdir, plt)


def _draw(result: AuditResult, outdir: Path, plt: Any) -> list[Path]:
    from symgen.report import save_figure

    outdir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        paths.append(save_figure(fig, outdir / f"{name}.png", dpi=100))

    s = result.sections
    inv = s.get("invariance")
    if inv is not None and inv.status == "ok":
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
            a.set_xticks(
                g[::step], labels[::step], rotation=30 if order > 4 else 0, ha="right" if order > 4 else "center"
            )
        save(fig, "invariance")
    hes = s.get("hessian")
    if hes is not None and hes.status == "ok" and hes.details.get("density_grid"):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        floor = max(hes.details["density"]) * 1e-7  # the smoothed spikes of single outliers stay visible
        ax.semilogy(hes.details["density_grid"], [max(d, floor) for d in hes.details["density"]], color="tab:green")
        for i, ev in enumerate(hes.details.get("top_eigenvalues", [])):
            ax.axvline(ev, color="tab:red", ls="--", lw=0.8, label="top eigenvalues" if i == 0 else None)
        ax.set(xlabel="eigenvalue", ylabel="density", title="Hessian spectral density (SLQ)")
        if hes.details.get("top_eigenvalues"):
            ax.legend()
        save(fig, "hessian_density")
    noise = s.get("noise_stability")
    if noise is not None and noise.status == "ok" and noise.details.get("curve"):
        c = noise.details["curve"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        sig = [r["sigma"] for r in c]
        ax.errorbar(
            sig,
            [r["increase"] for r in c],
            yerr=[r["stderr"] for r in c],
            fmt="o-",
            capsize=3,
            label="E[L(W+U)] - L(W)",
        )
        if noise.details.get("predicted"):
            ax.plot(sig, noise.details["predicted"], "k--", label="sigma^2/2 tr(H)")
        ax.set(xscale="log", xlabel="weight noise std sigma", ylabel="loss increase", title="noise stability")
        ax.set_xticks(sig, [f"{v:g}" for v in sig])
        ax.minorticks_off()
        ax.legend()
        save(fig, "noise_stability")
    ntk = s.get("ntk")
    if ntk is not None and ntk.status == "ok" and ntk.details.get("spectra"):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, spec in enumerate(ntk.details["spectra"]):
            top = max(spec[0], 1e-300)
            ax.semilogy(range(1, len(spec) + 1), [max(v / top, 1e-16) for v in spec], label=f"subsample {i + 1}")
        ax.set(xlabel="index", ylabel="eigenvalue / largest", title="empirical NTK spectrum")
        ax.legend()
        save(fig, "ntk_spectrum")
    rob = s.get("robustness")
    if rob is not None and rob.status == "ok":
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
            xlabel="eps (fraction of input range, L_inf)",
            ylabel="accuracy",
            ylim=(0, 1.05),
            title="PGD robust accuracy",
        )
        save(fig, "robustness")
    return paths

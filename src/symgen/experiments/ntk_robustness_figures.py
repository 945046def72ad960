"""Figures of experiment ``ntk-robustness`` (from ``run``'s result; see :mod:`symgen.experiments.ntk_robustness`)."""

from __future__ import annotations

from pathlib import Path

from symgen.report import pyplot, save_figure

__all__ = ["figures"]


def figures(result: dict, outdir: Path) -> list[Path]:
    """Draw the experiment's figures.

    Args:
        result: ``run``'s output.
        outdir: directory for the PNG files.

    Returns:
        the paths written.
    """
    plt = pyplot()
    import numpy as np

    outdir = Path(outdir)
    paths = []
    f = result["features"]
    idx = np.arange(1, len(f["usefulness"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ax = axes[0]
    ax.plot(idx, f["usefulness"], "o-", ms=3, label="usefulness (clean accuracy)")
    ax.plot(idx, f["robustness"], "s-", ms=3, label="robustness (accuracy under PGD)")
    ax.axhline(0.5, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("eigen-feature index (largest eigenvalue first)")
    ax.set_ylabel("accuracy of sign f_i")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"digits {f['pair'][0]} vs {f['pair'][1]}: NTK eigen-features", fontsize=9)
    ax = axes[1]
    ax.plot(idx, f["correlation"], "o-", ms=3, label="E[y f_i] / norms (clean)")
    ax.plot(idx, f["robust_correlation"], "s-", ms=3, label="same under PGD")
    ax2 = ax.twinx()
    ax2.semilogy(idx, f["eigenvalues"], color="0.6", lw=0.8)
    ax2.set_ylabel("eigenvalue", color="0.5")
    ax.axhline(0.0, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("eigen-feature index")
    ax.set_ylabel("correlation with label")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, outdir / "ntk_feature_robustness.png", dpi=120))

    s = result["summary"]
    labels = ["clean", "random_sign", "pgd", "kernel_transfer"]
    fig, (ax, ax_sweep) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    xs = np.arange(len(labels))
    w = 0.27
    for j, (name, color) in enumerate((("kernel", "C2"), ("standard", "C0"), ("adversarial", "C3"))):
        vals = [s[name].get(k, np.nan) for k in labels]
        ax.bar(
            xs + (j - 1) * w,
            vals,
            w,
            label={"kernel": "NTK predictor", "standard": "network", "adversarial": "PGD-trained network"}[name],
            color=color,
        )
    ax.set_xticks(xs)
    ax.set_xticklabels(["clean", "random sign", "PGD (own)", "PGD from kernel"], fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.18)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax.set_title("Robustness of networks and the NTK predictor (C4.4)", fontsize=9)
    sw = result["sweep"]
    eps_axis = [0.0] + list(sw["eps"])
    for name, color, label in (
        ("kernel", "C2", "NTK predictor"),
        ("standard", "C0", "network"),
        ("adversarial", "C3", "PGD-trained network"),
    ):
        ax_sweep.plot(eps_axis, [s[name]["clean"]] + list(sw[name]), "o-", color=color, ms=3, label=label)
    ax_sweep.set_xlabel("PGD eps")
    ax_sweep.set_ylabel("test accuracy under PGD")
    ax_sweep.set_ylim(0, 1)
    ax_sweep.legend(fontsize=7)
    paths.append(save_figure(fig, outdir / "ntk_robustness_accuracy.png", dpi=120))
    return paths

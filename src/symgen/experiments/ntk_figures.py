"""Figures of experiment ``ntk`` (from ``run``'s result; see :mod:`symgen.experiments.ntk`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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

    outdir = Path(outdir)
    paths = []
    k = result["kernel"]
    widths = np.array(k["widths"], dtype=float)
    mean = np.array([k["by_width"][str(int(w))]["mean"] for w in widths])
    std = np.array([k["by_width"][str(int(w))]["std"] for w in widths])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar(widths, mean, yerr=std, marker="o", capsize=3, label="empirical vs analytic NTK")
    ax.plot(widths, mean[0] * (widths / widths[0]) ** -0.5, "k--", lw=1, label="slope -1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("relative Frobenius error")
    ax.set_title(f"C4.1: NTK at init (fitted slope {k['slope']:.2f})")
    ax.legend()
    paths.append(outdir / "ntk_width_convergence.png")
    save_figure(fig, paths[-1], dpi=120)

    d = result["dynamics"][0]
    t = np.array(d["times"], dtype=float)
    tt = np.maximum(t, 0.5)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(tt, d["loss_net"], label="net (train loss)")
    axes[0].plot(tt, d["loss_kernel"], "--", label="kernel dynamics")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("GD step")
    axes[0].set_ylabel("train MSE")
    axes[0].legend()
    axes[1].plot(tt, d["dev_train"], label="train")
    axes[1].plot(tt, d["dev_test"], label="test")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("GD step")
    axes[1].set_ylabel("||f_net - f_kernel|| / ||y||")
    axes[1].legend()
    fig.suptitle("C4.2: wide MLP vs kernel dynamics")
    paths.append(outdir / "ntk_dynamics_tracking.png")
    save_figure(fig, paths[-1], dpi=120)

    fr = np.array(d["band_fraction"])
    th = np.array(d["band_theory"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    names = ["top", "middle", "bottom"] if fr.shape[1] == 3 else [f"band {i + 1}" for i in range(fr.shape[1])]
    for b in range(fr.shape[1]):
        ax.plot(tt, fr[:, b], lw=2.5, alpha=0.8, label=f"{names[b]} eigenvalues (net)")
        ax.plot(tt, th[:, b], "k--", lw=1, label="kernel theory exp(-lr lambda t / n)" if b == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("GD step")
    ax.set_ylabel("remaining residual fraction")
    ax.set_title("C4.2: spectral bias of the training residual")
    ax.legend(fontsize=8)
    paths.append(outdir / "ntk_spectral_bias.png")
    save_figure(fig, paths[-1], dpi=120)
    return paths

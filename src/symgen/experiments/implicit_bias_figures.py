"""Figures of experiment ``implicit-bias`` (from ``run``'s result; see :mod:`symgen.experiments.implicit_bias`)."""

from __future__ import annotations

from pathlib import Path

from symgen.experiments.implicit_bias_data import DATASETS
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
    datasets = sorted({t["dataset"] for t in result["trials"]}, key=DATASETS.index)
    depths = sorted({t["depth"] for t in result["trials"]})
    colors = {"steerable": "C0", "fc_augmented": "C1", "fc_raw": "C2"}
    markers = {"steerable": "o", "fc_augmented": "s", "fc_raw": "^"}

    fig, axes = plt.subplots(len(datasets), len(depths), figsize=(4 * len(depths), 3.2 * len(datasets)), squeeze=False)
    for i, ds in enumerate(datasets):
        for j, depth in enumerate(depths):
            ax = axes[i][j]
            for t in result["trials"]:
                if t["dataset"] != ds or t["depth"] != depth:
                    continue
                tr = t["trajectory"]
                steps = np.maximum(np.array(tr["steps"]), 1)
                for key, style in (("one_minus_cos_inv", "-"), ("one_minus_cos_raw", "--")):
                    vals = np.clip(np.array(tr[key], dtype=float).mean(1), 1e-12, None)
                    ax.loglog(
                        steps,
                        vals,
                        style,
                        color=colors[t["kind"]],
                        label=f"{t['kind']} vs {'invariant' if key.endswith('inv') else 'raw'} SVM",
                    )
            ax.set_title(f"{ds}, depth {depth}")
            ax.set_xlabel("step")
            ax.set_ylabel("1 - cos")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    paths.append(save_figure(fig, outdir / "cosine_to_svm.png", dpi=110))

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.4), squeeze=False)
    for i, ds in enumerate(datasets):
        ax = axes[0][i]
        for t in result["trials"]:
            if t["dataset"] != ds:
                continue
            sizes = sorted({m["size"] for m in t["members"]})
            acc = np.array([[m["test_accuracy"] for m in t["members"] if m["size"] == n] for n in sizes])
            ax.errorbar(
                sizes,
                acc.mean(1),
                yerr=acc.std(1),
                color=colors[t["kind"]],
                capsize=2,
                alpha=0.8,
                marker=markers[t["kind"]],
                markersize=4,
                markerfacecolor="none",
                linestyle=["-", "--", ":"][depths.index(t["depth"]) % 3],
                label=f"{t['kind']} d{t['depth']}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training size")
        ax.set_ylabel("test accuracy (invariant test data)")
        ax.set_title(ds)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    paths.append(save_figure(fig, outdir / "accuracy_vs_size.png", dpi=110))
    return paths

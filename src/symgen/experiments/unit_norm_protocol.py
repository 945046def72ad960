"""C2.2 in the paper's terms (Badrinarayanan, Mishra, Cipolla, arXiv 1511.01029): SGD is not invariant to
the filter rescalings BatchNorm allows, unit-norm SGD is.

(a) Rescaled initializations: from ``rescalings`` initializations that compute the same function (every
filter feeding BatchNorm times a factor log-uniform over ``rescale_range``, two orders of magnitude by
default), each method is trained at its own best learning rate; the spread of the final test accuracy and
the disagreement of the final test predictions (mean over pairs of runs of the fraction of test points
predicted differently) are compared.
(b) Centred grids: each method's best learning rate is chosen on a validation split (seed-mean validation
accuracy), then both are evaluated on a grid of the SAME relative width centred on their own best
(``centred_factors`` times best); mean test accuracy and its spread across the grid. The search for the best
starts on the shared coarse grid; where a method's best is at an edge of its search grid, the search goes one
grid step further past that edge (the ratio of the two outermost lrs there), and again, until the best is
interior or ``lr_search_extensions`` steps were taken; a best still at an edge then fails the claim with
that reason (the protocol's "best" was not found).

Thresholds, fixed before any run (docs/claims.md, C2.2): (a) UnitNormSGD's prediction disagreement is below
SGD's and at most ``MAX_UNIT_NORM_DISAGREEMENT`` (its filters are normalized at construction, so rescaled
initializations are the same point up to rounding); (b) UnitNormSGD's mean test accuracy over its centred
grid is at least SGD's and its spread across the grid is smaller.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from typing import Any

__all__ = [
    "PROTOCOL_METHODS",
    "MAX_UNIT_NORM_DISAGREEMENT",
    "best_lrs",
    "search_grid",
    "extension_items",
    "search_best",
    "search_summary",
    "centred_items",
    "rescale_items",
    "summarize",
    "verdict",
]

PROTOCOL_METHODS = ("sgd", "unit_norm")
MAX_UNIT_NORM_DISAGREEMENT = 0.01


def search_grid(trials: list[dict], model: str, method: str) -> list[float]:
    """The learning rates searched so far for one model and method (sorted).

    Args:
        trials: finished training trials.
        model: the model.
        method: the method.

    Returns:
        the sorted learning rates.
    """
    return sorted({t["lr"] for t in trials if t["model"] == model and t["method"] == method})


def best_lrs(trials: list[dict], models: list[str], lrs: list[float] | None = None) -> dict[str, dict[str, float]]:
    """Per model and method: the lr with the highest seed-mean validation accuracy, among ``lrs`` (None: every
    lr searched for that model and method).

    Args:
        trials: finished training trials (validation split).
        models: the models.
        lrs: the learning rates to choose among (None: all searched).

    Returns:
        ``{model: {method: lr}}``.
    """
    out: dict[str, dict[str, float]] = {}
    for model in models:
        out[model] = {}
        for method in PROTOCOL_METHODS:

            def val(lr: float, model: str = model, method: str = method) -> float:
                accs = [t["val_acc"] for t in trials if t["model"] == model and t["method"] == method and t["lr"] == lr]
                return statistics.fmean(accs)

            grid = sorted(lrs) if lrs is not None else search_grid(trials, model, method)
            out[model][method] = max(grid, key=val)  # ties: the first (smallest) lr
    return out


def _next_lr(grid: list[float], best: float) -> float | None:
    """One grid step past the edge where ``best`` lies (the ratio of the two outermost lrs there), or None."""
    if len(grid) < 2:
        return best * 10**0.5
    if best == grid[-1]:
        return grid[-1] * (grid[-1] / grid[-2])
    if best == grid[0]:
        return grid[0] * (grid[0] / grid[1])
    return None


def extension_items(base: dict, trials: list[dict], best: dict[str, dict[str, float]], seeds: list[int]) -> list[dict]:
    """Training items that extend each method's search one step past the edge where its best lies.

    Args:
        base: the settings shared by every training item.
        trials: finished training trials.
        best: the current best lrs (:func:`best_lrs`).
        seeds: the seeds to train.

    Returns:
        the new training items (empty when every best lr is interior).
    """
    items = []
    for model in best:
        for method in PROTOCOL_METHODS:
            lr = _next_lr(search_grid(trials, model, method), best[model][method])
            if lr is not None:
                items += [dict(base, model=model, method=method, lr=lr, seed=s) for s in seeds]
    return items


def search_best(
    trials: list[dict],
    models: list[str],
    base: dict,
    seeds: list[int],
    cap: int,
    train: Callable[[list[dict]], list[dict]],
) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Each method's best lr on the validation split, the search extended past the edge where the best lies
    (``train`` runs the new items) until it is interior or ``cap`` steps were taken; (best, the new trials).

    Args:
        trials: finished training trials.
        models: the models.
        base: the settings shared by every training item.
        seeds: the seeds to train.
        cap: the most extension steps.
        train: runs training items, returns their trials.

    Returns:
        the best lrs and the trials trained by the extension.
    """
    search = [t for t in trials if t["method"] in PROTOCOL_METHODS]
    best = best_lrs(search, models)
    extra: list[dict] = []
    for _ in range(cap):
        new = extension_items(base, search, best, seeds)
        if not new:
            break
        extra += train(new)
        search = [t for t in trials + extra if t["method"] in PROTOCOL_METHODS]
        best = best_lrs(search, models)
    return best, extra


def search_summary(trials: list[dict], best: dict[str, dict[str, float]], coarse: list[float]) -> dict[str, Any]:
    """Per model and method: the searched grid, its seed-mean validation accuracies, the best lr, whether the
    best is interior (a neighbour searched on each side) and how many steps the search went past ``coarse``.

    Args:
        trials: every search trial.
        best: the best lrs (:func:`best_lrs`).
        coarse: the initial lr grid.

    Returns:
        the summary, ``{model: {method: ...}}``.
    """
    out: dict[str, Any] = {}
    for model in best:
        out[model] = {}
        for method in PROTOCOL_METHODS:
            grid = search_grid(trials, model, method)
            val = [
                statistics.fmean(
                    t["val_acc"] for t in trials if t["model"] == model and t["method"] == method and t["lr"] == lr
                )
                for lr in grid
            ]
            b = best[model][method]
            out[model][method] = {
                "grid": grid,
                "val_acc": val,
                "best_lr": b,
                "interior": grid[0] < b < grid[-1],
                "extensions": sum(lr not in coarse for lr in grid),
            }
    return out


def centred_items(base: dict, best: dict[str, dict[str, float]], factors: list[float], seeds: list[int]) -> list[dict]:
    """Training items of the centred grids: lr = best x factor for every method, model and seed.

    Args:
        base: the settings shared by every training item.
        best: the best lrs (:func:`best_lrs`).
        factors: multiples of the best lr.
        seeds: the seeds to train.

    Returns:
        the training items.
    """
    return [
        dict(base, model=model, method=method, lr=best[model][method] * f, seed=s)
        for model in best
        for method in PROTOCOL_METHODS
        for f in factors
        for s in seeds
    ]


def rescale_items(base: dict, best: dict[str, dict[str, float]], rescalings: int, seed: int) -> list[dict]:
    """Training items of (a): one initialization seed, ``rescalings`` function-preserving rescalings of it.

    Args:
        base: the settings shared by every training item.
        best: the best lrs (:func:`best_lrs`).
        rescalings: how many rescalings.
        seed: the initialization seed.

    Returns:
        the training items.
    """
    return [
        dict(base, model=model, method=method, lr=best[model][method], seed=seed, rescale=1000 + r)
        for model in best
        for method in PROTOCOL_METHODS
        for r in range(rescalings)
    ]


def _disagreement(predictions: list[list[int]]) -> float:
    """Mean over pairs of runs of the fraction of test points whose predicted class differs."""
    pairs = list(itertools.combinations(predictions, 2))
    if not pairs:
        return 0.0
    return statistics.fmean(statistics.fmean(float(a != b) for a, b in zip(p, q, strict=True)) for p, q in pairs)


def _std(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(
    centred: list[dict], rescaled: list[dict], best: dict[str, dict[str, float]], factors: list[float]
) -> dict[str, Any]:
    """Per model and method: (a) accuracy spread and prediction disagreement over rescalings; (b) the centred
    grid's per-lr seed-mean test accuracy, its mean and its spread (population std across the grid).

    Args:
        centred: trials of the centred grids.
        rescaled: trials of the rescalings.
        best: the best lrs (:func:`best_lrs`).
        factors: the centred grid's factors.

    Returns:
        the summary, ``{model: {method: ...}}``.
    """
    out: dict[str, Any] = {}
    for model in best:
        out[model] = {}
        for method in PROTOCOL_METHODS:
            lr0 = best[model][method]
            per_lr = []
            for f in factors:
                accs = [
                    t["test_acc"]
                    for t in centred
                    if t["model"] == model and t["method"] == method and t["lr"] == lr0 * f
                ]
                per_lr.append({"lr": lr0 * f, "factor": f, "mean": statistics.fmean(accs), "n": len(accs)})
            means = [r["mean"] for r in per_lr]
            runs = [t for t in rescaled if t["model"] == model and t["method"] == method]
            accs = [t["test_acc"] for t in runs]
            out[model][method] = {
                "best_lr": lr0,
                "centred_grid": per_lr,
                "centred_mean_acc": statistics.fmean(means),
                "centred_spread": _std(means),
                "rescaled_accs": accs,
                "rescaled_acc_std": _std(accs),
                "rescaled_acc_range": max(accs) - min(accs) if accs else 0.0,
                "rescaled_disagreement": _disagreement([t["predictions"] for t in runs]),
            }
    return out


def verdict(summary: dict[str, Any], search: dict[str, Any] | None = None) -> tuple[bool, dict[str, Any], list[str]]:
    """(passed, measured per model, reasons for failure) against the thresholds in the module docstring;
    ``search`` (from :func:`search_summary`): a best lr still at an edge of its search grid is a reason.

    Args:
        summary: the output of :func:`summarize`.
        search: the output of :func:`search_summary` (None: not checked).

    Returns:
        ``(passed, measured, reasons)``.
    """
    measured: dict[str, Any] = {}
    reasons: list[str] = []
    for model, per_method in (search or {}).items():
        for method, info in per_method.items():
            if not info["interior"]:
                reasons.append(
                    f"{model} (b): {method}'s best lr {info['best_lr']:.4g} is still at an edge of its "
                    f"search grid {[float(f'{lr:.4g}') for lr in info['grid']]} after "
                    f"{info['extensions']} extension step(s) (the cap, lr_search_extensions): its best "
                    "lr was not found, so the grid cannot be centred on it"
                )
    for model, s in summary.items():
        u, g = s["unit_norm"], s["sgd"]
        ok_a = (
            u["rescaled_disagreement"] < g["rescaled_disagreement"]
            and u["rescaled_disagreement"] <= MAX_UNIT_NORM_DISAGREEMENT
        )
        ok_b_mean = u["centred_mean_acc"] >= g["centred_mean_acc"]
        ok_b_spread = u["centred_spread"] < g["centred_spread"]
        measured[model] = {
            "a_disagreement": {"sgd": g["rescaled_disagreement"], "unit_norm": u["rescaled_disagreement"]},
            "a_acc_std": {"sgd": g["rescaled_acc_std"], "unit_norm": u["rescaled_acc_std"]},
            "b_centred_mean_acc": {"sgd": g["centred_mean_acc"], "unit_norm": u["centred_mean_acc"]},
            "b_centred_spread": {"sgd": g["centred_spread"], "unit_norm": u["centred_spread"]},
            "best_lr": {"sgd": g["best_lr"], "unit_norm": u["best_lr"]},
            # margins: positive = on the passing side
            "margin_b_mean_acc": u["centred_mean_acc"] - g["centred_mean_acc"],
            "margin_b_spread": g["centred_spread"] - u["centred_spread"],
            "passes": {"a": ok_a, "b_mean": ok_b_mean, "b_spread": ok_b_spread},
        }
        if not ok_a:
            reasons.append(
                f"{model} (a): disagreement UnitNormSGD {u['rescaled_disagreement']:.4g} vs SGD "
                f"{g['rescaled_disagreement']:.4g} (need below SGD and <= {MAX_UNIT_NORM_DISAGREEMENT})"
            )
        if not ok_b_mean:
            reasons.append(
                f"{model} (b): centred-grid mean accuracy UnitNormSGD {u['centred_mean_acc']!r} < "
                f"SGD {g['centred_mean_acc']!r}"
            )
        if not ok_b_spread:
            reasons.append(f"{model} (b): spread UnitNormSGD {u['centred_spread']!r} >= SGD {g['centred_spread']!r}")
    return not reasons and bool(summary), measured, reasons

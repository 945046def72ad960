"""C2.1 of experiment ``unit-norm``: symgen finds exactly the scale-invariant parameter groups.

On a BatchNorm MLP, a BatchNorm CNN and a model mixing BatchNorm, GroupNorm, LayerNorm and plain layers
(all with randomized parameters), every found filter block is rescaled by random factors in [1/2, 2] and
the loss must not change (relative ``TOL_INVARIANT``); every parameter not found is rescaled the same way
(per row) and the loss must change (relative > ``TOL_INVARIANT``); a group found at a coarser granularity
than single filters must not be finer (rescaling its filters one by one changes the loss by > ``TOL_FINER``);
the found groups must equal the ones worked out by hand (``EXPECTED``). The claim, its thresholds and their
source: docs/claims.md.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.experiments.base import Claim, jsonable, num_threads
from symgen.functional import buffers_of, call, params_of
from symgen.models import build_model
from symgen.rng import as_generator, isolated_seed
from symgen.symmetry import NORMALIZATION_LAYERS, find_scale_symmetries, rescale_filters

__all__ = ["EXPECTED", "TOL_INVARIANT", "TOL_FINER", "load_data", "cpu_threads", "detection_trial", "detection_claim"]

TOL_INVARIANT = 1e-5  # relative loss change allowed for found groups (the claim's own tolerance)
# Scaling single filters of a per-group / joint symmetry must change the loss clearly above float64
# rounding (~1e-15): the reported granularity is not too coarse.
TOL_FINER = 1e-8

# What a careful reader finds by hand: weight -> (kind, redundant bias, bias scaled with it).
EXPECTED: dict[str, dict[str, tuple[str, str | None, str | None]]] = {
    "mlp": {"1.weight": ("per_filter", "1.bias", None), "4.weight": ("per_filter", "4.bias", None)},
    "cnn": {"0.weight": ("per_filter", "0.bias", None), "3.weight": ("per_filter", "3.bias", None)},
    "mixed": {
        "c1.weight": ("per_filter", "c1.bias", None),
        "c2.weight": ("per_group", None, None),
        "l2.weight": ("joint", None, "l2.bias"),
    },
}


def load_data(dataset: str, device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The dataset's train and test splits on ``device``.

    Args:
        dataset: a name :func:`symgen.data.load_dataset` knows (``digits``, ``mnist1d``).
        device: where the tensors go.

    Returns:
        ``(x_train, y_train, x_test, y_test)``.
    """
    from symgen.data import load_dataset

    x, y = load_dataset(dataset, "train")
    xt, yt = load_dataset(dataset, "test")
    return x.to(device), y.to(device), xt.to(device), yt.to(device)


def cpu_threads(device: str) -> int | None:
    """Tiny models run fastest on one CPU thread (and do not fight other processes for cores).

    Args:
        device: the trial's device.

    Returns:
        1 on the CPU, else None (leave torch's threads).
    """
    return 1 if str(device).startswith("cpu") else None


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _loss(
    model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor, train: bool
) -> float:
    model.train(train)
    with torch.no_grad():
        out = call(model, params, {k: v.clone() for k, v in buffers.items()}, x)
    return F.cross_entropy(out, y).item()


def _log_uniform(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.exp((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(2.0))


def detection_trial(item: dict) -> dict:
    """Detect symmetries of one model, then rescale found and not-found parameters and measure the loss.

    Args:
        item: the trial's settings (model, dataset, seed, width, channels, device, detection batch).

    Returns:
        the found and expected groups and the relative loss changes (JSON-able).
    """
    with num_threads(cpu_threads(item["device"])):
        return _detect(item)


def _detect(item: dict) -> dict:
    x, y, _, _ = load_data(item["dataset"], item["device"])
    with isolated_seed(item["seed"]):
        model = build_model(item["model"], tuple(x.shape[1:]), item["width"], item["channels"])
    model = model.to(device=item["device"], dtype=torch.float64)
    gen = as_generator(item["seed"])
    with torch.no_grad():  # a random point in parameter space: no zero biases, gamma != 1
        for param in model.parameters():
            rms = param.pow(2).mean().sqrt().item()
            param.add_(
                torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device)
                * (0.5 * rms if rms > 0 else 0.5)
            )
        model.train()
        for i in range(4):  # running statistics that hold estimates
            model(x[i * 64 : (i + 1) * 64].double())
    xb = x[: item["detection_batch"]].double()
    yb = y[: item["detection_batch"]]
    t0 = time.perf_counter()
    report = find_scale_symmetries(model, xb[:64], generator=item["seed"])
    detect_s = time.perf_counter() - t0
    exact = copy.deepcopy(model)
    for m in exact.modules():
        if isinstance(m, NORMALIZATION_LAYERS):
            m.eps = torch.finfo(torch.float64).tiny
    p, b = params_of(model), buffers_of(model)
    found: list[dict] = []
    for sym in report.symmetries:
        f = _log_uniform((sym.num_blocks,), gen)
        p2, b2 = rescale_filters(p, b, sym, f)
        row = {
            "weight": sym.weight,
            "kind": sym.kind,
            "blocks": sym.num_blocks,
            "redundant_bias": sym.redundant_bias,
            "bias": sym.bias,
        }
        for tag, m in (("eps", model), ("exact", exact)):
            row[f"train_{tag}"] = _rel(_loss(m, p2, b, xb, yb, True), _loss(m, p, b, xb, yb, True))
            row[f"eval_{tag}"] = _rel(_loss(m, p2, b2, xb, yb, False), _loss(m, p, b, xb, yb, False))
        if sym.kind != "per_filter":
            # Exactly this granularity: scaling single filters independently must change the loss.
            w = p[sym.weight]
            fw = _log_uniform((w.shape[sym.axis],), gen)
            shape = [1] * w.dim()
            shape[sym.axis] = -1
            p3 = dict(p)
            p3[sym.weight] = w * fw.reshape(shape).to(w)
            if sym.bias:
                p3[sym.bias] = p[sym.bias] * fw.to(w)
            row["finer_train_exact"] = _rel(_loss(exact, p3, b, xb, yb, True), _loss(exact, p, b, xb, yb, True))
        found.append(row)
    if report.symmetries:  # all found groups at once
        p_all, b_all = p, b
        for sym in report.symmetries:
            p_all, b_all = rescale_filters(p_all, b_all, sym, _log_uniform((sym.num_blocks,), gen))
        all_row = {
            tag: _rel(_loss(m, p_all, b, xb, yb, True), _loss(m, p, b, xb, yb, True))
            for tag, m in (("train_eps", model), ("train_exact", exact))
        }
    else:
        all_row = {}
    redundant = {}
    for name in report.redundant_biases:
        p4 = dict(p)
        p4[name] = p[name] + torch.randn(p[name].shape, generator=gen, dtype=torch.float64).to(p[name])
        redundant[name] = _rel(_loss(model, p4, b, xb, yb, True), _loss(model, p, b, xb, yb, True))
    found_names = set(report.parameters()) | set(report.redundant_biases)
    not_found = {}
    for name, t in p.items():
        if name in found_names:
            continue
        f = _log_uniform((t.shape[0],), gen).to(t)
        p5 = dict(p)
        p5[name] = t * f.reshape([-1] + [1] * (t.dim() - 1))
        not_found[name] = _rel(_loss(model, p5, b, xb, yb, True), _loss(model, p, b, xb, yb, True))
    expected = EXPECTED[item["model"]]
    got = {s.weight: (s.kind, s.redundant_bias, s.bias) for s in report.symmetries}
    return jsonable(
        {
            "model": item["model"],
            "found": found,
            "all_at_once": all_row,
            "redundant_bias_change": redundant,
            "not_found_change": not_found,
            "matches_expected": got == expected,
            "got": got,
            "expected": expected,
            "method": report.method,
            "unanalysed": report.unanalysed,
            "rejected": report.rejected,
            "detect_seconds": detect_s,
        }
    )


def detection_claim(result: dict) -> Claim:
    """The C2.1 claim from a ``unit-norm`` result's ``detection`` entries.

    Args:
        result: the experiment's result (``run``'s output).

    Returns:
        the C2.1 claim.
    """
    det = result["detection"]
    found_max = max(
        (r[k] for d in det for r in d["found"] for k in ("train_exact", "eval_exact")), default=float("nan")
    )
    found_max_eps = max(
        (r[k] for d in det for r in d["found"] for k in ("train_eps", "eval_eps")), default=float("nan")
    )
    redundant_max = max((v for d in det for v in d["redundant_bias_change"].values()), default=0.0)
    not_found = {f"{d['model']}:{k}": v for d in det for k, v in d["not_found_change"].items()}
    not_found_min = min(not_found.values(), default=float("nan"))
    finer = [r["finer_train_exact"] for d in det for r in d["found"] if "finer_train_exact" in r]
    finer_min = min(finer, default=float("inf"))
    matches = {d["model"]: d["matches_expected"] for d in det}
    passed = (
        all(matches.values())
        and found_max <= TOL_INVARIANT
        and redundant_max <= TOL_INVARIANT
        and not_found_min > TOL_INVARIANT
        and finer_min > TOL_FINER
    )
    notes = []
    if not all(matches.values()):
        notes.append(f"found groups differ from the hand analysis for {[m for m, ok in matches.items() if not ok]}")
    if found_max_eps > TOL_INVARIANT:
        notes.append(
            f"at the models' own BatchNorm/LayerNorm eps = 1e-5 the loss of a rescaled "
            f"found group changes by up to {found_max_eps:.1e}: eps breaks the symmetry to "
            f"order eps/variance; the threshold is applied to the exact symmetry (eps -> 0)"
        )
    return Claim(
        id="C2.1",
        statement="symgen finds exactly the scale-invariant parameter groups: loss unchanged "
        "(relative 1e-5) when a found filter block is rescaled, changed for parameters "
        "not found",
        measured={
            "found_max_rel_loss_change_exact": found_max,
            "found_max_rel_loss_change_at_model_eps": found_max_eps,
            "redundant_bias_max_rel_change": redundant_max,
            "not_found_min_rel_loss_change": not_found_min,
            "finer_than_found_min_rel_change": finer_min if finer else None,
            "matches_hand_analysis": matches,
            "models": [d["model"] for d in det],
        },
        threshold={
            "found": f"<= {TOL_INVARIANT:g}",
            "not_found": f"> {TOL_INVARIANT:g}",
            "finer_than_found": f"> {TOL_FINER:g}",
            "groups": "equal to the hand analysis",
        },
        passed=bool(passed),
        note="; ".join(notes),
        headline="found_max_rel_loss_change_exact",
    )

"""Weight-space scale symmetries that normalization layers create, found from the module graph.

A linear or convolutional weight W whose output reaches a normalization layer only through
ops that commute with positive scaling leaves the network function unchanged when a block of its
filters is rescaled: ``f(W with rows in block B scaled by alpha_B > 0) = f(W)``
(Badrinarayanan, Mishra, Cipolla, arXiv 1511.01029). The normalization decides the blocks:
BatchNorm / InstanceNorm normalize each channel on its own (one factor per filter), GroupNorm
each group of channels (one factor per group), LayerNorm / RMSNorm all normalized features
together (one factor for the whole weight). A bias added before a mean-subtracting per-channel
normalization is cancelled by the mean subtraction (redundant); otherwise the bias has to be
scaled together with its filter.

:func:`find_scale_symmetries` proposes symmetries from the graph (``torch.fx``; forward hooks on
the module call order when tracing fails) and keeps only those confirmed numerically.

Modules: ``types`` (results, function-class tables), ``tracing`` (fx and hook graphs),
``propagation`` (path analysis, candidates), ``confirm`` (numeric check, ``rescale_filters``,
``block_norms``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from symgen.errors import ConfigError, ShapeError
from symgen.rng import Seed, as_generator, isolated_seed, seed_of
from symgen.symmetry.confirm import (
    as_args,
    block_norms,
    cast_args,
    check_models,
    confirm_group,
    confirm_one,
    degenerate_norms,
    rescale_filters,
)
from symgen.symmetry.propagation import analyse_source, candidate_symmetry
from symgen.symmetry.tracing import FxGraph, HookGraph, trace_model
from symgen.symmetry.types import (
    NORMALIZATION_LAYERS,
    SOURCES,
    RunningStatLink,
    ScaleSymmetry,
    ScaleSymmetryReport,
    filter_axis,
)

__all__ = [
    "ScaleSymmetry",
    "ScaleSymmetryReport",
    "RunningStatLink",
    "NORMALIZATION_LAYERS",
    "find_scale_symmetries",
    "rescale_filters",
    "block_norms",
    "filter_axis",
]


def find_scale_symmetries(
    model: nn.Module, example_input: Tensor | Sequence[Any], *, generator: Seed = None, tol: float | None = None
) -> ScaleSymmetryReport:
    """The parameter groups of ``model`` whose filter rescaling leaves the model unchanged.

    For each linear / convolution weight W: ``f(W_B -> a_B W_B) = f(W)`` for all a_B > 0 when every
    path from W reaches a normalization through ops commuting with positive scaling (arXiv
    1511.01029). Found from the ``torch.fx`` graph (forward hooks when tracing fails), then
    confirmed numerically: random factors in [1/2, 2] per block must change the output by at most
    ``tol`` in train mode and in eval mode with the running statistics rescaled to match. The exact check
    runs in float64 with the normalizations' eps set to ~0 (the smallest positive float; eps > 0
    makes the symmetry approximate, to relative order eps / variance); the changes at the model's
    own eps are reported too. Neither the model nor the global RNG state is modified.

    Args:
        model: the model.
        example_input: a batch of >= 2 inputs, or a tuple of arguments.
        generator: a seed or a ``torch.Generator`` (``None`` = seed 0); draws the random factors and
            fixes the dropout masks of the check.
        tol: the largest relative output change accepted (default 1e-8 in float64, else 1e-4).

    Returns:
        The :class:`ScaleSymmetryReport`.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"find_scale_symmetries expects an nn.Module, got {type(model).__name__}.")
    args = as_args(example_input)
    if not any(isinstance(a, Tensor) for a in args):
        raise ConfigError(
            "find_scale_symmetries needs example_input: a batch of inputs (a tensor, "
            "or a tuple of the forward's arguments); got no tensor."
        )
    first = next(a for a in args if isinstance(a, Tensor))
    if first.dim() == 0 or first.shape[0] < 2:
        raise ShapeError(
            f"example_input must be a batch of at least 2 inputs (BatchNorm needs "
            f"batch statistics); got shape {tuple(first.shape)}."
        )
    seed = seed_of(generator)  # dropout masks: the same on both sides of every comparison
    gen = as_generator(generator)
    # Every forward pass runs under a seeded global RNG that is restored after: the caller's
    # CPU and GPU generators are left exactly as they were.
    with isolated_seed(seed):
        return _find(model, args, gen, seed, tol)


def _find(
    model: nn.Module, args: tuple[Any, ...], gen: torch.Generator, seed: int, tol: float | None
) -> ScaleSymmetryReport:
    """Trace, analyse every linear / convolution layer, confirm each candidate; sort every parameter."""
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else None
    notes: list[str] = []
    native_args = cast_args(args, ref.dtype if ref is not None else torch.float32, device)
    graph: FxGraph | HookGraph
    graph, work = trace_model(model, native_args, notes)  # analyses a copy: the user's model is untouched
    refs: dict[tuple[str, bool], Tensor] = {}  # outputs at the unchanged weights, shared by all candidates
    models, cargs, exact_dtype = check_models(model, args, native_args, ref, device, seed, notes, refs)
    if tol is None:
        tol = 1e-8 if exact_dtype == torch.float64 else 1e-4

    named_modules = dict(work.named_modules())
    all_params = [n for n, _ in model.named_parameters()]
    symmetries: list[ScaleSymmetry] = []
    redundant: dict[str, str] = {}
    not_inv: dict[str, str] = {}
    unanalysed: dict[str, str] = dict(graph.unanalysed_params)
    rejected: dict[str, str] = {}
    sources = graph.sources()
    for name, mod in named_modules.items():
        if isinstance(mod, SOURCES) and name not in sources:
            for pn, _ in mod.named_parameters(prefix=name, recurse=False):
                unanalysed.setdefault(pn, "its module is never called in forward() on example_input")
    candidates: list[tuple[ScaleSymmetry, list[str]]] = []
    for name, nodes in sources.items():
        mod = named_modules[name]
        pnames = [pn for pn, _ in mod.named_parameters(prefix=name, recurse=False)]
        if filter_axis(mod) is None:
            for pn in pnames:
                unanalysed[pn] = f"{type(mod).__name__} with groups > 1 is not supported"
            continue
        shared = [pn for pn in pnames if pn in graph.unanalysed_params]
        if shared:
            for pn in pnames:
                unanalysed[pn] = graph.unanalysed_params.get(
                    pn, f"{shared[0]} of the same module is also used by a functional op"
                )
            continue
        analyses = [analyse_source(graph, n, name, mod, gen) for n in nodes]
        failure = next((a.failure for a in analyses if a.failure is not None), None)
        if failure is not None:
            kind, reason = failure
            table = unanalysed if kind == "unknown" else not_inv
            for pn in pnames:
                table[pn] = reason
            continue
        sym, kind, reason = candidate_symmetry(name, mod, analyses)
        if sym is None:
            table = unanalysed if kind == "unknown" else not_inv
            for pn in pnames:
                table[pn] = reason
            continue
        candidates.append((sym, pnames))
    # a normalization that sees a constant group (an all-zero filter) makes the eps -> 0 check round-off
    # over round-off: such candidates are rejected up front, whatever the random factors would give
    norms = sorted({n for sym, _ in candidates for n in sym.normalizers})
    flat = set(degenerate_norms(models["exact"], cargs["exact"], norms, seed)) if candidates else set()
    for sym, pnames in [c for c in candidates if flat & set(c[0].normalizers)]:
        for pn in pnames:
            rejected[pn] = (
                f"graph analysis predicted a {sym.kind} symmetry via {', '.join(sym.normalizers)}, "
                f"but {', '.join(sorted(flat & set(sym.normalizers)))} see(s) a constant group of "
                "values on example_input (e.g. an all-zero filter), where eps -> 0 normalization is "
                "undefined, so the numeric check cannot confirm it"
            )
    candidates = [c for c in candidates if not flat & set(c[0].normalizers)]
    verdicts = _confirm_candidates(models, [c[0] for c in candidates], cargs, gen, seed, tol, refs)
    for (sym, pnames), (check, error) in zip(candidates, verdicts, strict=True):
        if error is not None:
            for pn in pnames:
                rejected[pn] = f"numeric check failed to run ({error})"
            continue
        sym.check = check
        keys = ["train_exact", "eval_exact"] + (["bias_train_exact", "bias_eval_exact"] if sym.redundant_bias else [])
        bad = {k: sym.check[k] for k in keys if not (sym.check[k] <= tol)}
        if bad:
            flat_norms = degenerate_norms(models["exact"], cargs["exact"], sym.normalizers, seed)
            hint = (
                f"; {', '.join(flat_norms)} see(s) a constant group of values on example_input (e.g. "
                "an all-zero filter), where eps -> 0 normalization is undefined"
                if flat_norms
                else ""
            )
            for pn in pnames:
                rejected[pn] = (
                    f"graph analysis predicted a {sym.kind} symmetry via "
                    f"{', '.join(sym.normalizers)}, but rescaling changed the output "
                    f"(relative {bad}, tolerance {tol:g}){hint}"
                )
            continue
        symmetries.append(sym)
        if sym.redundant_bias:
            redundant[sym.redundant_bias] = f"cancelled by the mean subtraction of {', '.join(sym.normalizers)}"
    found = {n for s in symmetries for n in s.members} | set(redundant)
    decided = found | set(not_inv) | set(unanalysed) | set(rejected)
    not_candidates = {
        n: "not a weight or bias of nn.Linear / nn.Conv* (not analysed)" for n in all_params if n not in decided
    }
    if symmetries:
        notes.append(
            "eps > 0 in a normalization makes the symmetry approximate: check['train_eps'] "
            "is the relative output change at the model's own eps"
        )
    notes.append(
        "only scale invariance of single layers is reported; symmetries that need a "
        "compensating change in another layer (ReLU rescaling, permutations) are not"
    )
    return ScaleSymmetryReport(
        symmetries, redundant, not_inv, unanalysed, rejected, not_candidates, graph.method, notes
    )


# One pass per group of candidates (issue 13 section 3); False: every candidate alone (the reference path).
_GROUP_CONFIRMATION = True


def _confirm_candidates(
    models: dict[str, nn.Module],
    syms: list[ScaleSymmetry],
    cargs: dict[str, tuple[Any, ...]],
    gen: torch.Generator,
    seed: int,
    tol: float,
    refs: dict[tuple[str, bool], Tensor],
) -> list[tuple[dict[str, float], str | None]]:
    """Each candidate's numeric check, or the error that stopped it: ``[(check, error)]`` in order.

    Group testing: all candidates are rescaled together; a group whose check passes confirms all its
    members (with the group's check values); a failing group is split in halves down to single
    candidates, whose check is then exactly the one-candidate check. All groups share the passes at the
    unchanged weights. With ``_GROUP_CONFIRMATION = False`` every candidate is checked alone.
    """
    out: list[tuple[dict[str, float], str | None]] = [({}, None)] * len(syms)

    def passes(check: dict[str, float], group: list[int]) -> bool:
        keys = ["train_exact", "eval_exact"] + (
            ["bias_train_exact", "bias_eval_exact"] if any(syms[i].redundant_bias for i in group) else []
        )
        return all(check[k] <= tol for k in keys)

    def run(group: list[int]) -> None:
        try:
            check = (
                confirm_group(models, [syms[i] for i in group], cargs, gen, seed, refs)
                if len(group) > 1
                else confirm_one(models, syms[group[0]], cargs, gen, seed, refs)
            )
        except Exception as e:  # noqa: BLE001 - split to find the candidate that fails to run
            if len(group) == 1:
                out[group[0]] = ({}, f"{type(e).__name__}: {e}")
                return
            check = None
        if check is not None and (len(group) == 1 or passes(check, group)):
            for i in group:
                out[i] = (dict(check), None)
            return
        half = len(group) // 2
        run(group[:half])
        run(group[half:])

    if syms:
        if _GROUP_CONFIRMATION:
            run(list(range(len(syms))))
        else:
            for i in range(len(syms)):
                run([i])
    return out

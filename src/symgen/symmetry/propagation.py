"""Path analysis: from one linear / convolution layer, follow every use of its output to the
normalizations it reaches, tracking which filter each value comes from, whether its bias survives
and which constants are added; then combine the paths into a candidate scale symmetry
(arXiv 1511.01029)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from symgen.errors import ShapeError
from symgen.symmetry.tracing import Step
from symgen.symmetry.types import (
    BATCH_NORMS,
    INSTANCE_NORMS,
    RMS_NORMS,
    RunningStatLink,
    ScaleSymmetry,
    along_axis,
    filter_axis,
    source_weight,
)

__all__: list[str] = []  # internal to symgen.symmetry


def norm_rows(mod: nn.Module, t: Tensor) -> Tensor:
    """``t`` (shaped like the layer's input) as rows of jointly normalized elements."""
    if isinstance(mod, BATCH_NORMS):
        return t.movedim(1, 0).reshape(t.shape[1], -1)
    if isinstance(mod, INSTANCE_NORMS):
        if t.dim() == mod._get_no_batch_dim():  # unbatched (C, *)
            return t.reshape(t.shape[0], -1)
        return t.reshape(t.shape[0] * t.shape[1], -1)
    if isinstance(mod, nn.GroupNorm):
        return t.reshape(t.shape[0] * mod.num_groups, -1)
    if isinstance(mod, nn.LayerNorm) or isinstance(mod, RMS_NORMS):
        return t.reshape(-1, math.prod(mod.normalized_shape))
    raise ShapeError(f"{type(mod).__name__} is not a normalization layer.")  # pragma: no cover


def _per_channel(mod: nn.Module, t: Tensor) -> Tensor:
    """Per-channel rows for layers with running statistics (BatchNorm / InstanceNorm)."""
    if isinstance(mod, INSTANCE_NORMS) and t.dim() == mod._get_no_batch_dim():
        return t.reshape(t.shape[0], -1)
    return t.movedim(1, 0).reshape(t.shape[1], -1)


def _row_constant(rows: Tensor, tol: float = 1e-9) -> Tensor:
    """Which rows hold one value (up to ``tol`` relative)."""
    scale = rows.abs().amax(dim=1).clamp_min(1.0)
    return (rows.amax(dim=1) - rows.amin(dim=1)) <= tol * scale


@dataclass
class _PathState:
    """What is known about the tensor on a path from the source, element by element."""

    labels: Tensor  # source channel of every element (NaN: not from the source)
    bias: Tensor | None  # image of a unit bias (ones) if the path so far is affine in it
    bias_rand: Tensor | None  # image of a random bias, reveals mixing of channels
    const: Tensor  # unscaled constant shifts added on the way
    names: list[str]


@dataclass
class _Analysis:
    """The normalizations one call of a source reaches, or why the analysis stopped."""

    terminals: list[tuple[str, nn.Module, _PathState]] = field(default_factory=list)
    failure: tuple[str, str] | None = None  # ("break" | "unknown", reason)


def _is_affine(step: Step, z: Tensor, shift: Tensor) -> bool:
    """Spot check ``op(z + s) = op(z) + op(s)`` on the recorded value (max pooling needs s flat per window)."""
    try:
        lhs = step.run(z + shift, 0.0) - step.run(z, 0.0)
        rhs = step.run(shift, 0.0)
    except Exception:  # noqa: BLE001 - an op that cannot be replayed is not shown affine
        return False
    return lhs.shape == rhs.shape and torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-9 * (1 + z.abs().max().item()))


def _move_labels(step: Step, labels: Tensor, rand: Tensor) -> Tensor | None:
    """Source channel of every element after a move, or None if the move mixes channels.

    Replays the op on ``labels + 1`` and on a random code per channel, both divided by the op
    applied to ones: zero padding and averaging within a channel leave the ratio exact, mixing
    two channels does not.
    """
    nan = torch.isnan(labels)
    ones = torch.where(nan, torch.nan, torch.ones_like(labels))
    code = torch.where(nan, torch.nan, rand[labels.nan_to_num(0).long()])
    den = step.run(ones, float("nan"))
    lab = step.run(torch.where(nan, torch.nan, labels + 1), float("nan")) / den - 1
    cod = step.run(code, float("nan")) / den
    lab = torch.where(den.abs() > 0, lab, torch.nan)  # fully padded: a constant zero, not a filter
    ok = ~torch.isnan(lab)
    if not ok.any():
        return lab
    rounded = lab[ok].round()
    if (lab[ok] - rounded).abs().max() > 1e-9 or rounded.min() < 0 or rounded.max() >= rand.numel():
        return None
    if (cod[ok] - rand[rounded.long()]).abs().max() > 1e-9:
        return None
    return torch.where(ok, lab.round(), torch.nan)


def analyse_source(graph: Any, node: Any, name: str, mod: nn.Module, gen: torch.Generator) -> _Analysis:
    """Follow every use of the output of ``node`` (a call of ``mod``) to the normalizations it reaches."""
    out = graph.value(node)
    result = _Analysis()
    if not isinstance(out, Tensor):
        result.failure = ("unknown", "its output is not a tensor")
        return result
    out = out.detach().to(torch.float64)
    ch_dim = out.dim() - 1 if isinstance(mod, nn.Linear) else out.dim() - (source_weight(mod).dim() - 2) - 1
    C = out.shape[ch_dim]
    lab = along_axis(torch.arange(C, dtype=torch.float64, device=out.device), ch_dim, out.dim()).expand_as(out)
    has_bias = getattr(mod, "bias", None) is not None
    # drawn on the generator's device, then moved: a seed gives the same codes on every device
    rand = torch.rand(C, generator=gen, device=gen.device, dtype=torch.float64).to(out.device) + 0.5
    state = _PathState(
        labels=lab.clone(),
        bias=torch.ones_like(out) if has_bias else None,
        bias_rand=along_axis(rand, ch_dim, out.dim()).expand_as(out).clone() if has_bias else None,
        const=torch.zeros_like(out),
        names=[name],
    )
    tainted = graph.descendants(node)

    def visit(n: Any, incoming: Any, st: _PathState, value: Tensor) -> None:
        if result.failure is not None:
            return
        step = graph.step(n, incoming, tainted)
        names = st.names + [step.name]
        if step.kind == "metadata":
            return
        if step.kind in ("break", "output", "unknown"):
            result.failure = (
                "unknown" if step.kind == "unknown" else "break",
                f"{step.reason} (path {' -> '.join(names)})",
            )
            return
        if step.kind == "norm":
            result.terminals.append(
                (
                    step.module_name or step.name,
                    step.module,
                    _PathState(st.labels, st.bias, st.bias_rand, st.const, names),
                )
            )
            return
        nxt = graph.value(n)
        nxt = nxt.detach().to(torch.float64) if isinstance(nxt, Tensor) else value
        if step.kind == "homog":
            if st.const.abs().max() > 0:
                result.failure = (
                    "break",
                    f"a constant shift is followed by {step.name}, which is not affine (path {' -> '.join(names)})",
                )
                return
            new = _PathState(st.labels, None, None, st.const, names)
        elif step.kind in ("move", "scale", "shift"):
            try:
                with torch.no_grad():
                    labels = _move_labels(step, st.labels, rand) if step.kind == "move" else st.labels
                    bias, bias_r, const = st.bias, st.bias_rand, st.const
                    if step.kind == "shift":
                        # the added number joins the unscaled constants; the bias passes unchanged
                        const = step.run(st.const, 0.0)
                    else:
                        # a move like max pooling passes a shift only if it is flat per window
                        if (
                            bias is not None
                            and bias_r is not None
                            and (step.kind == "scale" or _is_affine(step, value, bias_r))
                        ):
                            bias, bias_r = step.run(bias, 0.0), step.run(bias_r, 0.0)
                        else:
                            bias = bias_r = None
                        if const.abs().max() > 0:
                            if step.kind == "move" and not _is_affine(step, value, const):
                                result.failure = (
                                    "break",
                                    f"a constant shift does not pass {step.name} affinely (path {' -> '.join(names)})",
                                )
                                return
                        const = step.run(const, 0.0)
            except Exception as e:  # noqa: BLE001
                result.failure = (
                    "unknown",
                    f"could not replay {step.name} on the rescaled tensor ({type(e).__name__}: {e})",
                )
                return
            if labels is None:
                result.failure = ("break", f"{step.name} mixes values of different filters (path {' -> '.join(names)})")
                return
            if labels.shape != nxt.shape:
                labels = torch.broadcast_to(labels, nxt.shape) if step.kind != "move" else labels
            if const.shape != labels.shape:
                const = torch.broadcast_to(const, labels.shape).clone()
            new = _PathState(labels, bias, bias_r, const, names)
        else:  # pragma: no cover - every kind is handled above
            result.failure = ("unknown", f"unhandled op kind {step.kind}")
            return
        for u in graph.users(n):
            visit(u, n, new, nxt)

    for u in graph.users(node):
        visit(u, node, state, out)
    return result


class _UnionFind:
    """Disjoint sets of filters that a normalization couples (path halving, smallest index as root)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def candidate_symmetry(
    module_name: str, mod: nn.Module, analyses: list[_Analysis]
) -> tuple[ScaleSymmetry | None, str, str]:
    """Combine the paths of every call of a source into a symmetry, or ``(None, kind, reason)``."""
    axis = filter_axis(mod)
    if axis is None:  # pragma: no cover - the caller skips layers without a filter axis
        return None, "unknown", f"{type(mod).__name__} with groups > 1 is not supported"
    C = source_weight(mod).shape[axis]
    uf = _UnionFind(C)
    has_bias = getattr(mod, "bias", None) is not None
    bias_cancelled = has_bias
    links: list[RunningStatLink] = []
    normalizers: list[str] = []
    paths: list[str] = []
    if not any(a.terminals for a in analyses):
        return None, "break", "its output reaches no normalization layer"
    for a in analyses:
        for norm_name, norm, st in a.terminals:
            rows = norm_rows(norm, st.labels)
            nan = torch.isnan(rows)
            mixed = nan.any(dim=1) & ~nan.all(dim=1)
            if mixed.any():
                return (
                    None,
                    "break",
                    (
                        f"{norm_name} normalizes its filters jointly with values that "
                        f"are not rescaled (path {' -> '.join(st.names)})"
                    ),
                )
            keep = ~nan.all(dim=1)
            lab = rows[keep].long()
            uniq = torch.unique(lab, dim=0) if lab.numel() else lab
            for row in uniq.tolist():
                first = row[0]
                for other in set(row):
                    uf.union(first, other)
            subtracts_mean = not isinstance(norm, RMS_NORMS)
            single = bool((lab.amax(dim=1) == lab.amin(dim=1)).all()) if lab.numel() else True
            const_rows = norm_rows(norm, st.const)[keep]
            if const_rows.abs().max() > 0 and not (subtracts_mean and bool(_row_constant(const_rows).all())):
                return (
                    None,
                    "break",
                    (f"a constant shift reaches {norm_name}, which does not remove it (path {' -> '.join(st.names)})"),
                )
            if has_bias:
                ok = (
                    st.bias is not None
                    and st.bias_rand is not None
                    and subtracts_mean
                    and single
                    and bool(_row_constant(norm_rows(norm, st.bias)[keep]).all())
                    and bool(_row_constant(norm_rows(norm, st.bias_rand)[keep]).all())
                )
                bias_cancelled = bias_cancelled and ok
            normalizers.append(norm_name)
            paths.append(" -> ".join(st.names))
            if getattr(norm, "running_mean", None) is not None:
                ch_lab = _per_channel(norm, st.labels)
                ch_const = _per_channel(norm, st.const)
                ch_gain = _per_channel(norm, st.bias) if st.bias is not None else torch.zeros_like(ch_lab)
                labels_j = tuple(int(r[~torch.isnan(r)][0].item()) if (~torch.isnan(r)).any() else -1 for r in ch_lab)
                links.append(
                    RunningStatLink(
                        norm_name,
                        labels_j,
                        tuple(float(v) for v in ch_gain[:, 0]),
                        tuple(float(v) for v in ch_const[:, 0]),
                    )
                )
    groups: dict[int, list[int]] = {}
    for c in range(C):
        groups.setdefault(uf.find(c), []).append(c)
    blocks = tuple(tuple(g) for g in groups.values())
    kind = "per_filter" if len(blocks) == C else ("joint" if len(blocks) == 1 else "per_group")
    if C == 1:
        kind = "per_filter"
    w_name = f"{module_name}.weight" if module_name else "weight"
    b_name = f"{module_name}.bias" if module_name else "bias"
    return (
        ScaleSymmetry(
            module=module_name,
            weight=w_name,
            axis=axis,
            kind=kind,
            blocks=blocks,
            bias=b_name if has_bias and not bias_cancelled else None,
            redundant_bias=b_name if has_bias and bias_cancelled else None,
            normalizers=tuple(dict.fromkeys(normalizers)),
            paths=tuple(dict.fromkeys(paths)),
            stat_links=tuple(links),
        ),
        "",
        "",
    )

"""How invariant or equivariant a model (or an ensemble) is, measured over whole group orbits.

OSP (orbit same predictions) = mean_x #{g : argmax f(gx) = argmax f(x)} in 1..|G|;
KL = mean_{x,g} 1/2 [KL(p(x) || p(gx)) + KL(p(gx) || p(x))], p = softmax f
(Nordenfors & Flinth, arXiv 2410.01452; Gerken & Kessel, arXiv 2403.03103).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from symgen.errors import GroupActionError, ShapeError
from symgen.groups import GroupAction

__all__ = ["orbit_outputs", "invariance_metrics", "invariance_report", "equivariance_error"]


def orbit_outputs(
    fn: Callable[[Tensor], Tensor], action: GroupAction, x: Tensor, chunk_size: int | None = None
) -> Tensor:
    """``fn`` on the whole orbit: one batched call on (|G| * B, ...) inputs.

    Args:
        fn: the function.
        action: the group action on inputs.
        x: the batch (B, ...).
        chunk_size: samples of x per call, to bound memory; ``None`` evaluates everything at once.

    Returns:
        (|G|, B, *out).
    """
    if x.ndim < 1 or x.shape[0] == 0:
        raise ShapeError(f"need a non-empty batch of inputs (B, ...); got shape {tuple(x.shape)}.")
    order = action.order
    chunks = [x] if chunk_size is None else list(torch.split(x, chunk_size))
    outs = []
    for xc in chunks:
        orbit = action.orbit(xc)  # (|G|, b, ...)
        out = fn(orbit.reshape(-1, *xc.shape[1:]))
        if not isinstance(out, Tensor) or out.shape[0] != orbit.shape[0] * orbit.shape[1]:
            raise ShapeError(
                f"fn must map (N, ...) inputs to (N, ...) outputs; for N={order * xc.shape[0]} "
                f"it returned {getattr(out, 'shape', type(out))}."
            )
        outs.append(out.reshape(order, xc.shape[0], *out.shape[1:]))
    return torch.cat(outs, dim=1)


def invariance_metrics(orbit_logits: Tensor, labels: Tensor | None = None) -> dict[str, float]:
    """Invariance metrics from logits on orbits.

    osp: mean_x #{g: argmax f(gx) = argmax f(x)}; kl / kl_max: symmetric KL (mean over g and x /
    max over g, x); logit_deviation: ||f(gx) - f(x)||_F / (sqrt|G| ||f(x)||_F); with labels also
    accuracy (on x) and orbit_accuracy (on all gx).

    Args:
        orbit_logits: (|G|, B, K) with g = 0 the identity.
        labels: (B,) labels, or None.

    Returns:
        The metrics by name.
    """
    if orbit_logits.ndim != 3:
        raise ShapeError(f"orbit_logits must have shape (|G|, B, K); got {tuple(orbit_logits.shape)}.")
    order = orbit_logits.shape[0]
    logp = torch.log_softmax(orbit_logits, dim=-1)
    logp0 = logp[:1]
    p, p0 = logp.exp(), logp0.exp()
    # 1/2 [KL(p0||pg) + KL(pg||p0)] = 1/2 sum (p0 - pg)(log p0 - log pg)
    skl = 0.5 * ((p0 - p) * (logp0 - logp)).sum(-1)  # (|G|, B)
    pred = orbit_logits.argmax(-1)  # (|G|, B)
    same = (pred == pred[:1]).sum(0).to(orbit_logits.dtype)  # (B,) in 1..|G|
    diff = orbit_logits - orbit_logits[:1]
    denom = orbit_logits[0].norm() * order**0.5
    out = {
        "osp": float(same.mean()),
        "kl": float(skl.mean()),
        "kl_max": float(skl.max()),
        "logit_deviation": float(diff.norm() / denom) if float(denom) > 0 else float("nan"),
        "group_order": float(order),
    }
    if labels is not None:
        labels = labels.to(pred.device)
        out["accuracy"] = float((pred[0] == labels).to(orbit_logits.dtype).mean())
        out["orbit_accuracy"] = float((pred == labels[None]).to(orbit_logits.dtype).mean())
    return out


def invariance_report(
    fn: Callable[[Tensor], Tensor],
    action: GroupAction,
    x: Tensor,
    labels: Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """OSP, symmetric KL (mean and max), relative logit deviation of ``fn`` over the orbits of ``x``.

    The orbit is evaluated in one batched call (see ``chunk_size``).

    Args:
        fn: maps (N, ...) inputs to (N, K) logits: a module, an :class:`symgen.ensemble.Ensemble`
            (mean logits) or any callable.
        action: the group action on inputs.
        x: the batch.
        labels: its labels, or None.
        chunk_size: samples of x per call (None: all at once).

    Returns:
        The metrics of :func:`invariance_metrics`.
    """
    with torch.no_grad():
        logits = orbit_outputs(fn, action, x, chunk_size)
    if logits.ndim != 3:
        raise ShapeError(
            f"invariance_report needs fn to return logits (N, K); got per-sample shape {tuple(logits.shape[2:])}."
        )
    return invariance_metrics(logits, labels)


def equivariance_error(
    fn: Callable[[Tensor], Tensor],
    in_action: GroupAction,
    out_action: GroupAction,
    x: Tensor,
    reduction: str = "max",
    chunk_size: int | None = None,
) -> Tensor:
    """Relative equivariance error ||f(rho_in(g) x) - rho_out(g) f(x)||_F / ||f(x)||_F per g, reduced.

    The whole orbit goes through ``fn`` in one batched call.

    Args:
        fn: the function.
        in_action: the action on inputs.
        out_action: the action of the same group on outputs.
        x: the batch.
        reduction: "max" or "mean" over g (a 0-dim tensor), or "none" (shape (|G|,)).
        chunk_size: samples of x per call (None: all at once).

    Returns:
        The error.
    """
    same = (
        in_action.order == out_action.order
        if in_action.group is None or out_action.group is None
        else torch.equal(in_action.group.table, out_action.group.table)
    )
    if not same:
        raise GroupActionError(
            f"in_action's group {in_action.group!r} and out_action's group "
            f"{out_action.group!r} differ; equivariance needs one group acting on both."
        )
    if reduction not in ("max", "mean", "none"):
        raise ShapeError(f"reduction must be 'max', 'mean' or 'none'; got '{reduction}'.")
    with torch.no_grad():
        out = orbit_outputs(fn, in_action, x, chunk_size)  # (|G|, B, *out)
        ref = out_action.orbit(out[0])  # rho_out(g) f(x)
        err = (out - ref).flatten(1).norm(dim=1)
        scale = out[0].norm()
        err = err / scale if float(scale) > 0 else err
    if reduction == "max":
        return err.max()
    if reduction == "mean":
        return err.mean()
    return err

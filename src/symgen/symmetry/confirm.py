"""Applying a scale symmetry (``rescale_filters``, ``block_norms``) and confirming a candidate
numerically: random block factors must leave the output unchanged in train mode, and in eval mode
with the running statistics rescaled to match (arXiv 1511.01029)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from symgen.errors import ShapeError
from symgen.functional import Params, buffers_of, call, params_of
from symgen.rng import isolated_seed, randn
from symgen.symmetry.propagation import norm_rows
from symgen.symmetry.types import NORMALIZATION_LAYERS, ScaleSymmetry, along_axis

__all__ = ["block_norms", "rescale_filters"]


def block_norms(params: Mapping[str, Tensor], symmetry: ScaleSymmetry) -> Tensor:
    """Euclidean norm of every block of filters (weight rows and scaled bias entries).

    Args:
        params: the model's parameters by name.
        symmetry: the symmetry.

    Returns:
        ``(num_blocks,)``.
    """
    w = params[symmetry.weight]
    sq = w.pow(2).sum(dim=[d for d in range(w.dim()) if d != symmetry.axis])
    if symmetry.bias:
        sq = sq + params[symmetry.bias].pow(2)
    idx = symmetry.channel_block(w.device)
    return torch.zeros(symmetry.num_blocks, dtype=w.dtype, device=w.device).index_add(0, idx, sq).sqrt()


def rescale_filters(
    params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None, symmetry: ScaleSymmetry, factors: Tensor
) -> tuple[Params, Params]:
    """Apply the symmetry: block B of filters times ``factors[B]`` (> 0), running statistics to match.

    ``W_B -> a_B W_B`` (and the scaled bias), ``running_mean -> a (running_mean - shift) + shift``,
    ``running_var -> a^2 running_var`` so the model is unchanged in train and eval mode
    (arXiv 1511.01029). The inputs are not modified.

    Args:
        params: the parameters by name.
        buffers: the buffers by name, or None.
        symmetry: the symmetry.
        factors: a_B > 0, ``(num_blocks,)``.

    Returns:
        New ``(params, buffers)`` dicts.
    """
    factors = torch.as_tensor(factors)
    if factors.shape != (symmetry.num_blocks,):
        raise ShapeError(
            f"rescale_filters: expected {symmetry.num_blocks} factors (one per block of "
            f"{symmetry.weight}), got shape {tuple(factors.shape)}."
        )
    w = params[symmetry.weight]
    factors = factors.to(device=w.device, dtype=w.dtype)
    alpha = factors[symmetry.channel_block(w.device)]
    out_p = dict(params)
    out_p[symmetry.weight] = w * along_axis(alpha, symmetry.axis, w.dim())
    if symmetry.bias:
        out_p[symmetry.bias] = params[symmetry.bias] * alpha
    out_b = dict(buffers) if buffers else {}
    for link in symmetry.stat_links:
        rm_key, rv_key = f"{link.norm}.running_mean", f"{link.norm}.running_var"
        if rm_key not in out_b or rv_key not in out_b:
            continue
        rm, rv = out_b[rm_key], out_b[rv_key]
        labels = torch.tensor(link.labels, device=rm.device)
        own = labels >= 0  # channels fed by other tensors keep their statistics
        labels = labels.clamp_min(0)
        a = torch.where(own, alpha.to(rm.dtype)[labels], torch.ones_like(rm))
        shift = torch.tensor(link.consts, dtype=rm.dtype, device=rm.device)
        if symmetry.redundant_bias:
            gains = torch.tensor(link.gains, dtype=rm.dtype, device=rm.device)
            shift = shift + gains * params[symmetry.redundant_bias].to(rm.dtype)[labels]
        out_b[rm_key] = a * (rm - shift) + shift
        out_b[rv_key] = a * a * rv
    return out_p, out_b


# ---------------------------------------------------------------------------------------------
# Numeric confirmation


def as_args(example_input: Any) -> tuple[Any, ...]:
    """The forward's positional arguments: a tuple or list as given, anything else as one argument."""
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def cast_args(args: tuple[Any, ...], dtype: torch.dtype, device: torch.device | None) -> tuple[Any, ...]:
    """Floating-point tensors to ``dtype`` and ``device``, other tensors to ``device``, the rest as is."""
    return tuple(
        a.to(device=device, dtype=dtype)
        if isinstance(a, Tensor) and a.is_floating_point()
        else (a.to(device) if isinstance(a, Tensor) and device is not None else a)
        for a in args
    )


def _forward(
    model: nn.Module, params: Params, buffers: Params, args: tuple[Any, ...], train: bool, seed: int
) -> Tensor:
    """The output (flattened and concatenated if a tuple) at ``params`` and copies of ``buffers``."""
    model.train(train)
    with torch.no_grad(), isolated_seed(seed):  # the same dropout masks for both sides of a comparison
        out = call(model, params, {k: v.clone() for k, v in buffers.items()}, *args)
    if isinstance(out, (tuple, list)):
        out = torch.cat([o.reshape(-1) for o in out if isinstance(o, Tensor)])
    return out


def _rel(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` (the absolute difference when ``b`` is zero)."""
    num = (a - b).norm().item()
    den = b.norm().item()
    return num / den if den > 0 else num


def confirm_one(
    models: dict[str, nn.Module],
    sym: ScaleSymmetry,
    args: dict[str, tuple[Any, ...]],
    gen: torch.Generator,
    seed: int,
    refs: dict[tuple[str, bool], Tensor] | None = None,
) -> dict[str, float]:
    """Relative output changes under random block factors in [1/2, 2] of one candidate, train and eval mode."""
    return confirm_group(models, [sym], args, gen, seed, refs)


def confirm_group(
    models: dict[str, nn.Module],
    syms: Sequence[ScaleSymmetry],
    args: dict[str, tuple[Any, ...]],
    gen: torch.Generator,
    seed: int,
    refs: dict[tuple[str, bool], Tensor] | None = None,
) -> dict[str, float]:
    """Relative output changes when every candidate of ``syms`` is rescaled at once (random block factors
    in [1/2, 2] each), train and eval mode; for one candidate, exactly the check of that candidate alone.

    Symmetries compose: if each candidate leaves f unchanged, so does rescaling all of them together, and
    independent random factors make a cancellation between failing candidates a null event, so one
    pass per group decides the whole group (a failing group is split by the caller). ``refs`` caches
    the outputs at the unchanged weights, shared by every group (a forward at the model's own
    parameters, train or eval mode, under the same seed).
    """
    factors = [
        torch.exp(
            (torch.rand(sym.num_blocks, generator=gen, device=gen.device, dtype=torch.float64) * 2 - 1) * math.log(2.0)
        )
        for sym in syms
    ]
    redundant = [sym for sym in syms if sym.redundant_bias]
    refs = {} if refs is None else refs
    check: dict[str, float] = {}
    for tag, model in models.items():
        p, b = params_of(model, requires_grad_only=False), buffers_of(model)
        p2, b2 = p, b
        for sym, f in zip(syms, factors, strict=True):
            p2, b2 = rescale_filters(p2, b2, sym, f)
        x = args[tag]

        def ref(
            train: bool, tag: str = tag, model: nn.Module = model, p: Params = p, b: Params = b, x: tuple[Any, ...] = x
        ) -> Tensor:
            if (tag, train) not in refs:
                refs[(tag, train)] = _forward(model, p, b, x, train, seed)
            return refs[(tag, train)]

        check[f"train_{tag}"] = _rel(_forward(model, p2, b, x, True, seed), ref(True))
        check[f"eval_{tag}"] = _rel(_forward(model, p2, b2, x, False, seed), ref(False))
        if any(sym.stat_links for sym in syms) and tag == "eps":
            check["eval_stale_stats"] = _rel(_forward(model, p2, b, x, False, seed), ref(False))
        if redundant:
            p3, b3 = dict(p), dict(b)
            for sym in redundant:
                bn = sym.redundant_bias
                if bn is None:  # pragma: no cover - redundant holds only candidates with a redundant bias
                    continue
                delta = randn(p[bn].shape, gen, dtype=torch.float64).to(p[bn]) * (p[bn].abs().mean() + 1.0)
                p3[bn] = p[bn] + delta
                for link in sym.stat_links:
                    key = f"{link.norm}.running_mean"
                    if key in b3:
                        lab = torch.tensor(link.labels, device=delta.device)
                        gain = torch.tensor(link.gains, dtype=b[key].dtype, device=b[key].device) * (lab >= 0)
                        b3[key] = b3[key] + gain * delta[lab.clamp_min(0)].to(b[key].dtype)
            check[f"bias_train_{tag}"] = _rel(_forward(model, p3, b, x, True, seed), ref(True))
            check[f"bias_eval_{tag}"] = _rel(_forward(model, p3, b3, x, False, seed), ref(False))
    return check


def degenerate_norms(model: nn.Module, args: tuple[Any, ...], names: Sequence[str], seed: int) -> list[str]:
    """Normalizations among ``names`` with a (numerically) constant group of inputs."""
    mods = dict(model.named_modules())
    flat: list[str] = []
    handles = []
    for name in names:

        def pre(m, inp, name=name):
            rows = norm_rows(m, inp[0].detach())
            spread = rows.amax(dim=1) - rows.amin(dim=1)
            if bool((spread <= 1e-12 * rows.abs().amax(dim=1).clamp_min(1e-300)).any()):
                flat.append(name)

        if name in mods:
            handles.append(mods[name].register_forward_pre_hook(pre))
    try:
        model.train()
        with torch.no_grad(), isolated_seed(seed):  # a train-mode pass: dropout must not draw from the caller's RNG
            model(*args)
    except Exception:  # noqa: BLE001 - only a hint for the message
        pass
    finally:
        for h in handles:
            h.remove()
    return sorted(set(flat))


def check_models(
    model: nn.Module,
    args: tuple[Any, ...],
    native_args: tuple[Any, ...],
    ref: Tensor | None,
    device: torch.device | None,
    seed: int,
    notes: list[str],
    refs: dict[tuple[str, bool], Tensor] | None = None,
) -> tuple[dict[str, nn.Module], dict[str, tuple[Any, ...]], torch.dtype]:
    """Copies of ``model`` for the check: ``exact`` (normalization eps -> 0) and ``eps`` (as is), in float64.

    eps = 0 gives the exact symmetry (torch refuses 0, so the smallest positive float); a model that
    refuses float64 is checked in its own dtype (a note says so). Returns the models, their
    arguments and the check's dtype. The trial train-mode pass of each float64 copy is the reference
    pass of the check: it is stored in ``refs`` under ``(tag, True)``.
    """
    models: dict[str, nn.Module] = {}
    cargs: dict[str, tuple[Any, ...]] = {}
    exact_dtype = torch.float64
    try:
        for tag in ("exact", "eps"):
            m = copy.deepcopy(model).to(torch.float64)
            if tag == "exact":
                _set_tiny_eps(m, torch.float64)
            models[tag], cargs[tag] = m, cast_args(args, torch.float64, device)
            out = _forward(m, params_of(m, requires_grad_only=False), buffers_of(m), cargs[tag], True, seed)
            if refs is not None:
                refs[(tag, True)] = out
    except Exception as e:  # noqa: BLE001 - a model that refuses float64 is checked in its dtype
        if refs is not None:
            refs.clear()
        exact_dtype = ref.dtype if ref is not None else torch.float32
        notes.append(f"float64 copy failed ({type(e).__name__}); numeric check in {exact_dtype}")
        for tag in ("exact", "eps"):
            m = copy.deepcopy(model)
            if tag == "exact":
                _set_tiny_eps(m, exact_dtype)
            models[tag], cargs[tag] = m, native_args
    return models, cargs, exact_dtype


def _set_tiny_eps(model: nn.Module, dtype: torch.dtype) -> None:
    """Every normalization's eps to the smallest positive float of ``dtype`` (torch refuses eps = 0)."""
    for sub in model.modules():
        if isinstance(sub, NORMALIZATION_LAYERS) and getattr(sub, "eps", None) is not None:
            sub.eps = torch.finfo(dtype).tiny

"""The ``jacobian`` and ``ntvp`` empirical-NTK methods: explicit per-sample Jacobian blocks, NTK-vector products.

- ``jacobian``: per-sample Jacobians (``vmap(jacrev)`` through :mod:`symgen.functional`) and large
  matrix products, in blocks of samples x outputs x parameter groups sized to a memory budget.
- ``ntvp``: ``Theta v = J(x1) (J(x2)^T v)``: a vjp per column block, then a batched jvp over x1;
  never stores the Jacobian of x1.

Both stay in the autograd graph of the inputs when called with grad enabled (the differentiable
kernel). Source: Novak, Sohl-Dickstein, Schoenholz, arXiv 2206.08720.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from symgen.functional import jvp_outputs, per_sample_jacobian

__all__: list[str] = []  # internal: reached through symgen.ntk.empirical_ntk_fn


def blocks(n: int, size: int) -> list[slice]:
    size = max(1, int(size))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def to_kernel(gram: Tensor, n1: int, n2: int, o: int, output: str) -> Tensor:
    """(n1*O, n2*O) Gram of per-output Jacobian rows -> (n1, n2, O, O) (``full``)."""
    return gram.reshape(n1, o, n2, o).permute(0, 2, 1, 3)


def _param_groups(wrt: Mapping[str, Tensor], max_numel: int) -> list[list[str]]:
    """Consecutive parameter tensors packed into groups of about ``max_numel`` scalars (big ones alone).

    Small tensors (biases) join the current group even past the limit (by at most 1/4): each group
    costs a full forward/backward pass.
    """
    groups: list[list[str]] = []
    size = 0
    for k, v in wrt.items():
        small = v.numel() * 16 <= max_numel and 4 * (size + v.numel()) <= 5 * max(max_numel, size)
        if groups and (size + v.numel() <= max_numel or small):
            groups[-1].append(k)
            size += v.numel()
        else:
            groups.append([k])
            size = v.numel()
    return groups


def jacobian_ntk(
    model: nn.Module,
    wrt: Mapping[str, Tensor],
    fixed: Mapping[str, Tensor],
    x1: Tensor,
    x2: Tensor | None,
    output: str,
    o: int,
    chunk: int | None,
    budget: int,
    timings: dict[str, float] | None = None,
) -> Tensor:
    """Per-sample Jacobians in blocks of (samples x outputs x parameter group), one matmul per block pair.

    Blocks are as tall as the memory budget allows (all samples of an output at once where possible),
    so each contraction is one large, compute-bound GEMM; ``chunk`` caps the samples per block.
    """
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    nmax = max(n1, n2)
    some = next(iter(wrt.values()))
    item = some.element_size()
    block_bytes = max(1, budget // 4)  # a block of x1, one of x2, and vmap(jacrev)'s transient copies
    rows_per_param = max(1, block_bytes // item)
    groups = _param_groups(wrt, max(1, rows_per_param // (nmax * o)))
    shape = (n1, n2) if output == "trace" else (n1, n2, o, o)
    kernel = torch.zeros(shape, dtype=some.dtype, device=some.device)
    sym = x2 is None

    def jac(x: Tensor, keys: list[str], outs: slice) -> list[Tensor]:
        t0 = time.perf_counter()
        sub = {k: wrt[k] for k in keys}
        rest = {**fixed, **{k: v for k, v in wrt.items() if k not in sub}}
        j = per_sample_jacobian(model, sub, rest, x, outputs=None if outs == slice(0, o) else outs)
        res = [j[k].reshape(x.shape[0], outs.stop - outs.start, -1) for k in keys]
        if timings is not None:
            timings["jacobian_s"] = timings.get("jacobian_s", 0.0) + time.perf_counter() - t0
        return res

    def contract(ja: list[Tensor], jb: list[Tensor], sa: slice, sb: slice, qa: slice, qb: slice) -> None:
        t0 = time.perf_counter()
        na, nb, oa, ob = sa.stop - sa.start, sb.stop - sb.start, qa.stop - qa.start, qb.stop - qb.start
        if output == "trace":  # qa == qb: sum over the shared outputs
            block = torch.zeros(na, nb, dtype=some.dtype, device=some.device)
            for a, b in zip(ja, jb, strict=True):
                block.addmm_(a.reshape(na, -1), b.reshape(nb, -1).T)
            kernel[sa, sb] += block
            if sym and sa != sb:
                kernel[sb, sa] += block.T
        else:
            block = torch.zeros(na * oa, nb * ob, dtype=some.dtype, device=some.device)
            for a, b in zip(ja, jb, strict=True):
                block.addmm_(a.reshape(na * oa, -1), b.reshape(nb * ob, -1).T)
            block = block.reshape(na, oa, nb, ob).permute(0, 2, 1, 3)
            kernel[sa, sb, qa, qb] += block
            if sym and (sa != sb or qa != qb):
                kernel[sb, sa, qb, qa] += block.permute(1, 0, 3, 2)
        if timings is not None:
            timings["contract_s"] = timings.get("contract_s", 0.0) + time.perf_counter() - t0
            timings["contract_flops"] = timings.get("contract_flops", 0) + 2 * na * nb * sum(
                a[0].numel() for a in ja
            ) * (ob if output == "full" else 1)

    for keys in groups:
        p_g = sum(wrt[k].numel() for k in keys)
        cap = max(1, rows_per_param // p_g)  # (sample, output) rows per block
        if cap >= nmax * o:
            s_c, o_c = nmax, o
        elif cap >= nmax:
            s_c, o_c = nmax, cap // nmax
        else:
            s_c, o_c = cap, 1
        if chunk is not None:
            s_c = min(s_c, chunk)
        outs = blocks(o, o_c)
        rows1 = [(s, q) for q in outs for s in blocks(n1, s_c)]
        rows2 = rows1 if sym else [(s, q) for q in outs for s in blocks(n2, s_c)]
        cache2 = None if sym or len(rows2) > 1 else [jac(x2, keys, rows2[0][1])]  # type: ignore[arg-type]
        for ia, (sa, qa) in enumerate(rows1):
            ja = jac(x1[sa], keys, qa)
            for ib, (sb, qb) in enumerate(rows2):
                if (sym and ib < ia) or (output == "trace" and qa != qb):
                    continue
                if sym and ib == ia:
                    jb = ja
                elif cache2 is not None:
                    jb = cache2[0]
                else:
                    jb = jac((x1 if sym else x2)[sb], keys, qb)  # type: ignore[index]
                contract(ja, jb, sa, sb, qa, qb)
    return kernel


def ntvp_ntk(
    model: nn.Module,
    wrt: Mapping[str, Tensor],
    fixed: Mapping[str, Tensor],
    x1: Tensor,
    x2: Tensor | None,
    output: str,
    o: int,
    chunk: int | None,
    budget: int,
    act_numel: int,
) -> Tensor:
    """Columns of Theta as NTK-vector products with basis vectors: vjp (per sample of x2), then batched jvp."""
    from torch.func import vmap

    x2_ = x1 if x2 is None else x2
    n1, n2 = x1.shape[0], x2_.shape[0]
    some = next(iter(wrt.values()))
    p_num = sum(v.numel() for v in wrt.values())
    per_tangent = (p_num + n1 * (act_numel + o)) * some.element_size() * 2
    if chunk is None:
        chunk = max(1, budget // max(1, per_tangent * o))
    jvp_chunk = max(1, budget // max(1, per_tangent))

    def column_block(tangents: dict[str, Tensor]) -> Tensor:
        return jvp_outputs(model, wrt, fixed, x1, tangents)[1].reshape(n1, o)

    shape = (n1, n2) if output == "trace" else (n1, n2, o, o)
    kernel = torch.empty(shape, dtype=some.dtype, device=some.device)
    for sb in blocks(n2, chunk):
        nb = sb.stop - sb.start
        rows = per_sample_jacobian(model, wrt, fixed, x2_[sb])  # vjps with one-hot cotangents
        tangents = {k: v.reshape(nb * o, *v.shape[2:]) for k, v in rows.items()}
        cols = vmap(column_block, chunk_size=jvp_chunk)(tangents)  # (nb*O, n1, O): [j*O+b, i, a]
        full = cols.reshape(nb, o, n1, o).permute(2, 0, 3, 1)  # (i, j, a, b)
        kernel[:, sb] = full.diagonal(dim1=2, dim2=3).sum(-1) if output == "trace" else full
    return kernel

"""Benchmark: equivariant bases and layers for permutation representations (C4 / D4 on images).

1. Building the basis of the commutant: orbit weight sharing (the fast path) against the dense
   nullspace method (float64 SVD of the stacked generator constraints), for image sizes of 64 to
   1024 pixels; checks both give the same space and the character-formula dimension.
2. Forward + backward time of equivariant layers against an unconstrained dense layer of the same
   size, with achieved FLOP/s next to the measured matmul FLOP/s.

Usage: python benchmarks/equivariant.py [--sides 8 16 32] [--max-dense 4096] [--batch 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from symgen.groups import (
    ImageDihedral,
    ImageRotation90,
    Representation,
    commutant_basis,
    commutant_dimension,
    commutant_orbits,
)
from symgen.nn import EquivariantLinear, GroupLinear, LiftingConv2d, LiftingLinear


def timeit(fn, repeat: int = 3, min_time: float = 0.2) -> float:
    """Best-of-``repeat`` seconds per call (each repeat loops until ``min_time``)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            el = time.perf_counter() - t0
            if el >= min_time:
                break
        best = min(best, el / n)
    return best


def matmul_flops(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b)


def fresh(rep: Representation) -> Representation:
    # A new object per timing, so the commutant cache does not answer.
    return Representation(group=rep.group, permutations=rep.permutations, check=False)


def bench_bases(sides: list[int], max_dense: int) -> None:
    print("== 1. commutant basis: orbit weight sharing vs dense nullspace (SVD, float64)")
    print(
        f"{'group':5} {'map':16} {'d_in':>5} {'D=d_out*d_in':>12} {'dim':>7} {'orbits s':>10} {'dense s':>10} "
        f"{'ratio':>8} {'agree':>9}"
    )
    largest = (0, 0.0)  # (D, seconds) of the largest dense solve, for estimates
    for action in (ImageRotation90(), ImageDihedral()):
        g = action.group
        for side in sides:
            rep = Representation.from_action(action, (1, side, side))
            d = rep.dim
            for label, out in (("image->regular", Representation.regular(g)), ("image->image", rep)):
                big = d * out.dim
                t_orb = timeit(lambda o=out, r=rep: commutant_orbits(fresh(r), fresh(o)), repeat=1, min_time=0.0)
                labels, sizes = commutant_orbits(fresh(rep), fresh(out))
                dim = commutant_dimension(rep, out)
                assert sizes.numel() == dim, (sizes.numel(), dim)
                if big <= max_dense:
                    t0 = time.perf_counter()
                    basis = commutant_basis(fresh(rep), fresh(out))
                    t_dense = time.perf_counter() - t0
                    ob = torch.zeros(dim, big, dtype=torch.float64)
                    ob[labels, torch.arange(big)] = sizes.to(torch.float64).rsqrt()[labels]
                    flat = basis.reshape(basis.shape[0], -1)
                    # same space: the orbit basis lies in the dense span and dims match
                    err = float((ob - (ob @ flat.T) @ flat).abs().max()) if basis.shape[0] == dim else float("nan")
                    dense_s, ratio, agree = f"{t_dense:10.3f}", f"{t_dense / t_orb:8.0f}x", f"{err:9.1e}"
                    largest = max(largest, (big, t_dense))
                else:
                    est = largest[1] * (big / largest[0]) ** 3 if largest[0] else float("nan")
                    dense_s, ratio, agree = f"~{est:9.1e}", f"{'est.':>8}", f"{'skipped':>9}"
                print(f"{g.name:5} {label:16} {d:5d} {big:12d} {dim:7d} {t_orb:10.4f} {dense_s} {ratio} {agree}")
    print(
        f"(dense skipped when D > --max-dense={max_dense}; '~' is an O(D^3) extrapolation from the largest"
        " solved D: the SVD of the (|gens| D, D) constraint matrix costs O(D^3) time, O(D^2) memory)"
    )


def bench_layers(batch: int, dtype: torch.dtype) -> None:
    peak = matmul_flops(dtype)
    print(f"\n== 2. forward+backward, batch {batch}, {dtype}; measured matmul: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'layer':44} {'equiv ms':>9} {'dense ms':>9} {'ratio':>7} {'equiv GF/s':>10} {'params eq/dense':>16}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for action in (ImageRotation90(), ImageDihedral()):
        grp = action.group
        n = grp.order
        for side, c in ((16, 8), (32, 4)):
            rep = Representation.from_action(action, (1, side, side))
            d = rep.dim
            rows.append(
                (
                    f"LiftingLinear {grp.name} {side}x{side} -> {c}x|G|",
                    LiftingLinear(rep, c, dtype=dtype),
                    nn.Linear(d, c * n, dtype=dtype),
                    (batch, d),
                    2 * d * c * n,
                )
            )
        for c in (16, 64):
            rows.append(
                (
                    f"GroupLinear {grp.name} {c}x|G| -> {c}x|G|",
                    GroupLinear(grp, c, c, dtype=dtype),
                    nn.Linear(c * n, c * n, dtype=dtype),
                    (batch, c, n),
                    2 * (c * n) ** 2,
                )
            )
        rep = Representation.from_action(action, (1, 16, 16))
        rows.append(
            (
                f"EquivariantLinear(orbit) {grp.name} 256 -> 256",
                EquivariantLinear(rep, rep, dtype=dtype),
                nn.Linear(256, 256, dtype=dtype),
                (batch, 256),
                2 * 256 * 256,
            )
        )
        conv = LiftingConv2d(action, 8, 8, 3, dtype=dtype)
        rows.append(
            (
                f"LiftingConv2d {grp.name} 8 -> 8x|G|, 16x16",
                conv,
                nn.Conv2d(8, 8 * n, 3, padding=1, dtype=dtype),
                (batch // 4, 8, 16, 16),
                2 * 8 * 8 * n * 9 * 16 * 16,
            )
        )
    for name, eq, dense, shape, flops in rows:
        x = torch.randn(*shape, generator=gen, dtype=dtype)
        xd = x.reshape(shape[0], -1) if isinstance(dense, nn.Linear) else x

        def step(m, inp):
            m.zero_grad(set_to_none=True)
            m(inp).sum().backward()

        t_eq = timeit(lambda m=eq, inp=x: step(m, inp))
        t_dn = timeit(lambda m=dense, inp=xd: step(m, inp))
        p_eq = sum(p.numel() for p in eq.parameters())
        p_dn = sum(p.numel() for p in dense.parameters())
        achieved = 3 * flops * shape[0] / t_eq  # forward + two backward contractions
        print(
            f"{name:44} {t_eq * 1e3:9.3f} {t_dn * 1e3:9.3f} {t_eq / t_dn:7.2f} {achieved / 1e9:10.2f} "
            f"{p_eq:>7d}/{p_dn:<8d}"
        )
    print(
        "(equivariant layers build their weight by a gather from the shared parameters, then run the same"
        " dense contraction; the ratio is the cost of that gather and its backward scatter)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[8, 16, 32], help="image sides (d = side^2)")
    ap.add_argument(
        "--max-dense", type=int, default=2048, help="largest D = d_out*d_in for the dense SVD (D=4096 takes minutes)"
    )
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared box)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_bases(args.sides, args.max_dense)
    bench_layers(args.batch, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()

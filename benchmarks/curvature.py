"""Hessian trace, top eigenvalue and density: symgen.curvature vs PyHessian 0.1, in one process.

The same ~86k-parameter BatchNorm CNN (symgen.models.bn_cnn, width 39) on a batch of 512 digits,
eval-mode BatchNorm, mean cross-entropy. Prints values and their agreement on the SAME Rademacher
probes, times and ratios, the time to a 1%-standard-error trace, Hessian-vector product
strategies (and the generalized Gauss-Newton product beside them), the GGN's top eigenvalue next
to the Hessian's, and achieved FLOP/s next to the measured matmul FLOP/s.

    python benchmarks/curvature.py [--probes 100] [--batch 512] [--width 39] [--threads 2]
    python benchmarks/curvature.py --input cifar --width 30 ...   # CIFAR-shaped 3x32x32 random images
    python benchmarks/curvature.py --model resnet20 --batch 200 --sections eig ...   # the CIFAR ResNet-20

With ``--input cifar`` the inputs are random CIFAR-shaped images with random labels (no download);
width 30 gives the ~86k parameters of the digits model (88,270; width 39 would give 134k there).

PyHessian is optional (pip install pyhessian, the `bench` extra); without it the numbers recorded
in issue 4 are printed instead.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as TF
from peers import pyhessian_trace_to_rtol

from symgen.curvature import GGNOperator, HessianOperator
from symgen.models import bn_cnn, resnet20

RECORDED = """PyHessian 0.1 numbers recorded in issue 4 (same model size, batch 512, 2 cores, another machine):
  trace, 100 Rademacher probes: 3.8-4.9 s (one retained graph); naive torch.func forward-over-reverse loop 5.2 s;
  vmap over probes slower, up to 4 GB more memory
  top eigenvalue (power iteration, tol 1e-3): 0.33-0.41 s, 0.12% low
  density(): raises on current PyTorch (torch.eig was removed)"""


def matmul_flops(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def hvp_flops(H: HessianOperator, form: bool = False) -> tuple[float, float]:
    """(once, per probe) FLOPs of Hessian-vector products (``form``: of quadratic forms v^T H v, whose
    primal pass is shared by a call's probes), counted by torch's FlopCounterMode (matmuls and
    convolutions) on calls with one and with two vectors."""
    from torch.utils.flop_counter import FlopCounterMode

    apply = H.quadratic_forms if form else H.matmat
    apply(torch.randn(H.dim, 1, dtype=H.dtype))  # build the graph outside the count
    counts = []
    for k in (1, 2):
        with FlopCounterMode(display=False) as fc:
            apply(torch.randn(H.dim, k, dtype=H.dtype))
        counts.append(float(fc.get_total_flops()))
    return 2 * counts[0] - counts[1], counts[1] - counts[0]


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def pyhessian_probes(params: list[torch.Tensor], num: int, seed: int) -> torch.Tensor:
    """The probes PyHessian's trace() draws after torch.manual_seed(seed), as rows (m, n)."""
    torch.manual_seed(seed)
    rows = []
    for _ in range(num):
        v = [torch.randint_like(p, high=2) for p in params]
        for vi in v:
            vi[vi == 0] = -1
        rows.append(torch.cat([vi.reshape(-1) for vi in v]))
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--width", type=int, default=39)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=100, help="SGD steps before measuring (a trained point)")
    ap.add_argument("--rtol", type=float, default=0.01, help="target relative standard error of the trace")
    ap.add_argument("--max-probes", type=int, default=5000, help="cap on PyHessian's probes in the rtol run")
    ap.add_argument("--strategies", type=int, default=10, help="probes per HVP strategy comparison (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timings of the 100-probe trace, alternating order")
    ap.add_argument(
        "--model",
        choices=("bn_cnn", "resnet20"),
        default="bn_cnn",
        help="bn_cnn (width --width) or the CIFAR ResNet-20 of PyHessian's README (implies --input cifar)",
    )
    ap.add_argument(
        "--input",
        choices=("digits", "cifar"),
        default="digits",
        help="digits 8x8, or random CIFAR-shaped 3x32x32 images with random labels",
    )
    ap.add_argument("--eig-tol", type=float, default=1e-4, help="symgen Lanczos tolerance")
    ap.add_argument("--eig-criteria", default="residual,gap,change", help="symgen Lanczos stopping criteria")
    ap.add_argument("--pyhessian-tols", default="1e-3,1e-4,1e-5", help="PyHessian power-iteration tolerances")
    ap.add_argument("--ref-tol", type=float, default=1e-7, help="residual tolerance of the reference eigenvalue")
    ap.add_argument(
        "--no-taylor",
        dest="taylor",
        action="store_false",
        help="trace probes as v . (H v) instead of second-order Taylor-mode quadratic forms",
    )
    ap.add_argument(
        "--sections",
        default="trace,rtol,eig,density,strategies",
        help="comma-separated subset of trace,rtol,eig,density,strategies",
    )
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)

    from symgen.data import load_dataset

    if args.model == "resnet20":
        args.input = "cifar"
    if args.input == "digits":
        x, y = load_dataset("digits", "train")
    else:
        gx = torch.Generator().manual_seed(args.seed + 7)
        x = torch.rand(max(args.batch, 64), 3, 32, 32, generator=gx)
        y = torch.randint(0, 10, (x.shape[0],), generator=gx)
    torch.manual_seed(args.seed)
    model = resnet20() if args.model == "resnet20" else bn_cnn(tuple(x.shape[1:]), 10, args.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.train_steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        TF.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    xb, yb = x[: args.batch], y[: args.batch]
    n = sum(p.numel() for p in model.parameters())
    name = "CIFAR ResNet-20" if args.model == "resnet20" else f"BN CNN width {args.width}"
    print(
        f"model: {name}, {n} parameters; {args.input} inputs {tuple(xb.shape[1:])}, "
        f"batch {xb.shape[0]}; eval-mode BatchNorm; "
        f"{args.threads} threads (timings on a shared machine are noisy)"
    )
    peak = matmul_flops(torch.float32)
    H = HessianOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval")
    flops = hvp_flops(H)
    print(f"matmul: {peak / 1e9:.1f} GFLOP/s (float32, 1024^3); one HVP = {flops[1] / 1e9:.2f} GFLOP (FlopCounterMode)")
    if args.taylor:
        Ht = HessianOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval")
        flops = hvp_flops(Ht, form=True)
        print(
            f"one Taylor-mode quadratic form v^T H v = {flops[1] / 1e9:.2f} GFLOP, and {flops[0] / 1e9:.2f} GFLOP "
            "of primal pass per call" + ("" if Ht.taylor else " (Taylor mode does not apply to this model: v . H v)")
        )
        del Ht

    try:
        from pyhessian import hessian as PyHessian
    except ImportError:
        PyHessian = None
        print("PyHessian not installed (pip install pyhessian).\n" + RECORDED)

    # -- 1. trace with the same probes (also needed by the rtol and strategies sections) --
    if sections & {"trace", "rtol", "strategies"}:
        V, q_ours, t_py, t_ours, P = same_probe_trace(args, model, xb, yb, PyHessian, flops, peak)

    # -- 2. time to a trace with relative standard error rtol --
    if "rtol" in sections:
        time_to_rtol(args, model, xb, yb, q_ours, t_py, t_ours, P)
    if "eig" in sections:
        top_eigenvalue(args, model, xb, yb, PyHessian)
    if "density" in sections:
        density(args, model, xb, yb, PyHessian)
    if "strategies" in sections and args.strategies > 0:
        strategies(args, model, xb, yb, V, q_ours)


def same_probe_trace(args, model, xb, yb, PyHessian, flops: tuple[float, float], peak: float):
    """The trace on the same Rademacher probes, both tools, alternating order; (V, q_ours, t_py, t_ours, P)."""
    params = [p for p in model.parameters() if p.requires_grad]
    P = args.probes
    V = pyhessian_probes(params, P, args.seed + 1)

    def run_ours() -> tuple[torch.Tensor, float]:
        H = HessianOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval", taylor=args.taylor)
        t0 = time.perf_counter()
        q = H.quadratic_forms(V.T)  # columns; Taylor mode where the model allows (--no-taylor: v . H v)
        return q, time.perf_counter() - t0

    def run_pyhessian() -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        hc = PyHessian(model, TF.cross_entropy, data=(xb, yb), cuda=False)
        torch.manual_seed(args.seed + 1)
        q = torch.tensor(hc.trace(maxIter=P, tol=-math.inf))
        t = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return q, t

    # one untimed product each first: the process's first large allocations and oneDNN's primitive set-up
    # otherwise land on whichever tool runs first (symgen's first slot was 25% slower in session 5)
    HessianOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval", taylor=args.taylor).quadratic_forms(V[:1].T)
    if PyHessian is not None:
        PyHessian(model, TF.cross_entropy, data=(xb, yb), cuda=False).trace(maxIter=1, tol=-math.inf)
        model.zero_grad(set_to_none=True)
    # alternate the order (ours, theirs, theirs, ours, ...) so a change in machine load hits both
    times_ours, times_py, q_py = [], [], None
    for r in range(args.repeats):
        order = ("ours", "py") if r % 2 == 0 else ("py", "ours")
        for who in order:
            if who == "ours":
                q_ours, t = run_ours()
                times_ours.append(t)
            elif PyHessian is not None:
                q_py, t = run_pyhessian()
                times_py.append(t)
    t_ours = min(times_ours)
    rate = (flops[0] + flops[1] * P) / t_ours
    print(f"\n[trace, {P} Rademacher probes, graph built inside the timing, best of {args.repeats}]")
    print(
        f"  symgen  : {q_ours.mean():.4f} +- {q_ours.std() / math.sqrt(P):.4f}  {t_ours:.2f} s  "
        f"({rate / 1e9:.1f} GFLOP/s = {rate / peak:.0%} of matmul)"
    )
    t_py = None
    if q_py is not None:
        t_py = min(times_py)
        rel = float(((q_py - q_ours).abs() / q_ours.abs()).max())
        print(f"  PyHessian: {q_py.mean():.4f} +- {q_py.std() / math.sqrt(P):.4f}  {t_py:.2f} s")
        print(
            f"  same probes: max relative difference per probe {rel:.1e}; speed-up symgen/PyHessian "
            f"{t_py / t_ours:.2f}x (all times: symgen {[round(t, 2) for t in times_ours]}, "
            f"PyHessian {[round(t, 2) for t in times_py]})"
        )
    return V, q_ours, t_py, t_ours, P


def time_to_rtol(args, model, xb, yb, q_ours, t_py, t_ours, P) -> None:
    per_probe = (t_py if t_py is not None else t_ours) / P
    need = (float(q_ours.std()) / (args.rtol * abs(float(q_ours.mean())))) ** 2
    H = HessianOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval", taylor=args.taylor)
    est, t_defl = timed(
        H.trace, 20, torch.Generator().manual_seed(args.seed + 2), method="deflated", rtol=args.rtol, max_matvecs=2000
    )
    print(f"\n[time to a trace with {args.rtol:.0%} relative standard error, both run]")
    print(
        f"  symgen Lanczos-deflated: {est.value:.4f} +- {est.stderr:.4f} ({est.relative_stderr:.2%}) from "
        f"{est.num_matvecs} products, {t_defl:.2f} s"
    )
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print(f"  Hutchinson: needs ~{need:.0f} probes -> ~{need * per_probe:.1f} s (extrapolated: no PyHessian)")
        return
    # PyHessian's Hutchinson, run in blocks of 20 probes until its standard error reaches rtol (or the cap)
    mean, rse, n, t_p = pyhessian_trace_to_rtol(model, (xb, yb), args.rtol, args.max_probes, 20, args.seed + 2)
    capped = " (stopped at --max-probes: NOT reached)" if rse > args.rtol else ""
    print(f"  PyHessian Hutchinson: {mean:.4f} ({rse:.2%}) from {n} probes, {t_p:.2f} s{capped}")
    print(
        f"  -> time to {args.rtol:.0%} SE: symgen {t_p / t_defl:.1f}x shorter (target >= 3x); values differ by "
        f"{(est.value - mean) / math.hypot(est.stderr, rse * abs(mean)):+.2f} "
        "combined SE"
    )


def top_eigenvalue(args, model, xb, yb, PyHessian) -> None:
    H = HessianOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval")
    ref = H.eigenpairs(1, tol=args.ref_tol, max_steps=300, generator=torch.Generator().manual_seed(99))
    lam = float(ref.values[0])
    print(
        f"\n[top eigenvalue; reference {lam:.6f} = Lanczos to residual {args.ref_tol:g} ({ref.num_matvecs} products)]"
    )
    t_eigs = {}
    e = args.eig_tol
    criteria = {
        "residual": (f"residual <= {e:g} |theta|", dict(tol=e)),
        "gap": (f"min(r, r^2/gap) <= {e:g} |theta|", dict(tol=e, criterion="gap")),
        "change": (f"change <= {e:g} |theta|", dict(tol=e, criterion="change")),
    }
    for label, kw in [criteria[c] for c in args.eig_criteria.split(",")]:
        H = HessianOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval")
        pairs, t_eig = timed(H.eigenpairs, 1, generator=torch.Generator().manual_seed(args.seed + 3), **kw)
        t_eigs[label] = t_eig
        print(
            f"  symgen Lanczos, {label}: {float(pairs.values[0]):.6f}, relative error "
            f"{abs(float(pairs.values[0]) - lam) / lam:.1e}, {pairs.num_matvecs} products, {t_eig:.2f} s"
        )
    G = GGNOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval")
    gp, t_g = timed(G.eigenpairs, 1, tol=1e-4, generator=torch.Generator().manual_seed(args.seed + 3))
    print(
        f"  symgen GGN (J^T H_loss J) top eigenvalue, residual <= 1e-4: {float(gp.values[0]):.6f} "
        f"({float(gp.values[0]) / lam:.3f} of the Hessian's), {gp.num_matvecs} products, {t_g:.2f} s"
    )
    if PyHessian is not None:
        import sys

        ph = sys.modules["pyhessian.hessian"]  # the package re-exports the class under the module's name

        count = {"n": 0}
        orig = ph.hessian_vector_product

        def counted(*a, **k):
            count["n"] += 1
            return orig(*a, **k)

        ph.hessian_vector_product = counted
        for tol in [float(t) for t in args.pyhessian_tols.split(",")]:
            count["n"] = 0
            t0 = time.perf_counter()
            hc = PyHessian(model, TF.cross_entropy, data=(xb, yb), cuda=False)
            torch.manual_seed(args.seed + 3)
            ev, _ = hc.eigenvalues(maxIter=200, tol=tol, top_n=1)
            t_pe = time.perf_counter() - t0
            print(
                f"  PyHessian power iteration (tol {tol:.0e}{', its default' if tol == 1e-3 else ''}): {ev[0]:.6f}, "
                f"relative error {abs(ev[0] - lam) / lam:.1e}, {count['n']} products, {t_pe:.2f} s"
            )
            for label, t in t_eigs.items():
                print(f"    time ratio PyHessian / symgen [{label}]: {t_pe / t:.2f}x")
            model.zero_grad(set_to_none=True)
        ph.hessian_vector_product = orig


def density(args, model, xb, yb, PyHessian) -> None:
    H = HessianOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval")
    dens, t_d = timed(H.density, 50, 1, torch.Generator().manual_seed(args.seed + 4))
    print("\n[spectral density, SLQ]")
    print(
        f"  symgen: 1 run x 50 Lanczos steps, {t_d:.2f} s; nodes in [{float(dens.nodes.min()):.3f}, "
        f"{float(dens.nodes.max()):.3f}], SLQ trace {dens.trace():.3f}"
    )
    if PyHessian is not None:
        hc = PyHessian(model, TF.cross_entropy, data=(xb, yb), cuda=False)
        try:
            hc.density(iter=5, n_v=1)
            print("  PyHessian density(): ran")
        except Exception as e:  # noqa: BLE001 - the point is to show what it raises
            print(f"  PyHessian density(): {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        model.zero_grad(set_to_none=True)


def strategies(args, model, xb, yb, V, q_ours) -> None:
    if True:
        m = args.strategies
        W = V[:m]
        print(f"\n[HVP strategies, {m} products each, graph build included]")
        for label, kw in [
            ("retained graph, loop (default)", dict(hvp_mode="reverse", batching="loop")),
            ("forward-over-reverse, loop", dict(hvp_mode="forward", batching="loop")),
            (
                f"retained graph, vmap chunk {min(m, 5)}",
                dict(hvp_mode="reverse", batching="vmap", chunk_size=min(m, 5)),
            ),
        ]:
            Hs = HessianOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval", **kw)
            out, t = timed(Hs.matmat, W.T)
            err = float(((W * out.T).sum(1) - q_ours[:m]).abs().max() / q_ours[:m].abs().max())
            print(f"  {label:38s} {t:6.2f} s  ({t / m * 1000:.0f} ms/product, max rel. diff {err:.1e})")
        # the GGN product costs about as much; its quadratic forms are the PSD part of the Hessian's
        G = GGNOperator(model, TF.cross_entropy, (xb, yb), bn_mode="eval")
        out, t = timed(G.matmat, W.T)
        print(
            f"  {'GGN J^T H_loss J, retained graph, loop':38s} {t:6.2f} s  ({t / m * 1000:.0f} ms/product, "
            f"mean z^T G z {float((W * out.T).sum(1).mean()):.3f} vs z^T H z {float(q_ours[:m].mean()):.3f})"
        )


if __name__ == "__main__":
    main()

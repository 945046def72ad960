"""Top Hessian eigenvalue to 1e-3 relative: symgen (Lanczos, stopped by the residual bound) vs PyHessian 0.1 (power
iteration, its tol=1e-3), alternately in one process, on a CIFAR ResNet-20 (batch 200, eval-mode BatchNorm) at
three seeds and on the ~86k-parameter BatchNorm CNN of benchmarks/curvature.py (digits, width 39, batch 512).

    python benchmarks/eigenvalues.py [--quick] [--threads 2] [--repeats 2] [--json-out rows.json]

Each tool's error is against a tight reference: symgen Lanczos from another start vector until its residual bound
r <= 1e-8 |theta| (|lambda - theta| <= r for an eigenvalue lambda; Parlett, The Symmetric Eigenvalue Problem, Thm
4.5.1). Each timed call builds its own graph (a fresh operator / a fresh ``pyhessian.hessian``), so the times
include one forward and backward pass each. Also printed: the products each tool used, the cost of one
Hessian-vector product on a kept graph (each tool's own) against one gradient, and the load average. PyHessian is
optional (pip install pyhessian); without it only symgen's side runs. ``rows(quick)`` gives the rows of
benchmarks/peers_table.py (ratio = PyHessian time / symgen time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import torch
import torch.nn.functional as TF
from peers_common import alternate, loadavg, rel_err, row

from symgen.curvature import HessianOperator
from symgen.models import bn_cnn, resnet20

TOL = 1e-3
REF_TOL = 1e-8
OPERATION = "top Hessian eigenvalue to 1e-3"


def resnet20_setup(seed: int, batch: int = 200) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """CIFAR ResNet-20 at its seeded initialization, random CIFAR-shaped images and labels, BatchNorm statistics
    from one pass, eval mode (as benchmarks/resnet.py)."""
    torch.manual_seed(seed)
    model = resnet20()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x, y


def bn_cnn_setup(
    seed: int = 0, batch: int = 512, width: int = 39
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The BatchNorm CNN of benchmarks/curvature.py: digits 8x8, width 39 (86k parameters), 100 SGD steps, eval."""
    from symgen.data import load_dataset

    x, y = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = bn_cnn(tuple(x.shape[1:]), 10, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        TF.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), x[:batch], y[:batch]


def _pyhessian_counter() -> tuple[Any, dict[str, int]] | None:
    """PyHessian's class and a counter of its Hessian-vector products (its module function, patched)."""
    try:
        from pyhessian import hessian as PyHessian
    except ImportError:
        return None
    ph = sys.modules["pyhessian.hessian"]  # the package re-exports the class under the module's name
    count = {"n": 0}
    orig = ph.hessian_vector_product
    if not getattr(orig, "_counted", False):

        def counted(*a: Any, **k: Any) -> Any:
            count["n"] += 1
            return orig(*a, **k)

        counted._counted = True  # type: ignore[attr-defined]
        counted._count = count  # type: ignore[attr-defined]
        ph.hessian_vector_product = counted
    else:
        count = orig._count
    return PyHessian, count


def product_costs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """Seconds of one gradient and of one Hessian-vector product on a kept graph, symgen's and PyHessian's,
    alternately (median of ``repeats``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianOperator(model, TF.cross_entropy, (x, y))
    v = torch.randn(H.dim, generator=torch.Generator().manual_seed(7))
    H.matvec(v)  # builds the graph
    fns = {
        "gradient": lambda: torch.autograd.grad(TF.cross_entropy(model(x), y), params),
        "symgen": lambda: H.matvec(v),
    }
    found = _pyhessian_counter()
    if found is not None:
        from pyhessian.utils import hessian_vector_product

        hc = found[0](model, TF.cross_entropy, data=(x, y), cuda=False)
        vs = [t.reshape(p.shape) for t, p in zip(v.split([p.numel() for p in params]), params, strict=True)]
        fns["pyhessian"] = lambda: hessian_vector_product(hc.gradsH, hc.params, vs)
    times, _ = alternate(fns, repeats)
    model.zero_grad(set_to_none=True)
    return times


def compare(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, repeats: int) -> dict:
    """One row: both tools' time to the top eigenvalue at tol 1e-3, products, errors against the reference."""
    ref = HessianOperator(model, TF.cross_entropy, (x, y)).eigenpairs(
        1, tol=REF_TOL, max_steps=300, generator=torch.Generator().manual_seed(99)
    )
    lam = float(ref.values[0])
    print(
        f"\n== {name}, seed {seed}: reference {lam:.7f} (Lanczos, r <= {REF_TOL:g} |theta|: "
        f"{ref.num_matvecs} products, bound {float(ref.relative_error_bounds[0]):.1e}) | load {loadavg()} =="
    )

    def run_symgen() -> Any:
        H = HessianOperator(model, TF.cross_entropy, (x, y))
        return H.eigenpairs(1, tol=TOL, generator=torch.Generator().manual_seed(seed))

    fns: dict[str, Any] = {"symgen": run_symgen}
    found = _pyhessian_counter()
    if found is not None:
        PyHessian, count = found

        def run_pyhessian() -> tuple[float, int]:
            count["n"] = 0
            hc = PyHessian(model, TF.cross_entropy, data=(x, y), cuda=False)
            torch.manual_seed(seed)  # PyHessian draws its start vector from the global generator
            ev, _ = hc.eigenvalues(maxIter=200, tol=TOL, top_n=1)
            model.zero_grad(set_to_none=True)
            return float(ev[0]), count["n"]

        fns["pyhessian"] = run_pyhessian
    times, outs = alternate(fns, repeats, warmup=False)
    pairs = outs["symgen"]
    s_val = float(pairs.values[0])
    s_err = rel_err(s_val, lam)
    bound = float(pairs.relative_error_bounds[0])
    print(
        f"  symgen Lanczos (residual bound <= {TOL:g}): {s_val:.7f}, error {s_err:.1e} (its bound {bound:.1e}), "
        f"{pairs.num_matvecs} products, {times['symgen']:.2f} s | load {loadavg()}"
    )
    fields: dict[str, Any] = dict(
        symgen_s=times["symgen"],
        symgen_err=s_err,
        symgen_bound=bound,
        symgen_products=pairs.num_matvecs,
        reference=f"Lanczos r <= {REF_TOL:g}",
        repeats=repeats,
        seed=seed,
    )
    if "pyhessian" in outs and not isinstance(outs["pyhessian"], Exception):
        p_val, p_n = outs["pyhessian"]
        p_err = rel_err(p_val, lam)
        print(
            f"  PyHessian power iteration (tol {TOL:g}): {p_val:.7f}, error {p_err:.1e}, {p_n} products, "
            f"{times['pyhessian']:.2f} s | load {loadavg()}"
        )
        print(f"  -> PyHessian / symgen time: {times['pyhessian'] / times['symgen']:.2f}x")
        fields.update(peer_s=times["pyhessian"], peer_err=p_err, peer_products=p_n)
    else:
        fields["note"] = "PyHessian not installed" if found is None else f"PyHessian failed: {outs.get('pyhessian')}"
    fields["note"] = fields.get("note", "") or (
        f"products {pairs.num_matvecs} vs {fields.get('peer_products', '-')}; symgen's bound {bound:.0e}"
    )
    return row(OPERATION, name, "PyHessian", **fields)


def rows(quick: bool = False, threads: int | None = None, repeats: int | None = None) -> list[dict[str, Any]]:
    """ResNet-20 (batch 200, eval BatchNorm) at seeds 0, 1, 2 and the 86k BN CNN: symgen vs PyHessian at tol 1e-3.

    Args:
        quick: one timed call per tool (else ``repeats``, default 2, alternating) and no product-cost section.
        threads: torch threads (None: leave as set).
        repeats: timed calls per tool.

    Returns:
        rows (peers_common.row) with symgen_s, peer_s, symgen_err, peer_err (relative, against the reference),
        symgen_bound (the relative bound symgen stopped on), symgen_products, peer_products, seed, load.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    reps = repeats if repeats is not None else (1 if quick else 2)
    out = []
    for seed in (0, 1, 2):
        model, x, y = resnet20_setup(seed)
        out.append(compare("CIFAR ResNet-20, batch 200", model, x, y, seed, reps))
    model, x, y = bn_cnn_setup()
    out.append(compare("BN CNN 86k (digits), batch 512", model, x, y, 0, reps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--costs", action="store_true", help="also time one product against one gradient")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s); timings on a shared machine are noisy: load average printed beside each")
    if args.costs:
        for name, setup in (("ResNet-20", lambda: resnet20_setup(0)), ("BN CNN", bn_cnn_setup)):
            model, x, y = setup()
            t = product_costs(model, x, y)
            line = ", ".join(f"{k} {v:.3f} s" for k, v in t.items())
            extra = f"; PyHessian / symgen per product {t['pyhessian'] / t['symgen']:.2f}x" if "pyhessian" in t else ""
            print(f"one product on a kept graph, {name}: {line}{extra} | load {loadavg()}")
    result = rows(args.quick, repeats=args.repeats)
    ratios = [r["peer_s"] / r["symgen_s"] for r in result if isinstance(r.get("peer_s"), float)]
    if ratios:
        print(f"\nratios PyHessian / symgen: {', '.join(f'{q:.2f}x' for q in ratios)} (goal >= 2x)")
        print(f"geometric mean {math.exp(sum(math.log(q) for q in ratios) / len(ratios)):.2f}x; load {os.getloadavg()}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()

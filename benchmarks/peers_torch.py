"""The PyTorch peers of the peers table (run in .venv-peers by benchmarks/peers_table.py; writes JSON rows).

Curvature (Hessian trace, top eigenvalue, HVP) on the CIFAR ResNet-20 and the 86k BN CNN against PyHessian,
hessian-eigenthings and curvlinops; GGN product, trace and exact diagonal against curvlinops and BackPACK; a C4 / D4
G-CNN training step against e2cnn; an ensemble epoch against torchensemble and a Python loop. symgen's side goes
through its public API only. Errors are measured against references computed with plain torch.autograd in
float64 (never by the tools compared), outside the timings.

    python benchmarks/peers_torch.py --json rows.json [--quick] [--only REGEX] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as TF
from peers_common import alternate, failure, guarded, rel_err, row, wanted
from torch import nn

warnings.filterwarnings("ignore")
F64 = torch.float64


# ---------------------------------------------------------------- float64 references (plain torch.autograd)
def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def split_like(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params:
        out.append(v[i : i + p.numel()].view_as(p).to(p.dtype))
        i += p.numel()
    return out


class Ref64:
    """Float64 copy of a model on one batch: Hessian / GGN products and forms, the exact GGN diagonal and the top
    Hessian eigenvalue (ARPACK), by plain torch.autograd / torch.func on a kept graph."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model = copy.deepcopy(model).to(F64).eval()
        self.x, self.y = x.to(F64), y
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        self._grad = None

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        if self._grad is None:
            loss = TF.cross_entropy(self.model(self.x), self.y)
            self._grad = torch.autograd.grad(loss, self.params, create_graph=True)
        return flat(torch.autograd.grad(self._grad, self.params, split_like(v.to(F64), self.params), retain_graph=True))

    def hessian_forms(self, Z: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.dot(z.to(F64), self.hvp(z)) for z in Z])

    def _f(self):
        from torch.func import functional_call

        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        buffers = dict(self.model.named_buffers())

        def f(*ps):
            return functional_call(self.model, {**dict(zip(names, ps, strict=True)), **buffers}, (self.x,))

        return f

    def ggn_mv(self, v: torch.Tensor) -> torch.Tensor:
        from torch.func import jvp, vjp

        f = self._f()
        ps = tuple(p.detach() for p in self.params)
        out, jv = jvp(f, ps, tuple(split_like(v.to(F64), self.params)))
        p = out.softmax(-1)
        hjv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / out.shape[0]
        return flat(vjp(f, *ps)[1](hjv))

    def ggn_forms(self, Z: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.dot(z.to(F64), self.ggn_mv(z)) for z in Z])

    def ggn_diag(self, chunk: int = 32) -> torch.Tensor:
        """diag(J^T H J) / N from per-sample Jacobians (vmap of jacrev), in chunks of samples."""
        from torch.func import functional_call, jacrev, vmap

        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        buffers = dict(self.model.named_buffers())
        ps = {n: p.detach() for n, p in zip(names, self.params, strict=True)}

        def one(p, xi):
            return functional_call(self.model, {**p, **buffers}, (xi[None],))[0]

        diag = torch.zeros(self.dim, dtype=F64)
        n = self.x.shape[0]
        for s in range(0, n, chunk):
            xb = self.x[s : s + chunk]
            J = vmap(jacrev(one), in_dims=(None, 0))(ps, xb)  # name -> (B, C, *shape)
            Jf = torch.cat([J[k].reshape(xb.shape[0], J[k].shape[1], -1) for k in names], dim=-1)  # (B, C, P)
            p = functional_call(self.model, {**ps, **buffers}, (xb,)).softmax(-1)
            H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            diag += torch.einsum("nap,nab,nbp->p", Jf, H, Jf)
        return diag / n

    def top_eigenvalue(self, tol: float = 1e-8) -> tuple[float, int]:
        import numpy as np
        from scipy.sparse.linalg import LinearOperator, eigsh

        count = [0]

        def mv(v):
            count[0] += 1
            return self.hvp(torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1))).numpy()

        op = LinearOperator((self.dim, self.dim), matvec=mv, dtype=np.float64)
        v0 = np.random.default_rng(0).standard_normal(self.dim)
        val = eigsh(op, k=1, which="LA", tol=tol, ncv=min(20, self.dim - 1), v0=v0, return_eigenvectors=False)
        return float(val[0]), count[0]


# ---------------------------------------------------------------- probes of each tool (for the error columns)
def rademacher_symgen(m: int, n: int, seed: int) -> torch.Tensor:
    from symgen import rng

    return rng.rademacher((m, n), rng.as_generator(seed), dtype=F64)


def rademacher_pyhessian(params, m: int, seed: int) -> torch.Tensor:
    from curvature import pyhessian_probes

    return pyhessian_probes(params, m, seed)


def rademacher_curvlinops(m: int, n: int, seed: int) -> torch.Tensor:
    from curvlinops.sampling import random_vector

    torch.manual_seed(seed)
    return torch.stack([random_vector(n, "rademacher", torch.device("cpu"), torch.float32) for _ in range(m)])


def rademacher_eigenthings(m: int, n: int, seed: int) -> torch.Tensor:
    from hessian_eigenthings.algorithms.trace import _draw, _generator  # its own probe drawing, replayed
    from hessian_eigenthings.linalg import SingleDeviceBackend

    gen, probe = _generator(seed), torch.empty(n)
    return torch.stack([_draw("rademacher", probe, gen, SingleDeviceBackend()) for _ in range(m)])


def form_error(samples, Z: torch.Tensor, ref_forms) -> float:
    """Max relative error of a tool's per-probe forms z^T A z against float64 forms on the same probes."""
    if samples is None or isinstance(samples, Exception):
        return math.nan
    s = torch.as_tensor(samples, dtype=F64).reshape(-1)[: Z.shape[0]]
    r = ref_forms(Z[: s.numel()])
    return float(((s - r).abs() / r.abs().clamp_min(1e-300)).max())


# ---------------------------------------------------------------- models and data
def cifar_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """A few SGD steps (train mode) from the seeded init, then eval mode: a point off initialization."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        TF.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def curvature_models(args) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    from symgen.data import load_dataset
    from symgen.models import bn_cnn, resnet20

    def seeded(fn):
        torch.manual_seed(args.seed)
        return fn()

    x, y = cifar_batch(args.resnet_batch, args.seed)
    xd, yd = load_dataset("digits", "train")
    xd, yd = xd[: args.cnn_batch], yd[: args.cnn_batch]
    return [
        (
            f"ResNet-20 (269,722 p), batch {args.resnet_batch}",
            lambda: trained(seeded(resnet20), x, y, args.train_steps),
            x,
            y,
        ),
        (
            f"BN CNN (86,200 p), digits batch {args.cnn_batch}",
            lambda: trained(seeded(lambda: bn_cnn(tuple(xd.shape[1:]), 10, 39)), xd, yd, args.train_steps),
            xd,
            yd,
        ),
    ]


# ---------------------------------------------------------------- Hessian: trace, top eigenvalue, HVP
def hessian_rows(args, label: str, build, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    ops = {
        "trace": [("Hessian trace", p) for p in ("PyHessian", "hessian-eigenthings", "curvlinops")],
        "eig": [
            ("top eigenvalue, tol 1e-3", p)
            for p in (
                "PyHessian",
                "PyHessian (tol 1e-4)",
                "hessian-eigenthings (defaults)",
                "hessian-eigenthings (matched accuracy)",
            )
        ],
        "hvp": [("HVP", p) for p in ("hessian-eigenthings", "curvlinops")],
    }
    todo = {k: [s for s in v if wanted(args.only, s[0], label, s[1])] for k, v in ops.items()}
    if not any(todo.values()):
        return []
    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    n, N = sum(p.numel() for p in params), x.shape[0]
    ref = Ref64(model, x, y)
    rows: list[dict] = []
    from symgen.curvature import HessianOperator

    def symgen_op():
        return HessianOperator(model, TF.cross_entropy, (x, y))

    peers = {}
    try:
        from pyhessian import hessian as PyHessian

        peers["PyHessian"] = lambda: PyHessian(model, TF.cross_entropy, data=(x, y), cuda=False)
    except Exception as e:  # noqa: BLE001
        peers["PyHessian"] = e
    try:
        import hessian_eigenthings as he

        peers["hessian-eigenthings"] = lambda: he.HessianOperator(model, [(x, y)], he.supervised_loss(TF.cross_entropy))
    except Exception as e:  # noqa: BLE001
        peers["hessian-eigenthings"] = e
    try:
        from curvlinops import HessianLinearOperator

        peers["curvlinops"] = lambda: HessianLinearOperator(
            model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False, num_data=N
        )
    except Exception as e:  # noqa: BLE001
        peers["curvlinops"] = e

    def unavailable(op, peer_key, peer_label):
        p = peers[peer_key]
        return row(op, label, peer_label, note=f"not installed: {failure(p)}") if isinstance(p, Exception) else None

    m, seed = args.probes, args.seed
    # ---- trace: m Rademacher probes each, fresh operator per call (graph build included)
    if todo["trace"]:
        op_name = f"Hessian trace, {m} probes"
        fns = {"symgen": lambda: symgen_op().trace(m, generator=seed)}
        if not isinstance(peers["PyHessian"], Exception):

            def ph():
                hc = peers["PyHessian"]()
                torch.manual_seed(seed)
                qs = hc.trace(maxIter=m, tol=-math.inf)
                model.zero_grad(set_to_none=True)
                return qs

            fns["PyHessian"] = ph
        if not isinstance(peers["hessian-eigenthings"], Exception):
            from hessian_eigenthings import hutchinson

            fns["hessian-eigenthings"] = lambda: hutchinson(peers["hessian-eigenthings"](), num_samples=m, seed=seed)
        if not isinstance(peers["curvlinops"], Exception):
            from curvlinops import hutchinson_trace

            def cl():
                A = peers["curvlinops"]()
                torch.manual_seed(seed)
                return hutchinson_trace(A, m)

            fns["curvlinops"] = cl
        times, outs = alternate(fns, args.repeats, warmup=False)
        c = min(args.check, m)
        s_out = outs["symgen"]
        s_err = form_error(
            None if isinstance(s_out, Exception) else s_out.samples, rademacher_symgen(c, n, seed), ref.hessian_forms
        )
        errs = {}
        if "PyHessian" in outs:
            errs["PyHessian"] = form_error(outs["PyHessian"], rademacher_pyhessian(params, c, seed), ref.hessian_forms)
        if "hessian-eigenthings" in outs and not isinstance(outs["hessian-eigenthings"], Exception):
            Z = rademacher_eigenthings(c, n, seed)
            errs["hessian-eigenthings"] = form_error(outs["hessian-eigenthings"].samples, Z, ref.hessian_forms)
        if "curvlinops" in outs and not isinstance(outs["curvlinops"], Exception):
            Z = rademacher_curvlinops(c, n, seed)
            A = peers["curvlinops"]()
            errs["curvlinops"] = form_error((Z * (A @ Z.T).T).sum(1), Z, ref.hessian_forms)
        for _op, peer in todo["trace"]:
            bad = unavailable(op_name, peer, peer)
            if bad:
                rows.append(bad)
                continue
            note = "" if not isinstance(outs.get(peer), Exception) else failure(outs[peer])
            if isinstance(s_out, Exception):
                note = f"symgen: {failure(s_out)} " + note
            rows.append(
                row(
                    op_name,
                    label,
                    peer,
                    symgen_s=times["symgen"],
                    peer_s=times.get(peer, math.nan),
                    symgen_err=s_err,
                    peer_err=errs.get(peer, math.nan),
                    reference=f"float64 z^T H z on each tool's own probes (max rel. over {c})",
                    repeats=args.repeats,
                    note=note,
                )
            )
    # ---- HVP: one product from a fresh operator (graph build included)
    if todo["hvp"]:
        v = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
        fns = {"symgen": lambda: symgen_op().matvec(v)}
        if not isinstance(peers["hessian-eigenthings"], Exception):
            fns["hessian-eigenthings"] = lambda: peers["hessian-eigenthings"]().matvec(v)
        if not isinstance(peers["curvlinops"], Exception):
            fns["curvlinops"] = lambda: peers["curvlinops"]() @ v
        times, outs = alternate(fns, args.repeats, warmup=True)
        hv = ref.hvp(v)
        for _op, peer in todo["hvp"]:
            bad = unavailable("HVP", peer, peer)
            rows.append(
                bad
                or row(
                    "HVP (fresh operator, graph built)",
                    label,
                    peer,
                    symgen_s=times["symgen"],
                    peer_s=times.get(peer, math.nan),
                    symgen_err=rel_err(outs["symgen"], hv),
                    peer_err=rel_err(outs.get(peer), hv),
                    reference="float64 H v (max abs err / max abs)",
                    repeats=args.repeats,
                    note=failure(outs[peer]) if isinstance(outs.get(peer), Exception) else "",
                )
            )
    # ---- top eigenvalue at 1e-3
    if todo["eig"]:
        lam, nref = ref.top_eigenvalue()
        fns = {"symgen": lambda: float(symgen_op().eigenvalues(k=1, tol=1e-3)[0])}
        if not isinstance(peers["PyHessian"], Exception):

            def ph_eig(tol: float = 1e-3):
                hc = peers["PyHessian"]()
                torch.manual_seed(seed)
                vals, _ = hc.eigenvalues(maxIter=100, tol=tol, top_n=1)
                model.zero_grad(set_to_none=True)
                return float(vals[0])

            fns["PyHessian"] = ph_eig
            if any(p == "PyHessian (tol 1e-4)" for _, p in todo["eig"]):
                # its stop is a relative change of the iterate, not an error bound: at tol 1e-3 it often lands
                # above 1e-3 error; tol 1e-4 is the time it takes to be within 1e-3
                fns["PyHessian (tol 1e-4)"] = lambda: ph_eig(1e-4)
        matched_note = ""
        if not isinstance(peers["hessian-eigenthings"], Exception):
            from hessian_eigenthings import lanczos, lanczos_tridiagonal

            fns["hessian-eigenthings (defaults)"] = lambda: float(
                lanczos(peers["hessian-eigenthings"](), seed=0).eigenvalues[0]
            )
            if any(p.endswith("(matched accuracy)") for _, p in todo["eig"]):
                # the fewest Lanczos steps (from its own start vector, seed 0) whose top Ritz value is within 1e-3
                # of the reference: chosen with the reference's help, so a lower bound on its cost at 1e-3
                gen = torch.Generator().manual_seed(0)
                v0 = torch.randn(n, generator=gen)
                steps_max = 30
                td = lanczos_tridiagonal(peers["hessian-eigenthings"](), v0, steps_max, reorthogonalize=True)
                a, b = td.alphas.double(), td.betas.double()
                k_star = None
                for k in range(1, a.numel() + 1):
                    T = torch.diag(a[:k]) + torch.diag(b[: k - 1], 1) + torch.diag(b[: k - 1], -1)
                    if abs(float(torch.linalg.eigvalsh(T)[-1]) - lam) <= 1e-3 * abs(lam):
                        k_star = k
                        break
                if k_star is None:
                    matched_note = f"not within 1e-3 after {steps_max} steps"
                else:
                    matched_note = f"{k_star} Lanczos steps (fewest within 1e-3, chosen with the reference)"
                    fns["hessian-eigenthings (matched accuracy)"] = lambda: float(
                        lanczos(peers["hessian-eigenthings"](), k=1, max_iter=max(k_star, 1), seed=0).eigenvalues[0]
                    )
        times, outs = alternate(fns, args.repeats, warmup=False)
        for op, peer in todo["eig"]:
            key = "hessian-eigenthings" if peer.startswith("hessian-eigenthings") else peer.split(" (")[0]
            bad = unavailable(op, key, peer)
            if bad:
                rows.append(bad)
                continue
            o = outs.get(peer)
            note = failure(o) if isinstance(o, Exception) else ""
            if peer.endswith("(matched accuracy)"):
                note = matched_note
            elif peer.endswith("(defaults)"):
                note = "lanczos(op): k=10, 20 steps"
            elif peer == "PyHessian":
                note = "power iteration, tol 1e-3"
            elif peer == "PyHessian (tol 1e-4)":
                note = "power iteration, tol 1e-4: its time to an error within 1e-3"
            rows.append(
                row(
                    op,
                    label,
                    peer,
                    symgen_s=times["symgen"],
                    peer_s=times.get(peer, math.nan),
                    symgen_err=rel_err(outs["symgen"], lam),
                    peer_err=rel_err(o, lam) if o is not None else math.nan,
                    reference=f"float64 ARPACK lambda_max = {lam:.6g} ({nref} products)",
                    repeats=args.repeats,
                    note=note,
                )
            )
    return rows


# ---------------------------------------------------------------- GGN: product, trace, exact diagonal
def ggn_rows(args, label: str, build, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    specs = [
        ("GGN product", "curvlinops"),
        ("GGN product", "BackPACK"),
        ("GGN trace", "curvlinops"),
        ("GGN trace", "BackPACK"),
        ("GGN exact diagonal", "BackPACK"),
    ]
    todo = [s for s in specs if wanted(args.only, s[0], label, s[1])]
    if not todo:
        return []
    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    n, N, m, seed = sum(p.numel() for p in params), x.shape[0], args.probes, args.seed
    ref = Ref64(model, x, y)
    from symgen.curvature import GGNOperator

    def symgen_op():
        return GGNOperator(model, TF.cross_entropy, (x, y))

    cl_op = bp = None
    reasons = {}
    try:
        from curvlinops import GGNLinearOperator

        def cl_op():
            return GGNLinearOperator(
                model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False, num_data=N
            )
    except Exception as e:  # noqa: BLE001
        reasons["curvlinops"] = f"not installed: {failure(e)}"
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

        bp_model = extend(copy.deepcopy(model).eval())
        bp_loss = extend(nn.CrossEntropyLoss())
        bp_params = [p for p in bp_model.parameters() if p.requires_grad]
        bp = True
    except Exception as e:  # noqa: BLE001
        reasons["BackPACK"] = f"not installed: {failure(e)}"
    rows: list[dict] = []
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2))

    def bp_product():
        out = bp_model(x)
        loss = bp_loss(out, y)
        return flat(ggn_vector_product_from_plist(loss, out, bp_params, split_like(v, bp_params)))

    def bp_diag():
        bp_model.zero_grad(set_to_none=True)
        with backpack(DiagGGNExact()):
            bp_loss(bp_model(x), y).backward()
        d = flat([p.diag_ggn_exact for p in bp_params])
        bp_model.zero_grad(set_to_none=True)
        return d

    def emit(op, peer, times, outs, s_err, p_err, reference, note=""):
        if peer in reasons:
            rows.append(row(op, label, peer, note=reasons[peer]))
            return
        o = outs.get(peer)
        rows.append(
            row(
                op,
                label,
                peer,
                symgen_s=times.get("symgen", math.nan),
                peer_s=times.get(peer, math.nan),
                symgen_err=s_err,
                peer_err=p_err,
                reference=reference,
                repeats=args.repeats,
                note=failure(o) if isinstance(o, Exception) else note,
            )
        )

    if any(op == "GGN product" for op, _ in todo):
        fns = {"symgen": lambda: symgen_op().matvec(v)}
        if cl_op:
            fns["curvlinops"] = lambda: cl_op() @ v
        if bp:
            fns["BackPACK"] = bp_product
        times, outs = alternate(fns, args.repeats)
        gv = ref.ggn_mv(v)
        for op, peer in todo:
            if op == "GGN product":
                emit(
                    "GGN product (fresh operator)",
                    peer,
                    times,
                    outs,
                    rel_err(outs["symgen"], gv),
                    rel_err(outs.get(peer), gv),
                    "float64 G v (max abs err / max abs)",
                )
    diag64 = None
    if any(op in ("GGN trace", "GGN exact diagonal") for op, _ in todo) and bp:
        diag64 = ref.ggn_diag()
    if any(op == "GGN trace" for op, _ in todo):
        fns = {"symgen": lambda: symgen_op().trace(m, generator=seed)}
        if cl_op:
            from curvlinops import hutchinson_trace

            def cl_trace():
                A = cl_op()
                torch.manual_seed(seed)
                return hutchinson_trace(A, m)

            fns["curvlinops"] = cl_trace
        if bp:
            fns["BackPACK"] = lambda: float(bp_diag().sum())
        times, outs = alternate(fns, args.repeats)
        c = min(args.check, m)
        s_out = outs["symgen"]
        s_err = form_error(
            None if isinstance(s_out, Exception) else s_out.samples, rademacher_symgen(c, n, seed), ref.ggn_forms
        )
        for op, peer in todo:
            if op != "GGN trace":
                continue
            if peer == "curvlinops":
                p_err = math.nan
                if cl_op and not isinstance(outs.get(peer), Exception):
                    Z = rademacher_curvlinops(c, n, seed)
                    p_err = form_error((Z * (cl_op() @ Z.T).T).sum(1), Z, ref.ggn_forms)
                emit(
                    f"GGN trace, {m} probes",
                    peer,
                    times,
                    outs,
                    s_err,
                    p_err,
                    f"float64 z^T G z on each tool's own probes (max rel. over {c})",
                )
            else:
                exact = float(diag64.sum()) if diag64 is not None else math.nan
                emit(
                    f"GGN trace, {m} probes",
                    peer,
                    times,
                    outs,
                    s_err,
                    rel_err(outs.get(peer), exact) if bp else math.nan,
                    "symgen: float64 forms, same probes; BackPACK: float64 exact trace",
                    note="BackPACK: exact trace (sum of DiagGGNExact), not an estimate",
                )
    if ("GGN exact diagonal", "BackPACK") in todo:
        if bp:
            times, outs = alternate({"BackPACK": bp_diag}, args.repeats)
            emit(
                "GGN exact diagonal",
                "BackPACK",
                times,
                outs,
                "-",
                rel_err(outs.get("BackPACK"), diag64),
                "float64 diag(J^T H J) from per-sample Jacobians",
                note="no symgen equivalent (symgen has no exact GGN diagonal)",
            )
        else:
            rows.append(row("GGN exact diagonal", label, "BackPACK", note=reasons["BackPACK"]))
    return rows


# ---------------------------------------------------------------- G-CNN training step vs e2cnn
def e2cnn_net(group: str, channels: int, depth: int):
    from e2cnn import gspaces
    from e2cnn import nn as enn

    gs = gspaces.Rot2dOnR2(N=4) if group == "C4" else gspaces.FlipRot2dOnR2(N=4)
    t_in = enn.FieldType(gs, [gs.trivial_repr])
    t = enn.FieldType(gs, channels * [gs.regular_repr])
    layers = [enn.R2Conv(t_in, t, 3, padding=1), enn.ReLU(t)]
    for _ in range(depth - 1):
        layers += [enn.R2Conv(t, t, 3, padding=1), enn.ReLU(t)]
    layers.append(enn.GroupPooling(t))
    body = enn.SequentialModule(*layers)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.t_in, self.head = body, t_in, nn.Linear(channels, 10)

        def forward(self, x):
            h = self.body(enn.GeometricTensor(x, self.t_in)).tensor
            return self.head(h.mean(dim=(-2, -1)))

    return Net()


def gcnn_rows(args) -> list[dict]:
    rows = []
    for group in ("C4", "D4"):
        label = f"G-CNN {group}, 3 layers, batch {args.gcnn_batch} of 1x28x28"
        if not wanted(args.only, "G-CNN training step", label, "e2cnn"):
            continue
        from symgen.nn import GCNN

        c = args.gcnn_channels
        torch.manual_seed(args.seed)
        ours = GCNN(group.lower(), 1, (c, c, c), 10, generator=args.seed)
        n_ours = sum(p.numel() for p in ours.parameters())
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.gcnn_batch, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (args.gcnn_batch,), generator=g)
        try:
            best = None
            for ce in range(1, 4 * c + 1):  # e2cnn's channel count whose parameter count is nearest symgen's
                k = sum(p.numel() for p in e2cnn_net(group, ce, 3).parameters())
                if best is None or abs(k - n_ours) < abs(best[1] - n_ours):
                    best = (ce, k)
                if k > n_ours:
                    break
            torch.manual_seed(args.seed)
            theirs = e2cnn_net(group, best[0], 3)
        except Exception as e:  # noqa: BLE001
            rows.append(row("G-CNN training step", label, "e2cnn", note=f"e2cnn failed: {failure(e)}"))
            continue
        opts = {
            "symgen": (ours, torch.optim.SGD(ours.parameters(), lr=0.01)),
            "e2cnn": (theirs, torch.optim.SGD(theirs.parameters(), lr=0.01)),
        }

        def step(name, opts=opts, x=x, y=y):
            mdl, opt = opts[name]
            mdl.train()
            opt.zero_grad(set_to_none=True)
            loss = TF.cross_entropy(mdl(x), y)
            loss.backward()
            opt.step()
            return float(loss)

        reps = max(args.repeats, 5)
        times, outs = alternate({k: (lambda k=k: step(k)) for k in opts}, reps)

        def inv_err(mdl, x=x, group=group):
            mdl.eval()
            with torch.no_grad():
                f = mdl(x)
                gs = [torch.rot90(x, 1, (-2, -1))] + ([torch.flip(x, (-1,))] if group == "D4" else [])
                return max(float((mdl(gx) - f).abs().max() / f.abs().max()) for gx in gs)

        rows.append(
            row(
                "G-CNN training step (fwd+bwd+SGD)",
                label,
                "e2cnn",
                symgen_s=times["symgen"],
                peer_s=times["e2cnn"],
                symgen_err=inv_err(ours),
                peer_err=inv_err(theirs),
                reference="invariance of the logits under the group's generators (float32)",
                repeats=reps,
                note=f"parameters: symgen {n_ours:,} (channels {c}), e2cnn {best[1]:,} ({best[0]} regular fields)",
            )
        )
    return rows


# ---------------------------------------------------------------- ensemble epoch vs torchensemble and a loop
def ensemble_rows(args) -> list[dict]:
    M = args.members
    label = f"{M} x MaskedCNN(8), {256 if args.quick else 1347} digits, batch 32, SGD"
    specs = [("ensemble epoch", "torchensemble"), ("ensemble epoch", "Python loop")]
    todo = [s for s in specs if wanted(args.only, s[0], label, s[1])]
    if not todo:
        return []
    from symgen.data import load_dataset
    from symgen.ensemble import Ensemble, epoch_plan, member_generator, train_ensemble
    from symgen.nn.masked import MaskedCNN

    x, y = load_dataset("digits", "train")
    if args.quick:
        x, y = x[:256], y[:256]
    bs, lr, seed = 32, 0.01, args.seed

    def factory():
        return MaskedCNN(1, 10, channels=8, support="symmetric")

    state = {}

    def ours():
        ens = Ensemble.init(factory, M, generator=seed)
        train_ensemble(ens, x, y, torch.optim.SGD(ens.parameters(), lr=lr), epochs=1, batch_size=bs, generator=seed)
        state["ens"] = ens
        return ens

    def loop():
        ens0 = Ensemble.init(factory, M, generator=seed)  # the same initial members, trained one by one
        models = []
        for i in range(M):
            mdl = factory()
            with torch.no_grad():
                for k, p in mdl.named_parameters():
                    p.copy_(ens0.params[k][i])
            opt = torch.optim.SGD(mdl.parameters(), lr=lr)
            order, _ = epoch_plan(member_generator(seed, ens0.member_ids[i]), x.shape[0], None)
            for s in range(0, x.shape[0], bs):
                idx = order[s : s + bs]
                opt.zero_grad(set_to_none=True)
                TF.cross_entropy(mdl(x[idx]), y[idx]).backward()
                opt.step()
            models.append(mdl)
        state["loop"] = models
        return models

    fns = {"symgen": ours, "Python loop": loop}
    te_reason = None
    try:
        import logging

        from torchensemble import VotingClassifier

        logging.getLogger().setLevel(logging.ERROR)  # its per-batch log lines (no log file: set_logger not called)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs, shuffle=True)

        class Member(MaskedCNN):
            def __init__(self):
                super().__init__(1, 10, channels=8, support="symmetric")

        def te():
            clf = VotingClassifier(estimator=Member, n_estimators=M, cuda=False)
            clf.set_optimizer("SGD", lr=lr)
            clf.fit(loader, epochs=1, log_interval=10**9, save_model=False)
            return clf

        fns["torchensemble"] = te
    except Exception as e:  # noqa: BLE001
        te_reason = f"not installed: {failure(e)}"
    times, outs = alternate(fns, args.ens_repeats)
    # agreement of the trained members with the loop (same init and data order): logits on the test digits
    s_err = math.nan
    if "ens" in state and "loop" in state:
        xt, _ = load_dataset("digits", "test")
        with torch.no_grad():
            a = state["ens"].member_logits(xt[:128])
            b = torch.stack([mdl(xt[:128]) for mdl in state["loop"]])
        s_err = rel_err(a, b)
    rows = []
    for _op, peer in todo:
        if peer == "torchensemble" and te_reason:
            rows.append(row("ensemble epoch", label, peer, note=te_reason))
            continue
        o = outs.get(peer)
        rows.append(
            row(
                "ensemble epoch (train 1 epoch)",
                label,
                peer,
                symgen_s=times["symgen"],
                peer_s=times.get(peer, math.nan),
                symgen_err=s_err,
                peer_err="-" if peer == "torchensemble" else 0.0,
                reference="symgen's trained members vs the loop's (same init, order), logits",
                repeats=args.ens_repeats,
                note=failure(o)
                if isinstance(o, Exception)
                else ("own init and data order (no error)" if peer == "torchensemble" else "the reference"),
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--only", default=None, help="regex on 'operation | model | peer'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    args.repeats = args.repeats or (1 if q else 3)
    args.ens_repeats = 1 if q else min(args.repeats, 3)
    args.resnet_batch = 32 if q else 200
    args.cnn_batch = 128 if q else 512
    args.train_steps = 2 if q else 10
    args.probes = 3 if q else 10
    args.check = 2 if q else 3
    args.gcnn_batch = 16 if q else 64
    args.gcnn_channels = 8 if q else 16
    args.members = 4 if q else 32
    rows: list[dict] = []
    t0 = time.perf_counter()
    for label, build, x, y in curvature_models(args):
        specs = [("Hessian", label, p) for p in ("PyHessian", "hessian-eigenthings", "curvlinops")]
        guarded(rows, specs, lambda label=label, build=build, x=x, y=y: hessian_rows(args, label, build, x, y))
        print(f"[peers_torch] {label}: {time.perf_counter() - t0:.0f} s, load {os.getloadavg()}", file=sys.stderr)
        if label.startswith("BN CNN"):
            specs = [("GGN", label, p) for p in ("curvlinops", "BackPACK")]
            guarded(rows, specs, lambda label=label, build=build, x=x, y=y: ggn_rows(args, label, build, x, y))
    guarded(rows, [("G-CNN training step", "G-CNN", "e2cnn")], lambda: gcnn_rows(args))
    guarded(
        rows, [("ensemble epoch", "ensemble", p) for p in ("torchensemble", "Python loop")], lambda: ensemble_rows(args)
    )
    print(f"[peers_torch] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    with open(args.json, "w") as fh:
        json.dump(rows, fh, indent=1, default=float)


if __name__ == "__main__":
    main()

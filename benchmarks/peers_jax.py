"""The neural-tangents rows of the peers table (run in .venv-jax by benchmarks/peers_table.py; writes JSON rows).

Empirical NTK of a small CNN (symgen.ntk.empirical_ntk_fn against nt.empirical_ntk_fn, both on the same
weights) and the infinite-width kernels: symgen.ntk.analytic_ntk (MLP) and analytic_conv_ntk (flatten and GAP
read-outs) against neural-tangents' stax kernel_fn, 64 images 1x8x8, depth 1-2, float32 and float64. JAX calls are
jitted and their first call (compilation) is excluded; so is symgen's first call. float32 runs with JAX's x64 off.

References: the empirical NTK against torch.func jacrev in float64 (neither tool); the analytic kernels against
neural-tangents' own float64 kernel (so its float64 error is 0 by definition, and symgen's float64 error is the
float64 disagreement of the two).

neural-tangents 0.6.5 imports its TensorFlow bridge (``neural_tangents.experimental``, tensorflow + tf2jax) at
import time; it is installed without them and that one module is replaced by an empty one before the import.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types

import numpy as np
import torch
from peers_common import alternate, failure, rel_err, row, wanted
from torch import nn

NT = "neural-tangents 0.6.5"


def import_nt():
    sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 references; float32 runs under disable_x64()
    import neural_tangents as nt

    return jax, nt


def images(n: int, seed: int) -> torch.Tensor:
    """n digits (1x8x8, the test split), scaled to unit variance per image."""
    from symgen.data import load_dataset

    x, _ = load_dataset("digits", "test")
    x = x[:n].double()
    return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)


def empirical_rows(args, jax, nt) -> list[dict]:
    label = f"CNN 1-16-16 (3x3, ReLU, no bias) + Dense 10, {args.n} images 1x8x8, float32"
    op = "empirical NTK (mean over outputs)"
    if not wanted(args.only, op, label, NT):
        return []
    import jax.numpy as jnp
    from jax.experimental import disable_x64
    from neural_tangents import stax

    from symgen.ntk import empirical_ntk_fn

    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10, bias=False),
    )
    x = images(args.n, args.seed).float()
    dn = ("NCHW", "OIHW", "NCHW")
    _, apply_fn, _ = stax.serial(
        stax.Conv(16, (3, 3), padding="SAME", dimension_numbers=dn, parameterization="standard"),
        stax.Relu(),
        stax.Conv(16, (3, 3), padding="SAME", dimension_numbers=dn, parameterization="standard"),
        stax.Relu(),
        stax.Flatten(),
        stax.Dense(10, parameterization="standard"),
    )
    w = [m.weight.detach().numpy() for m in model if hasattr(m, "weight")]
    with disable_x64():
        params = [(jnp.asarray(w[0]), None), (), (jnp.asarray(w[1]), None), (), (), (jnp.asarray(w[2].T), None)]
        xj = jnp.asarray(x.numpy())
        same = float(np.abs(np.asarray(apply_fn(params, xj)) - model(x).detach().numpy()).max())
        fns = {"symgen": None}
        ours = empirical_ntk_fn(model, output="mean")
        fns["symgen"] = lambda: ours(x)
        impls = {"neural-tangents (default impl.)": None, "neural-tangents (structured, impl. 3)": 3}
        for name, impl in impls.items():
            kw = {} if impl is None else {"implementation": impl}
            f = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,), vmap_axes=0, **kw))
            fns[name] = lambda f=f: np.asarray(jax.block_until_ready(f(xj, None, params)))
        times, outs = alternate(fns, max(args.repeats, 5))
    # float64 reference: per-sample Jacobians by torch.func in float64 (neither tool)
    from torch.func import functional_call, jacrev, vmap

    m64 = model.double()
    p64 = {k: v.detach() for k, v in m64.named_parameters()}
    J = vmap(jacrev(lambda p, xi: functional_call(m64, p, (xi[None],))[0]), in_dims=(None, 0))(p64, x.double())
    Jf = torch.cat([J[k].reshape(x.shape[0], 10, -1) for k in p64], dim=-1)
    K = torch.einsum("nop,mop->nm", Jf, Jf) / 10
    rows = []
    for name in impls:
        o = outs.get(name)
        rows.append(
            row(
                op,
                label,
                name,
                symgen_s=times["symgen"],
                peer_s=times.get(name, math.nan),
                symgen_err=rel_err(outs["symgen"], K),
                peer_err=rel_err(torch.from_numpy(np.array(o)) if not isinstance(o, Exception) else o, K),
                reference="float64 J J^T (torch.func jacrev)",
                repeats=max(args.repeats, 5),
                note=failure(o) if isinstance(o, Exception) else f"jitted; same weights (outputs agree to {same:.0e})",
            )
        )
    return rows


def analytic_rows(args, jax, nt) -> list[dict]:
    import jax.numpy as jnp
    from jax.experimental import disable_x64
    from neural_tangents import stax

    from symgen.ntk import analytic_conv_ntk, analytic_ntk

    W, B = 1.5, 0.1
    x64 = images(args.n, args.seed)
    rows = []
    kinds = [("MLP", None), ("conv, flatten read-out", "flatten"), ("conv, GAP read-out", "gap")]
    for kind, readout in kinds:
        for depth in (1, 2):
            label = f"{kind}, depth {depth}, ReLU, {args.n} images 1x8x8"
            op = "analytic NTK (infinite width)"
            todo = [d for d in ("float32", "float64") if wanted(args.only, f"{op} {d}", label, NT)]
            if not todo:
                continue
            if readout is None:
                layers = [stax.Dense(512, W, B), stax.Relu()] * depth + [stax.Dense(1, W, B)]

                def ours(xt, dt, depth=depth):
                    return analytic_ntk(xt, xt, depth, "relu", W, B, dtype=dt)[1]

                def to_jax(xt):
                    return xt.reshape(xt.shape[0], -1).numpy()
            else:
                conv = [stax.Conv(8, (3, 3), padding="CIRCULAR", W_std=W, b_std=B), stax.Relu()]
                pool = stax.Flatten() if readout == "flatten" else stax.GlobalAvgPool()
                layers = conv * depth + [pool, stax.Dense(1, W, B)]

                def ours(xt, dt, depth=depth, readout=readout):
                    return analytic_conv_ntk(xt, xt, depth, 3, "relu", readout, "circular", W, B, dtype=dt)[1]

                def to_jax(xt):
                    return xt.permute(0, 2, 3, 1).numpy()  # NHWC

            _, _, kernel_fn = stax.serial(*layers)
            kfn = jax.jit(kernel_fn, static_argnames="get")
            ref = np.asarray(kfn(jnp.asarray(to_jax(x64)), None, get="ntk"))  # neural-tangents, float64
            for dname in todo:
                dt = torch.float32 if dname == "float32" else torch.float64
                xt = x64.to(dt)
                xj = to_jax(xt)

                def theirs(xj=xj, kfn=kfn):
                    return np.asarray(jax.block_until_ready(kfn(jnp.asarray(xj), None, get="ntk")))

                def mine(xt=xt, dt=dt, ours=ours):
                    return ours(xt, dt)

                fns = {"symgen": mine, NT: theirs}
                if dt == torch.float32:
                    with disable_x64():
                        times, outs = alternate(fns, max(args.repeats, 5))
                else:
                    times, outs = alternate(fns, max(args.repeats, 5))
                o = outs[NT]
                note = failure(o) if isinstance(o, Exception) else f"neural-tangents returned {o.dtype}"
                s = outs["symgen"]
                if isinstance(s, Exception):
                    note = f"symgen: {failure(s)}; " + note
                rows.append(
                    row(
                        f"{op}, {dname}",
                        label,
                        NT,
                        symgen_s=times["symgen"],
                        peer_s=times[NT],
                        symgen_err=rel_err(s, torch.from_numpy(ref)),
                        peer_err=rel_err(torch.from_numpy(np.array(o)), torch.from_numpy(ref))
                        if not isinstance(o, Exception)
                        else math.nan,
                        reference="neural-tangents float64 (jax x64)",
                        repeats=max(args.repeats, 5),
                        note=note,
                    )
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.n = 16 if args.quick else 64
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows: list[dict] = []
    try:
        jax, nt = import_nt()
    except Exception as e:  # noqa: BLE001
        rows.append(row("NTK rows", "-", NT, note=f"not installed: {failure(e)}"))
        jax = nt = None
    if jax is not None:
        for name, fn in (("empirical NTK", empirical_rows), ("analytic NTK", analytic_rows)):
            try:
                rows += fn(args, jax, nt)
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                rows.append(row(name, "-", NT, note=f"group failed: {failure(e)}"))
    print(f"[peers_jax] done in {time.perf_counter() - t0:.0f} s, load {os.getloadavg()}", file=sys.stderr)
    with open(args.json, "w") as fh:
        json.dump(rows, fh, indent=1, default=float)


if __name__ == "__main__":
    main()

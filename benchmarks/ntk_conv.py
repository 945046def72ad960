"""Analytic conv NNGP + NTK: symgen's ``analytic_conv_ntk`` against neural-tangents' jitted stax kernel.

Configurations (issue 26): images 1x8x8 (N(0, 1) pixels), ``[Conv(3x3, circular), ReLU] * depth`` then a
flatten or global-average-pool read-out and a Dense layer, NTK parameterization, W_std = 1, b_std = 0.1,
both kernels (NNGP and NTK) in one call, float32 and float64, x2 = None. neural-tangents:
``stax.serial(Conv(1, (3, 3), padding="CIRCULAR", parameterization="ntk"), Relu(), ..., Flatten() |
GlobalAvgPool(), Dense(1))`` under ``jax.jit``, its first call (compilation) excluded. The two tools are
timed alternately in one process (median wall time of the repeats), one thread each by default (torch
``set_num_threads``, XLA's ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``), so
other work on the machine affects both alike; the 1-minute load average is printed beside each row.
``ratio`` = neural-tangents time / symgen time (> 1: symgen is faster). Values: max |difference| and max
|difference| / max |K| of both kernels against neural-tangents and, in float64, against symgen's generic
path (``fast=False``, the implementation before ``ntk.conv_fast``) where that is affordable.

Run: ``python benchmarks/ntk_conv.py [--quick] [--threads N] [--repeats R] [--only REGEX]`` in an environment with neural-tangents
(jax) and symgen; without neural-tangents it prints a note and times symgen alone. Other benchmarks import
:func:`rows`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import types
from typing import Any

W_STD, B_STD, FILTER, SIDE = 1.0, 0.1, 3, 8


def _configs(quick: bool) -> list[tuple[int, str, int]]:
    """(images, read-out, depth): 64 images all; 1024 (256 if quick) flatten only (GAP at 1024 images would
    hold 1024^2 x 64^2 position pairs, 32 GB in float64, in neural-tangents)."""
    big = 256 if quick else 1024
    out = [(64, ro, d) for ro in ("flatten", "gap") for d in (1, 2)]
    return out + [(big, "flatten", d) for d in (1, 2)]


def _setup_threads(threads: int) -> None:
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if threads == 1 and "multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = (
                flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            ).strip()


def _nt_kernel_fn(readout: str, depth: int) -> Any:
    import jax

    # neural-tangents 0.6.5 imports its TensorFlow bridge at import time; installed without tensorflow (as in
    # .venv-jax), that one module is replaced by an empty one first (as benchmarks/peers_jax.py does)
    sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
    from neural_tangents import stax

    layers = []
    for _ in range(depth):
        conv = stax.Conv(1, (FILTER, FILTER), padding="CIRCULAR", W_std=W_STD, b_std=B_STD, parameterization="ntk")
        layers += [conv, stax.Relu()]
    layers.append(stax.Flatten() if readout == "flatten" else stax.GlobalAvgPool())
    layers.append(stax.Dense(1, W_std=W_STD, b_std=B_STD, parameterization="ntk"))
    kernel_fn = stax.serial(*layers)[2]
    return jax.jit(kernel_fn, static_argnames=("get",))


def rows(
    quick: bool = False, threads: int = 1, repeats: int | None = None, only: str | None = None
) -> list[dict[str, Any]]:
    """Time symgen against neural-tangents on every configuration; one dict per (images, read-out, depth, dtype).

    Args:
        quick: 256 instead of 1024 images in the large configurations, fewer repeats.
        threads: torch and XLA threads (1: single core each, robust to other load).
        repeats: timed calls per tool (default 3 quick, 5 full; 2 at the large size).
        only: a regular expression searched in "images readout depth dtype" (e.g. "^64 flatten"); None: all.

    Returns:
        rows with keys images, readout, depth, dtype, symgen_s, nt_s (None without neural-tangents), ratio
        (nt_s / symgen_s), max_abs_diff, max_rel_diff (vs neural-tangents), generic_rel_diff (float64 vs
        symgen's generic path, None where not run), load (1-minute load average), note.
    """
    _setup_threads(threads)
    import numpy as np
    import torch

    from symgen.ntk import analytic_conv_ntk

    torch.set_num_threads(threads)
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        have_nt = True
        note = ""
    except ImportError:
        have_nt, note = False, "neural-tangents not installed: symgen alone"
    out: list[dict[str, Any]] = []
    for images, readout, depth in _configs(quick):
        x = np.random.default_rng(images + depth).standard_normal((images, 1, SIDE, SIDE))
        if only is not None and not any(
            re.search(only, f"{images} {readout} {depth} {d}") for d in ("float32", "float64")
        ):
            continue
        kfn = _nt_kernel_fn(readout, depth) if have_nt else None
        for dtype_name in ("float32", "float64"):
            if only is not None and not re.search(only, f"{images} {readout} {depth} {dtype_name}"):
                continue
            xt = torch.from_numpy(x.astype(dtype_name))

            def run_symgen(xt: torch.Tensor = xt, depth: int = depth, readout: str = readout) -> Any:
                return analytic_conv_ntk(xt, None, depth, FILTER, "relu", readout, "circular", W_STD, B_STD)

            run_nt = None
            if kfn is not None:
                xj = jnp.asarray(x.transpose(0, 2, 3, 1).astype(dtype_name))  # NHWC

                def run_nt(xj: Any = xj, kfn: Any = kfn) -> Any:
                    res = kfn(xj, None, get=("nngp", "ntk"))
                    return res[0].block_until_ready(), res[1].block_until_ready()

                nt_vals = run_nt()  # compile (excluded)
            n_rep = repeats or (2 if images > 256 else 3 if quick else 5)
            ts_s: list[float] = []
            ts_n: list[float] = []
            sym_vals = run_symgen()
            for _ in range(n_rep):  # alternate the tools
                t = time.perf_counter()
                sym_vals = run_symgen()
                ts_s.append(time.perf_counter() - t)
                if run_nt is not None:
                    t = time.perf_counter()
                    nt_vals = run_nt()
                    ts_n.append(time.perf_counter() - t)
            row: dict[str, Any] = {
                "images": images,
                "readout": readout,
                "depth": depth,
                "dtype": dtype_name,
                "symgen_s": statistics.median(ts_s),
                "nt_s": statistics.median(ts_n) if ts_n else None,
                "ratio": statistics.median(ts_n) / statistics.median(ts_s) if ts_n else None,
                "max_abs_diff": None,
                "max_rel_diff": None,
                "generic_rel_diff": None,
                "load": os.getloadavg()[0],
                "note": note,
            }
            if run_nt is not None:
                diffs = [
                    (
                        np.abs(np.asarray(n, dtype=np.float64) - s.double().numpy()).max(),
                        np.abs(s.double().numpy()).max(),
                    )
                    for n, s in zip(nt_vals, sym_vals, strict=True)
                ]
                row["max_abs_diff"] = max(d for d, _ in diffs)
                row["max_rel_diff"] = max(d / m for d, m in diffs)
            if dtype_name == "float64" and images * images * (SIDE**4 if readout == "gap" else SIDE**2) <= 1 << 24:
                ref = analytic_conv_ntk(xt, None, depth, FILTER, "relu", readout, "circular", W_STD, B_STD, fast=False)
                row["generic_rel_diff"] = max(
                    ((r - s).abs() / r.abs()).max().item() for r, s in zip(ref, sym_vals, strict=True)
                )
            out.append(row)
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> None:
    """Print the table of :func:`rows`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 instead of 1024 images, fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch and XLA threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per tool (default 5; 3 quick)")
    parser.add_argument("--only", default=None, help='regex on "images readout depth dtype", e.g. "^64 flatten"')
    args = parser.parse_args(argv)
    table = rows(args.quick, args.threads, args.repeats, args.only)
    if table and table[0]["note"]:
        print(f"note: {table[0]['note']}")
    head = f"{'images':>6} {'readout':>7} {'depth':>5} {'dtype':>7} {'symgen s':>9} {'nt s':>9} {'ratio':>6}"
    print(head + f" {'max|d|':>9} {'rel d':>9} {'vs generic':>10} {'load':>5}")
    for r in table:
        print(
            f"{r['images']:>6} {r['readout']:>7} {r['depth']:>5} {r['dtype']:>7} {r['symgen_s']:>9.4f} "
            f"{_fmt(r['nt_s'], '9.4f'):>9} {_fmt(r['ratio'], '6.2f'):>6} {_fmt(r['max_abs_diff'], '9.1e'):>9} "
            f"{_fmt(r['max_rel_diff'], '9.1e'):>9} {_fmt(r['generic_rel_diff'], '10.1e'):>10} {r['load']:>5.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

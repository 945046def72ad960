"""Benchmark: vectorized ensemble training (vmap over stacked parameters) against a loop that trains
the same models one after another, and batched orbit metrics against a loop over group elements.

Both paths use the same seeds (init, data order, augmentation draws), so the trained members must
agree to float32 round-off. Run: ``python benchmarks/ensemble.py [--members 64 --epochs 1]``.
Targets (issue 13): >= 8x for 64 members and >= 10x for 256 on 2 CPU cores; ``--members 64,256`` runs both.
The paper's setting (1000 members, 10 epochs) is extrapolated from the measured vectorized time (printed as such);
``--skip-loop`` times only the vectorized path, and with ``--members 1000 --epochs 10`` (all 1347 digits)
prints the paper's setting as MEASURED. ``--compile [BACKEND]`` also trains the same members with
``train_ensemble(..., compile=BACKEND)`` (default inductor) and prints its time next to eager vmap (the first
epoch includes compiling; use ``--epochs 2`` or more to see the steady state).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from symgen.data import load_dataset
from symgen.ensemble import Ensemble, epoch_plan, member_generator, train_ensemble
from symgen.groups import ImageRotation90
from symgen.metrics import invariance_metrics, invariance_report
from symgen.nn.masked import MaskedCNN


def matmul_flops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Measured dense matmul FLOP/s on this machine (the contraction roofline for comparison)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def cnn_macs_per_sample(model: MaskedCNN, spatial: tuple[int, int]) -> int:
    """Multiply-accumulates of one forward pass (dense 3x3 convs as executed, pooling ignored)."""
    h, w = spatial
    macs = 0
    for i, conv in enumerate(model.convs):
        macs += h * w * conv.in_channels * conv.out_channels * 9
        if i < len(model.convs) - 1 and h % 2 == 0 and h > 2:
            h, w = h // 2, w // 2
    macs += model.head.in_features * model.head.out_features
    return macs


def train_loop(factory, members: int, x, y, *, epochs, batch_size, lr, action, seed):
    """Reference: each member alone, plain module + autograd + torch.optim.SGD, same randomness."""
    models = []
    n = x.shape[0]
    for m in range(members):
        torch.manual_seed(seed + m)
        model = factory()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        gen = member_generator(seed, m)
        for _ in range(epochs):
            order, elems = epoch_plan(gen, n, action.group.order)
            for s in range(0, n, batch_size):
                idx = order[s : s + batch_size]
                xb = action.apply_each(elems[s : s + batch_size], x[idx])
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        models.append(model)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--members", default="64", help="comma-separated ensemble sizes, e.g. 64,256")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01, help="the paper's SGD learning rate")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-loop", action="store_true", help="time only the vectorized path (no loop, no ratio)")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="also time train_ensemble(compile=BACKEND) (default backend: inductor)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y = load_dataset("digits", "train")
    xt, yt = load_dataset("digits", "test")
    if args.train_size:
        x, y = x[: args.train_size], y[: args.train_size]
    action = ImageRotation90()

    def factory():
        return MaskedCNN(1, 10, channels=args.channels, support="symmetric")

    sizes = [int(m) for m in str(args.members).split(",")]
    for members in sizes:
        args.members = members
        ens = _train_and_compare(args, factory, x, y, xt, action)
    _orbit_metrics(args, ens, action, xt, yt)


def _train_and_compare(args, factory, x, y, xt, action):
    print(
        f"\ndigits: {x.shape[0]} train / {xt.shape[0]} test, MaskedCNN(channels={args.channels}), "
        f"{args.members} members, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )

    # ---- training: vectorized vs loop ------------------------------------------------------------
    warm = Ensemble.init(factory, 2, generator=123)
    train_ensemble(
        warm,
        x[:64],
        y[:64],
        torch.optim.SGD(warm.parameters(), lr=args.lr),
        epochs=1,
        batch_size=args.batch_size,
        augment=action,
    )
    t0 = time.perf_counter()
    ens = Ensemble.init(factory, args.members, generator=args.seed)
    train_ensemble(
        ens,
        x,
        y,
        torch.optim.SGD(ens.parameters(), lr=args.lr),
        epochs=args.epochs,
        batch_size=args.batch_size,
        augment=action,
        generator=args.seed,
    )
    t_vec = time.perf_counter() - t0
    macs = cnn_macs_per_sample(factory(), (8, 8))
    flop = 3 * 2 * macs * x.shape[0] * args.epochs * args.members  # forward + backward ~ 3x forward
    if args.compile:
        _compiled(args, factory, x, y, action, ens, t_vec)
    if args.skip_loop:
        print("\n== training (vectorized only, --skip-loop) ==")
        print(f"vectorized (vmap):   {t_vec:8.2f} s   {flop / t_vec / 1e9:6.2f} GFLOP/s")
        paper = args.members == 1000 and args.epochs == 10 and x.shape[0] == 1347
        if paper:
            print(f"paper's setting (1000 members, 10 epochs, 1347 digits): {t_vec / 60:.1f} min vectorized, MEASURED")
        else:
            est = t_vec * (1000 / args.members) * (10 / args.epochs) * (1347 / x.shape[0])
            print(
                f"paper's setting (1000 members, 10 epochs, 1347 digits): {est / 60:.1f} min vectorized, "
                f"EXTRAPOLATED linearly from this run ({args.members} members, {args.epochs} epoch(s), "
                f"{x.shape[0]} samples)"
            )
        return ens

    t0 = time.perf_counter()
    models = train_loop(
        factory,
        args.members,
        x,
        y,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        action=action,
        seed=args.seed,
    )
    t_loop = time.perf_counter() - t0

    with torch.no_grad():
        vec_logits = ens.member_logits(xt)
        loop_logits = torch.stack([m(xt) for m in models])
    diff = float((vec_logits - loop_logits).abs().max())
    peak = matmul_flops()
    print("\n== training ==")
    print(f"vectorized (vmap):   {t_vec:8.2f} s   {flop / t_vec / 1e9:6.2f} GFLOP/s")
    print(f"loop of {args.members:3d} models: {t_loop:8.2f} s   {flop / t_loop / 1e9:6.2f} GFLOP/s")
    target = 10 if args.members >= 256 else 8
    print(f"speedup: {t_loop / t_vec:.2f}x (target >= {target}x on 2 CPU cores)")
    paper = t_vec * (1000 / args.members) * (10 / args.epochs) * (1347 / x.shape[0])
    print(
        f"paper's setting (1000 members, 10 epochs, 1347 digits): {paper / 60:.1f} min vectorized, EXTRAPOLATED "
        f"linearly from this measured run ({args.members} members, {args.epochs} epoch(s), {x.shape[0]} samples)"
    )
    print(f"max |logits_vectorized - logits_loop| = {diff:.2e} (required <= 1e-4): {'OK' if diff <= 1e-4 else 'FAIL'}")
    print(
        f"measured matmul roofline: {peak / 1e9:.1f} GFLOP/s; these small grouped convolutions reach "
        f"{100 * flop / t_vec / peak:.1f}% of it"
    )

    return ens


def _compiled(args, factory, x, y, action, eager, t_eager):
    """The same training through train_ensemble(compile=...): time (first epoch incl. compiling) and agreement."""
    marks = []
    t0 = time.perf_counter()
    ens = Ensemble.init(factory, args.members, generator=args.seed)
    train_ensemble(
        ens,
        x,
        y,
        torch.optim.SGD(ens.parameters(), lr=args.lr),
        epochs=args.epochs,
        batch_size=args.batch_size,
        augment=action,
        generator=args.seed,
        compile=args.compile,
        on_epoch=lambda e, _: marks.append(time.perf_counter()),
    )
    t_c = time.perf_counter() - t0
    diff = max(float((ens.params[k] - v).detach().abs().max()) for k, v in eager.params.items())
    print(f"\n== torch.compile (backend {args.compile}) vs eager vmap ==")
    print(
        f"eager vmap: {t_eager:8.2f} s;  compiled: {t_c:8.2f} s in all, first epoch (with compiling) "
        f"{marks[0] - t0:.2f} s"
    )
    if len(marks) > 1:
        per_c = (marks[-1] - marks[0]) / (len(marks) - 1)
        per_e = t_eager / args.epochs
        print(
            f"per epoch after the first: compiled {per_c:.2f} s vs eager {per_e:.2f} s (eager's mean epoch) "
            f"-> {per_e / per_c:.2f}x"
        )
    print(f"max |params_compiled - params_eager| = {diff:.2e}")


def _orbit_metrics(args, ens, action, xt, yt):
    """Orbit metrics: one batched pass vs a loop over group elements."""

    def loop_over_g():
        with torch.no_grad():
            logits = torch.stack([ens(action.apply(g, xt)) for g in action.group.elements()])
        return invariance_metrics(logits, yt)

    invariance_report(ens, action, xt[:8])
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        batched = invariance_report(ens, action, xt, yt)
    t_b = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        looped = loop_over_g()
    t_l = (time.perf_counter() - t0) / reps
    worst = max(abs(batched[k] - looped[k]) for k in batched)
    print(f"\n== orbit metrics (ensemble of {args.members}, {xt.shape[0]} test images, |G| = {action.group.order}) ==")
    print(
        f"one batched pass: {t_b * 1000:8.1f} ms   loop over g: {t_l * 1000:8.1f} ms   "
        f"ratio {t_l / t_b:.2f}x   max metric difference {worst:.1e}"
    )
    print(f"ensemble: osp {batched['osp']:.3f}  kl {batched['kl']:.4f}  accuracy {batched['accuracy']:.3f}")


if __name__ == "__main__":
    main()

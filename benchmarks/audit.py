"""The full ``symgen audit`` of a CIFAR ResNet-18 (11.2M parameters, ``symgen.models.resnet18``) on
CIFAR-10 files: wall and CPU time per section, peak resident memory, every section run.

    python benchmarks/audit.py [--test-size 10000] [--train-files 5] [--budget lifted|SECONDS] [--threads 2]

The CIFAR-10 files are fake (random pixels and labels, the real python-batch format, written to a
temporary directory: no download), so accuracies mean nothing; costs are what is measured. The
model is at its seeded initialization with BatchNorm statistics from one pass. ``--budget lifted``
runs the quick budget's sizes with the time limit lifted (the issue's setting); a number of seconds
lets the planner size the sections to it. The planner's predicted seconds for the quick sizes are
printed beside the measured ones. Issue 12's target: under 10 minutes and 4 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_fake_cifar(root: Path, test_size: int, train_files: int, per_file: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    sizes = [(f"data_batch_{i}", per_file) for i in range(1, 6)]
    for i, (name, n) in enumerate(sizes):
        # the audit reads all five train files; beyond --train-files they are small, to save disk and time
        n = n if i < train_files else 16
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    test = {
        b"data": rng.integers(0, 256, (test_size, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, test_size).tolist(),
    }
    (base / "test_batch").write_bytes(pickle.dumps(test))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--train-files", type=int, default=5, help="full-size train files (10000 images each)")
    ap.add_argument("--budget", default="lifted", help="'lifted' (quick sizes, no time limit) or seconds")
    ap.add_argument("--action", default="d4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an audit limit, e.g. pgd_samples=100"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from symgen.audit import audit
    from symgen.audit.limits import resolve_limits
    from symgen.audit.planning import estimate_costs, time_passes
    from symgen.models import resnet18

    print(f"load average at start: {os.getloadavg()}; {args.threads} thread(s)")
    start_rss = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_fake_cifar(root, args.test_size, args.train_files, 10000, args.seed)
        print(f"fake CIFAR-10 files written in {time.perf_counter() - t0:.1f} s")
        torch.manual_seed(args.seed)
        model = resnet18()
        with torch.no_grad():
            model.train()
            model(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed)))
        model.eval()
        n = sum(p.numel() for p in model.parameters())
        limits = {}
        for item in args.set:
            key, value = item.split("=", 1)
            import yaml

            limits[key] = yaml.safe_load(value)
        if args.budget == "lifted":
            budget, limits = "quick", {"time_limit": 1e9, **limits}
        else:
            budget = float(args.budget)
        resolve_limits(budget, limits)  # bad limits fail here, before the files are read
        xb = torch.rand(16, 3, 32, 32)
        timing = time_passes(model, xb, torch.randint(0, 10, (16,)))
        n_train = args.train_files * 10000 + (5 - args.train_files) * 16
        predicted = estimate_costs(resolve_limits("quick", {"time_limit": 1e9}), timing, n_train, args.test_size, 8)
        marks: list[tuple[str, float, float]] = []

        def progress(title: str) -> None:
            marks.append((title, time.perf_counter(), rss_mib()))
            print(f"  [{time.perf_counter() - t0:7.1f} s, peak RSS {rss_mib():6.0f} MiB] {title}", flush=True)

        print(
            f"ResNet-18, {n} parameters; test split {args.test_size} images (streamed), train split {n_train}; "
            f"budget {args.budget}; action {args.action}"
        )
        t0 = time.perf_counter()
        result = audit(
            model,
            "cifar10",
            args.action,
            root=root,
            budget=budget,
            limits=limits,
            generator=args.seed,
            progress=progress,
        )
        total = time.perf_counter() - t0
    print(
        f"\n{'section':18s} {'status':8s} {'wall s':>8s} {'cpu s':>8s} {'samples':>8s} {'predicted s (quick sizes)':>26s}"
    )
    for name, sec in result.sections.items():
        print(
            f"{name:18s} {sec.status:8s} {sec.seconds:8.1f} {sec.cpu_seconds:8.1f} {sec.samples or 0:8d} "
            f"{predicted.get(name, float('nan')):26.0f}"
        )
        for note in sec.skipped:
            print(f"    note: {note[:160]}")
    print(
        f"\ntotal {total:.1f} s ({total / 60:.1f} min); peak RSS {rss_mib():.0f} MiB (process, {start_rss:.0f} MiB "
        f"after imports); target < 10 min and < 4 GB"
    )
    print(f"limits used: { {k: v for k, v in result.limits.items() if k != 'noise_sigmas'} }")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

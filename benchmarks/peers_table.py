"""One table against every peer (`make bench-peers`): runs the PyTorch-peer worker (benchmarks/peers_torch.py) in
the peers' venv and the neural-tangents worker (benchmarks/peers_jax.py) in the JAX venv, then prints one markdown
table (operation, model, peer, symgen time, peer time, ratio = peer / symgen, each tool's error against its
reference, repeats, load average) and, with --write-readme, puts it into benchmarks/README.md between the
peers-table markers.

    python benchmarks/peers_table.py --torch-python .venv-peers/bin/python --jax-python .venv-jax/bin/python \
        [--quick] [--only REGEX] [--threads 1] [--repeats 3] [--no-pin] [--write-readme] [--json-out rows.json]

Timings: the tools of one row group run in turn (A, B, A, B, ...) in one process; each cell is the median of
the repeats. The workers run in a scratch directory (torchensemble and e2cnn write nothing into the repo).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peers_common import format_rows, loadavg, replace_section, row

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VERSIONS = {
    "torch": ("torch", "jax"),
    "symgen": ("torch", "jax"),
    "numpy": ("torch", "jax"),
    "pyhessian": ("torch",),
    "hessian-eigenthings": ("torch",),
    "curvlinops-for-pytorch": ("torch",),
    "backpack-for-pytorch": ("torch",),
    "e2cnn": ("torch",),
    "torchensemble": ("torch",),
    "jax": ("jax",),
    "jaxlib": ("jax",),
    "neural-tangents": ("jax",),
}


def versions(python: str, side: str) -> dict[str, str]:
    names = [k for k, v in VERSIONS.items() if side in v]
    code = (
        "import importlib.metadata as m, json\n"
        f"out = {{}}\nfor n in {names!r}:\n"
        "    try: out[n] = m.version(n)\n    except Exception: out[n] = 'missing'\nprint(json.dumps(out))"
    )
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    except Exception as e:  # noqa: BLE001
        return {n: f"unknown ({type(e).__name__})" for n in names}


def pinned_cpus(args) -> set[int]:
    """The CPUs a worker is pinned to: the first ``--threads`` of those allowed (none with ``--no-pin``).

    A thread count alone does not bound a tool's cores: JAX runs its compiled calls on a worker thread beside
    the caller's, so neural-tangents at one XLA thread used about 1.4 cores on small calls (322 us of CPU in
    231 us of wall time, session 10). Pinned, every tool in the process gets the same cores."""
    if args.no_pin or not hasattr(os, "sched_setaffinity"):
        return set()
    return set(sorted(os.sched_getaffinity(0))[: args.threads])


def run_worker(python: str, script: str, args, side: str) -> list[dict]:
    """Run one worker; a worker that cannot start or crashes gives one row saying so."""
    if not python or not Path(python).exists():
        return [row(f"{side} peers", "-", "-", note=f"no interpreter at {python!r} (make bench-peers builds it)")]
    python = os.path.abspath(python)  # the workers run elsewhere; abspath keeps the venv's symlink
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [python, str(HERE / script), "--json", str(out), "--threads", str(args.threads)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--only", args.only] if args.only else []
        cmd += ["--repeats", str(args.repeats)] if args.repeats else []
        env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
        if args.threads == 1:
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        cpus = pinned_cpus(args)
        print(f"== {side}: {' '.join(cmd)} (CPUs {sorted(cpus) if cpus else 'all'})", file=sys.stderr, flush=True)
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=sys.stderr, stderr=sys.stderr, preexec_fn=pin)
        if proc.returncode != 0 or not out.exists():
            return [row(f"{side} peers", "-", "-", note=f"worker {script} exited with {proc.returncode}")]
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", default=sys.executable, help="interpreter of the PyTorch peers' venv")
    ap.add_argument("--jax-python", default=str(ROOT / ".venv-jax/bin/python"), help="interpreter of the JAX venv")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run)")
    ap.add_argument("--only", default=None, help="regex searched in 'operation | model | peer' (case-insensitive)")
    ap.add_argument("--threads", type=int, default=1, help="torch / XLA threads in the workers")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per tool (default 3, --quick 1)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin each worker to --threads CPUs")
    ap.add_argument("--skip", default="", help="comma-separated: torch, jax")
    ap.add_argument("--write-readme", action="store_true", help="replace the table in benchmarks/README.md")
    ap.add_argument("--json-out", default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    start, load0, t0 = datetime.datetime.now(datetime.timezone.utc), loadavg(), time.perf_counter()
    rows: list[dict] = []
    vers: dict[str, str] = {}
    if "torch" not in skip:
        rows += run_worker(args.torch_python, "peers_torch.py", args, "torch")
        vers.update(versions(args.torch_python, "torch"))
    if "jax" not in skip:
        rows += run_worker(args.jax_python, "peers_jax.py", args, "jax")
        jv = versions(args.jax_python, "jax") if Path(args.jax_python).exists() else {}
        vers.update({k: v for k, v in jv.items() if k in ("jax", "jaxlib", "neural-tangents")})
    minutes = (time.perf_counter() - t0) / 60
    header = (
        f"Measured {start:%Y-%m-%d %H:%M} UTC, {minutes:.0f} min, `{' '.join(sys.argv[1:]) or '(defaults)'}`; "
        f"{os.cpu_count()} CPUs ({platform.machine()}), {args.threads} thread(s) per tool, "
        + (f"each worker pinned to {len(pinned_cpus(args))} CPU(s)" if pinned_cpus(args) else "workers not pinned")
        + "; load average "
        f"(1/5/15 min) {load0} at the start, {loadavg()} at the end, and per row below. "
        "Ratio = peer time / symgen time (> 1: symgen ahead); times are medians of the repeats, the tools "
        "alternating in one process.\n\nVersions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "."
    )
    text = header + "\n\n" + format_rows(rows) + "\n"
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"header": header, "rows": rows}, indent=1, default=float))
    if args.write_readme:
        readme = HERE / "README.md"
        readme.write_text(replace_section(readme.read_text(), text))
        print(f"(written into {readme})", file=sys.stderr)


if __name__ == "__main__":
    main()

"""A tiny experiment for the run store's fault tests, with hooks set by environment variables.

SYMGEN_STORE_MARKER: a file each trial appends "<i> <pid>" to as it starts.
SYMGEN_STORE_KILL_AT=i: trial i SIGKILLs its own process (the main one, or a pool worker).
SYMGEN_STORE_STOP_AT=i: trial i raises KeyboardInterrupt (Ctrl-C).
SYMGEN_STORE_SLEEP=i:seconds (i may be *): trial i sleeps first.
SYMGEN_STORE_PRINT=1: each trial prints a line on stdout.
Trials run in two phases of n // 2 and the rest; each result is logged after its phase.
"""

import os
import signal
import time

from symgen.experiments.base import Claim, Experiment, ExperimentConfig


class Config(ExperimentConfig):
    n: int = 6
    scale: float = 1.0


def trial(item: dict) -> dict:
    i = item["i"]
    marker = os.environ.get("SYMGEN_STORE_MARKER")
    if marker:
        with open(marker, "a") as f:
            f.write(f"{i} {os.getpid()}\n")
    if str(i) == os.environ.get("SYMGEN_STORE_KILL_AT"):
        os.kill(os.getpid(), signal.SIGKILL)
    if str(i) == os.environ.get("SYMGEN_STORE_STOP_AT"):
        raise KeyboardInterrupt
    sleep = os.environ.get("SYMGEN_STORE_SLEEP")
    if sleep:
        which, seconds = sleep.split(":")
        if which in ("*", str(i)):
            time.sleep(float(seconds))
    if os.environ.get("SYMGEN_STORE_PRINT"):
        print(f"trial {i}", flush=True)
    return {"i": i, "value": item["scale"] * i}


def run(config: Config, ctx) -> dict:
    items = [{"i": i, "scale": config.scale} for i in range(config.n)]
    half = config.n // 2
    results = []
    for phase in (items[:half], items[half:]):
        done = ctx.map(trial, phase)
        for r in done:
            ctx.log(i=r["i"], value=r["value"])
        results += done
    return {"values": [r["value"] for r in results]}


def check_claims(config: Config, result: dict) -> list[Claim]:
    total = sum(result["values"])
    expected = config.scale * sum(range(config.n))
    return [Claim(id="S1", statement="sum is right", measured=total, threshold=expected, passed=total == expected)]


EXPERIMENT = Experiment(
    name="storetoy", title="store toy", paper="none", config=Config, run=run, check_claims=check_claims, claims=("S1",)
)

"""A tiny experiment for testing the run store and CLI (registered by the tests only)."""

import math
import os

from symgen.errors import DivergenceError
from symgen.experiments.base import Claim, Experiment, ExperimentConfig


class Config(ExperimentConfig):
    n: int = 3
    scale: float = 1.0
    nan: bool = False


def trial(item: dict) -> dict:
    marker = os.environ.get("SYMGEN_TOY_MARKER")
    if marker:
        with open(marker, "a") as f:
            f.write(f"{item['i']}\n")
    if str(item["i"]) == os.environ.get("SYMGEN_TOY_FAIL_AT"):  # simulates an interrupted run
        raise KeyboardInterrupt
    if item["nan"]:
        raise DivergenceError(f"loss became NaN in trial {item['i']}; lower the learning rate.")
    return {"i": item["i"], "value": item["scale"] * item["i"] ** 2}


def run(config: Config, ctx) -> dict:
    items = [{"i": i, "scale": config.scale, "nan": config.nan} for i in range(config.n)]
    results = ctx.map(trial, items)
    ctx.log(done=len(results))
    return {"values": [r["value"] for r in results], "tables": {"values": results}}


def check_claims(config: Config, result: dict) -> list[Claim]:
    total = sum(result["values"])
    expected = config.scale * sum(i * i for i in range(config.n))
    return [
        Claim(
            id="T1",
            statement="sum of squares is right",
            measured=total,
            threshold=expected,
            passed=math.isclose(total, expected),
        ),
        Claim(id="T2", statement="always fails", measured=0.0, threshold=1.0, passed=False, note="on purpose"),
    ]


def figures(result: dict, outdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(result["values"])
    path = outdir / "values.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


EXPERIMENT = Experiment(
    name="toy",
    title="toy",
    paper="none",
    config=Config,
    run=run,
    check_claims=check_claims,
    figures=figures,
    quick={"n": 2},
    claims=("T1", "T2"),
)

"""benchmarks/peers_common.py: the README section replacement, alternating timings, rows and the table."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers_common as pc  # noqa: E402


def test_replace_section_appends_then_replaces_in_place():
    text = "# Benchmarks\n\n## Peers table\n\nintro\n"
    once = pc.replace_section(text, "| a |\n")
    assert once.startswith(text.rstrip("\n"))
    assert once.count(pc.BEGIN) == 1 and once.count(pc.END) == 1
    twice = pc.replace_section(once + "\n## after\n", "| b |")
    assert "| a |" not in twice and "| b |" in twice
    assert twice.count(pc.BEGIN) == 1 and twice.endswith("## after\n")
    assert twice.index("intro") < twice.index("| b |") < twice.index("## after")


def test_alternate_interleaves_and_takes_medians():
    calls = []

    def tool(name):
        def fn():
            calls.append(name)
            return name

        return fn

    times, outs = pc.alternate({"a": tool("a"), "b": tool("b")}, repeats=3, warmup=True)
    assert calls == ["a", "b"] * 4  # one warm-up each, then A, B, A, B, ...
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert outs == {"a": "a", "b": "b"}


def test_alternate_keeps_going_when_a_tool_fails():
    def bad():
        raise RuntimeError("peer broke")

    times, outs = pc.alternate({"ok": lambda: 1, "bad": bad}, repeats=2)
    assert math.isnan(times["bad"]) and isinstance(outs["bad"], RuntimeError)
    assert outs["ok"] == 1 and not math.isnan(times["ok"])
    assert pc.failure(outs["bad"]) == "RuntimeError: peer broke"


def test_rows_table_ratio_and_errors():
    r = pc.row("HVP", "m", "peer", symgen_s=0.5, peer_s=1.0, symgen_err=1e-7, peer_err=0.0, repeats=3)
    missing = pc.row("HVP", "m", "other", note="not installed: ImportError: x")
    table = pc.format_rows([r, missing])
    lines = table.splitlines()
    assert lines[0].startswith("| operation | model | peer | symgen | peer time | ratio |")
    assert "| 500.0 ms | 1.00 s | 2.00x | 1.0e-07 | 0 |" in lines[2]
    assert "not installed" in lines[3] and "| - | - | - |" in lines[3]


def test_rel_err_and_wanted():
    assert pc.rel_err(1.001, 1.0) == pc.rel_err(1.001, 1.0)
    assert abs(pc.rel_err(1.001, 1.0) - 1e-3) < 1e-12
    assert math.isnan(pc.rel_err(ValueError(), 1.0))
    assert pc.wanted(None, "a", "b", "c") and pc.wanted("resnet", "trace", "ResNet-20", "PyHessian")
    assert not pc.wanted("^GGN", "Hessian trace", "x", "y")

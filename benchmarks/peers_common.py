"""Shared helpers of the peers table (benchmarks/peers_table.py and its workers): alternating timings,
errors, rows, the markdown table and the README section it is written into. Standard library only, so the
orchestrator runs in any venv; torch is imported where a helper needs it."""

from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

BEGIN = "<!-- peers-table:begin (written by benchmarks/peers_table.py --write-readme) -->"
END = "<!-- peers-table:end -->"
COLUMNS = (
    "operation",
    "model",
    "peer",
    "symgen",
    "peer time",
    "ratio",
    "symgen error",
    "peer error",
    "error against",
    "repeats",
    "load",
    "note",
)


def loadavg() -> str:
    """The 1-minute load average (the 5- and 15-minute ones after), as printed beside every timing."""
    a, b, c = os.getloadavg()
    return f"{a:.1f}/{b:.1f}/{c:.1f}"


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True) -> tuple[dict[str, float], dict]:
    """Run the tools in turn (A, B, A, B, ...) ``repeats`` times after one untimed call each (``warmup``):
    returns ({name: median seconds}, {name: output of its last call}). A tool that raises is dropped from the
    later rounds; its median is NaN and its output the exception."""
    outs: dict[str, Any] = {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    live = dict(fns)
    if warmup:
        for k, fn in list(live.items()):
            try:
                outs[k] = fn()
            except Exception as e:  # noqa: BLE001 - a failing tool gives a row with its reason
                outs[k] = e
                del live[k]
    for _ in range(repeats):
        for k, fn in list(live.items()):
            t = time.perf_counter()
            try:
                outs[k] = fn()
            except Exception as e:  # noqa: BLE001
                outs[k] = e
                del live[k]
                continue
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) if v else math.nan for k, v in times.items()}, outs


def rel_err(value: Any, ref: Any) -> float:
    """|value - ref| / |ref| for numbers; max |value - ref| / max |ref| for tensors and arrays."""
    if isinstance(value, Exception) or value is None or ref is None:
        return math.nan
    if isinstance(value, (int, float)) and isinstance(ref, (int, float)):
        return abs(value - ref) / max(abs(ref), 1e-300)
    import torch

    v = torch.as_tensor(value).detach().double().reshape(-1)
    r = torch.as_tensor(ref).detach().double().reshape(-1)
    return float((v - r).abs().max() / r.abs().max().clamp_min(1e-300))


def failure(e: BaseException) -> str:
    """A one-line reason for a row whose tool failed."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:160]


def row(op: str, model: str, peer: str, **fields: Any) -> dict[str, Any]:
    """One table row; fields: symgen_s, peer_s, symgen_err, peer_err, reference, repeats, note."""
    out = {"operation": op, "model": model, "peer": peer, "load": loadavg()}
    out.update(fields)
    print(f"[row] {op} | {model} | {peer}: symgen {out.get('symgen_s')}, peer {out.get('peer_s')}", file=sys.stderr)
    return out


def wanted(pattern: str | None, op: str, model: str, peer: str) -> bool:
    """--only: a regular expression searched (case-insensitive) in 'operation | model | peer'."""
    return pattern is None or re.search(pattern, f"{op} | {model} | {peer}", re.IGNORECASE) is not None


def guarded(rows: list[dict], specs: list[tuple[str, str, str]], fn: Callable[[], list[dict]]) -> None:
    """Run one group of rows; if it raises, every row it would have given says why (no crash)."""
    try:
        rows.extend(fn())
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.extend(row(op, model, peer, note=f"group failed: {failure(e)}") for op, model, peer in specs)


def _seconds(s: Any) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _err(e: Any) -> str:
    if e is None or (isinstance(e, float) and math.isnan(e)):
        return "-"
    if isinstance(e, str):
        return e
    return "0" if e == 0 else f"{e:.1e}"


def format_rows(rows: list[dict]) -> str:
    """The markdown table: ratio = peer time / symgen time (> 1: symgen ahead)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        s, p = r.get("symgen_s"), r.get("peer_s")
        ratio = "-"
        if isinstance(s, float) and isinstance(p, float) and s > 0 and not (math.isnan(s) or math.isnan(p)):
            ratio = f"{p / s:.2f}x"
        cells = [
            r["operation"],
            r["model"],
            r["peer"],
            _seconds(s),
            _seconds(p),
            ratio,
            _err(r.get("symgen_err")),
            _err(r.get("peer_err")),
            r.get("reference", "-"),
            str(r.get("repeats", "-")),
            r.get("load", "-"),
            r.get("note", ""),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def replace_section(text: str, body: str) -> str:
    """``text`` with the part between the BEGIN and END markers replaced by ``body`` (appended with the
    markers when they are absent)."""
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    i, j = text.find(BEGIN), text.find(END)
    if i >= 0 and j > i:
        return text[:i] + block + text[j + len(END) :]
    return text.rstrip("\n") + "\n\n" + block + "\n"

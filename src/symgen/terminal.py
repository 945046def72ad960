"""Terminal output of the command line: tables that never cut a value, one line per claim, progress.

Everything a user may type back (experiment names, run ids, paths, commands) is printed whole, in a
terminal or a pipe, at any width: tables are plain padded text, a line longer than the terminal
wraps instead of being shortened. Progress is a rich bar in a terminal and a plain line every few
seconds otherwise (a log or CI never sits in silence).

No stored string reaches the terminal raw: every printer here passes its text through :func:`printable`,
which shows C0 and C1 control characters (ESC, BEL, CR, CSI U+009B ...) as visible escapes such as
``\\x1b`` and ``\\u009b``, so a model spec, path or claim cannot set the window title or clear the screen.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

__all__ = [
    "printable",
    "text_table",
    "claim_headline",
    "claim_line",
    "claim_lines",
    "format_value",
    "dump_json",
    "progress",
    "Ticker",
    "is_tty",
]

PROGRESS_INTERVAL = 10.0  # seconds between plain progress lines outside a terminal

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 control characters


def printable(text: Any, keep: str = "\n\t") -> str:
    """``text`` safe to write to a terminal: control characters shown as visible escapes.

    C0 characters and DEL become ``\\xNN`` (ESC is ``\\x1b``, BEL ``\\x07``, CR ``\\x0d``), C1 characters
    ``\\u00NN`` (CSI is ``\\u009b``); every other character, any script included, is kept.

    Args:
        text: the text (anything else is passed through ``str``).
        keep: control characters left as they are: newline and tab for whole lines, none for a table
            cell or a label that must stay on one line.

    Returns:
        The text without raw control characters outside ``keep``.
    """

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"

    return _CONTROL.sub(escape, str(text))


def is_tty(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` is a terminal.

    Args:
        stream: the stream (default: stderr).

    Returns:
        True for a terminal; False for a pipe, a file or a closed stream.
    """
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, two spaces apart; no cell is ever shortened.

    Args:
        headers: the column names.
        rows: the cells of each row (anything, passed through ``str``).

    Returns:
        The table, one line per row; every cell and header through :func:`printable` with no control
        character kept (a newline in a cell shows as ``\\x0a`` and cannot break the table).
    """
    headers = [printable(h, keep="") for h in headers]
    body = [[printable(c, keep="") for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in body:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths])] + [line(r) for r in body])


def format_value(v: Any, digits: int = 4) -> str:
    """Short human form of a measured value, in terminals and pages.

    Args:
        v: a number, bool, dict, list or anything with a ``str``.
        digits: significant digits of floats.

    Returns:
        The text.
    """
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={format_value(x, digits)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x, digits) for x in v) + "]"
    return str(v)


def _numbers(obj: Any, prefix: str = "", lists: bool = False) -> list[tuple[str, float]]:
    """(dotted key, number) of every numeric leaf of a measured/threshold value, in order (list items as
    ``key.0``, ``key.1`` ... with ``lists``: a claim's ``headline`` may name one)."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [(prefix, float(obj))]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if lists and isinstance(obj, list) else ()
    out = []
    for k, v in items:
        out += _numbers(v, f"{prefix}.{k}" if prefix else str(k), lists)
    return out


def claim_headline(claim: dict[str, Any]) -> dict[str, Any]:
    """The claim's headline number against its threshold: ``{key, measured, threshold, paper, margin}``.

    An experiment names it with the claim's ``headline`` (a key of ``measured``); otherwise it is the
    first measured number whose key matches a numeric threshold key (``min_cos_to_svm`` for
    ``min_cos``), or the single number of a scalar claim. ``margin`` is the distance to the
    threshold, positive on the passing side, negative on the failing side (the verdict says which
    side passes).

    Args:
        claim: a claim dict (``measured``, ``threshold``, optional ``headline``, ...).

    Returns:
        The dict; fields are None where the claim has no such number.
    """
    measured, threshold = claim.get("measured"), claim.get("threshold")
    m_nums, t_nums = _numbers(measured), _numbers(threshold)
    key = claim.get("headline") or None
    m_val = t_val = None
    if key is not None:
        m_val = dict(_numbers(measured, lists=True)).get(key)
        t_val = dict(t_nums).get(key)
        if t_val is None:
            t_val = next((v for k, v in t_nums if key.startswith(k) or k.startswith(key)), None)
    elif isinstance(measured, (int, float)) and not isinstance(measured, bool):
        key, m_val = "value", float(measured)
        t_val = t_nums[0][1] if len(t_nums) == 1 else None
    else:
        for tk, tv in t_nums:
            base = tk.split(".")[-1]
            hit = next(((k, v) for k, v in m_nums if k.split(".")[-1].startswith(base) or base in k), None)
            if hit is not None:
                key, m_val, t_val = hit[0], hit[1], tv
                break
        if key is None and m_nums:
            key, m_val = m_nums[0]
    margin = None
    if m_val is not None and t_val is not None and math.isfinite(m_val) and math.isfinite(t_val):
        margin = abs(m_val - t_val) * (1 if claim.get("passed") else -1)
    return {"key": key, "measured": m_val, "threshold": t_val, "paper": claim.get("paper"), "margin": margin}


def claim_line(claim: dict[str, Any]) -> list[str]:
    """Cells of one claim's line: id, verdict, headline number vs threshold (and the paper's), margin.

    Args:
        claim: a claim dict.

    Returns:
        The cells as strings.
    """
    h = claim_headline(claim)
    verdict = "PASS" if claim.get("passed") else "FAIL"
    if h["measured"] is None:
        number = "-"
    else:
        number = f"{h['key']}={format_value(h['measured'], 3)}"
        if h["threshold"] is not None:
            number += f" vs {format_value(h['threshold'], 3)}"
    paper = "-" if h["paper"] is None else format_value(h["paper"], 3)
    margin = "-" if h["margin"] is None else f"{h['margin']:+.3g}"
    return [str(claim["id"]), verdict, number, paper, margin]


def claim_lines(claims: Sequence[dict[str, Any]], title: str = "") -> str:
    """One line per claim (the full measured values are in the HTML report and in ``--json``).

    Args:
        claims: claim dicts.
        title: a heading before the pass count.

    Returns:
        The text: the pass count and a table.
    """
    n = sum(bool(c.get("passed")) for c in claims)
    head = f"{printable(title, keep='')}: " if title else ""
    table = text_table(
        ["claim", "verdict", "headline vs threshold", "paper", "margin"], [claim_line(c) for c in claims]
    )
    return f"{head}{n}/{len(claims)} claims pass\n{table}"


def dump_json(obj: Any, stream: IO[str] | None = None) -> None:
    """Machine-readable output: one JSON document on stdout.

    ASCII JSON: every control and non-ASCII character of a string is a ``\\uXXXX`` escape, never raw.

    Args:
        obj: JSON-able values (others through ``str``).
        stream: where it goes (default: stdout).
    """
    stream = stream if stream is not None else sys.stdout
    stream.write(json.dumps(obj, indent=2, default=str, ensure_ascii=True) + "\n")
    stream.flush()


class Ticker:
    """Plain progress lines on ``stream`` at most every ``interval`` seconds (for pipes and logs).

    Args:
        desc: the label.
        total: the number of items, when known.
        stream: where the lines go (default: stderr).
        interval: the least number of seconds between lines.
    """

    def __init__(
        self, desc: str, total: int | None = None, stream: IO[str] | None = None, interval: float = PROGRESS_INTERVAL
    ):
        self.desc, self.total, self.interval = printable(desc, keep=""), total, interval
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = time.monotonic()
        self.done = 0

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done; write a line when ``interval`` seconds have passed since the last.

        Args:
            n: the items done.
        """
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            self.stream.write(f"  {self.desc}: {self.done}{of} ({now - self.start:.0f} s)\n")
            self.stream.flush()


def progress(
    iterable: Iterable[Any], desc: str = "", total: int | None = None, stream: IO[str] | None = None
) -> Iterator[Any]:
    """Yield from ``iterable`` with a rich progress bar in a terminal, plain periodic lines otherwise.

    Args:
        iterable: the items.
        desc: the label of the bar.
        total: the number of items, if known.
        stream: where the bar goes (default ``sys.stderr``).

    Yields:
        The items of ``iterable``.
    """
    stream = stream if stream is not None else sys.stderr
    if not is_tty(stream):
        tick = Ticker(desc or "progress", total, stream)
        for item in iterable:
            yield item
            tick.advance()
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        console=Console(file=stream),
    ) as bar:
        task = bar.add_task(escape(printable(desc, keep="")), total=total)  # no control characters, no markup
        for item in iterable:
            yield item
            bar.advance(task)

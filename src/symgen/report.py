"""Static HTML reports: claims table, result tables and figures, one self-contained page.

Figures are embedded as base64 PNG so ``report.html`` opens from disk without a server.

Every string that reaches a page (names, ids, captions, cells, paths, claims, config values) is data, never
markup: text and attribute values go through :func:`html.escape` (quotes included), ids keep only a safe
charset (:func:`safe_id`), links are percent-encoded relative paths and a link with a scheme such as
``javascript:`` is refused (:func:`safe_href`), and the page's JSON escapes ``<``, ``>`` and ``&``.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from symgen.io import atomic_write
from symgen.terminal import format_value

__all__ = [
    "write_report",
    "render_page",
    "render_index",
    "format_value",
    "pyplot",
    "save_figure",
    "safe_id",
    "safe_href",
]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4} .pass{color:#176f2c;font-weight:bold} .fail{color:#b00020;font-weight:bold}
figure{display:inline-block;margin:1em;max-width:520px} figure.missing{border:1px dashed #aaa;padding:1em;color:#555;min-height:6em;vertical-align:top} figure img{max-width:100%} figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
"""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend: figures are files, never windows.

    Returns:
        The ``matplotlib.pyplot`` module.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120, *, tight: bool = True) -> Path:
    """Save ``fig`` as a PNG at ``path`` (folders made as needed) and close it.

    Args:
        fig: a matplotlib figure.
        path: the PNG file.
        dpi: its resolution.
        tight: apply ``fig.tight_layout()`` first.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_.:-]+")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_URL_IGNORED = re.compile(r"[\x00-\x20\x7f]")  # what a browser drops or trims when it parses a URL


def _esc(value: Any) -> str:
    """``value`` as HTML text or a quoted attribute value (``& < > " '`` escaped)."""
    return html.escape(str(value), quote=True)


def safe_id(name: Any) -> str:
    """An HTML id from any string: runs of characters outside ``A-Z a-z 0-9 _ . : -`` become ``-``.

    Args:
        name: the string (a table's name, say ``"hessian eigenvalues"``).

    Returns:
        The id (``"hessian-eigenvalues"``); ``"id"`` when nothing is left.
    """
    return _UNSAFE_ID.sub("-", str(name)).strip("-") or "id"


def safe_href(url: Any) -> str | None:
    """A link target from a stored path: percent-encoded, or None when it could leave the page's folder tree.

    Args:
        url: a relative path (``"run-1/report.html"``).

    Returns:
        The path percent-encoded (only ``/`` and unreserved characters stay); None for a URL with a scheme
        (``javascript:``, ``data:``, ``http:`` ...) or a network path (``//host``), whitespace and control
        characters ignored as a browser ignores them.
    """
    text = str(url)
    bare = _URL_IGNORED.sub("", text).replace("\\", "/")
    if not bare or _SCHEME.match(bare) or bare.startswith("//"):
        return None
    return quote(text, safe="/")


def _json_script(obj: Any) -> str:
    """``obj`` as the page's ``<script type="application/json" id="data">``; ``<``, ``>``, ``&`` as \\u escapes,
    so no string inside can close the element or open a comment."""
    text = json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="data">{text}</script>'


def _table(rows: Sequence[dict[str, Any]], table_id: str = "") -> str:
    if not rows:
        return "<p>(empty)</p>"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(format_value(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
    )
    ident = f' id="{_esc(safe_id(table_id))}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _claims_table(claims: Sequence[dict[str, Any]]) -> str:
    rows = []
    for c in claims:
        verdict = '<span class="pass">PASS</span>' if c["passed"] else '<span class="fail">FAIL</span>'
        rows.append(
            f'<tr data-claim="{_esc(c["id"])}"><td>{_esc(c["id"])}</td>'
            f'<td>{_esc(c["statement"])}</td><td class="measured">{_esc(format_value(c["measured"]))}</td>'
            f"<td>{_esc(format_value(c['threshold']))}</td><td>{verdict}</td>"
            f"<td>{_esc(c.get('note') or '')}</td></tr>"
        )
    return (
        '<table id="claims"><thead><tr><th>claim</th><th>statement</th><th>measured</th><th>threshold</th>'
        "<th>verdict</th><th>note</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _figures(paths: Sequence[Path]) -> str:
    out = []
    for p in paths:
        data = base64.b64encode(p.read_bytes()).decode()
        out.append(
            f'<figure><img alt="{_esc(p.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(p.name)}</figcaption></figure>"
        )
    return "".join(out)


def render_page(
    title: str,
    *,
    subtitle: str = "",
    claims: Sequence[dict[str, Any]] = (),
    tables: Mapping[str, Sequence[dict[str, Any]]] | None = None,
    figures: Sequence[Path] = (),
    config: Any = None,
    data_json: Any = None,
    placeholders: Sequence[tuple[str, str]] = (),
) -> str:
    """One self-contained HTML page.

    Args:
        title: the page title.
        subtitle: a line under the title.
        claims: claim dicts (``id``, ``passed``, ...) shown as a table with a pass count.
        tables: table name -> rows (dicts).
        figures: PNG files embedded in the page.
        config: settings shown on the page.
        data_json: data embedded in the page as JSON.
        placeholders: (figure name, why it is missing) shown in its place.

    Returns:
        The HTML text.
    """
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"
    ]
    if subtitle:
        parts.append(f"<p>{_esc(subtitle)}</p>")
    if claims:
        n = sum(bool(c["passed"]) for c in claims)
        parts.append(f"<h2>Claims ({n}/{len(claims)} pass)</h2>{_claims_table(claims)}")
    if figures or placeholders:
        missing = "".join(
            f'<figure class="missing" data-figure="{_esc(n)}"><p>{_esc(why)}</p>'
            f"<figcaption>{_esc(n)} (not drawn)</figcaption></figure>"
            for n, why in placeholders
        )
        parts.append(f"<h2>Figures</h2>{_figures(figures)}{missing}")
    used: set[str] = set()
    for name, rows in (tables or {}).items():
        ident, base, k = safe_id(name), safe_id(name), 1
        while ident in used:  # two names that differ only outside the safe charset: distinct ids
            k += 1
            ident = f"{base}-{k}"
        used.add(ident)
        parts.append(f"<h2>{_esc(name)}</h2>{_table(rows, table_id=ident)}")
    if config is not None:
        parts.append(f"<h2>Configuration</h2><pre>{_esc(yaml.safe_dump(config, sort_keys=False))}</pre>")
    if data_json is not None:
        parts.append(_json_script(data_json))
    parts.append("</body></html>")
    return "".join(parts)


def write_report(run: Any) -> Path:
    """Write ``report.html`` for a run directory from its config, claims, result tables and figures.

    Args:
        run: anything with a ``path`` (the run directory).

    Returns:
        The path of the page.
    """
    path = Path(run.path)
    meta = yaml.safe_load((path / "config.yaml").read_text())
    claims = json.loads((path / "claims.json").read_text()) if (path / "claims.json").exists() else []
    result = json.loads((path / "result.json").read_text()) if (path / "result.json").exists() else {}
    tables = result.get("tables") if isinstance(result, dict) else None
    figures = sorted((path / "figures").glob("*.png")) if (path / "figures").exists() else []
    page = render_page(
        f"symgen run: {meta['experiment']}",
        subtitle=f"{path.name}" + (" (quick settings)" if meta.get("quick") else ""),
        claims=claims,
        tables=tables,
        figures=figures,
        config=meta["config"],
        data_json={"claims": claims},
    )
    target = path / "report.html"
    atomic_write(target, page)
    return target


def render_index(summary: dict[str, Any]) -> str:
    """The one page of a whole reproduction (``index.html`` beside the run directories).

    Every claim is a row: verdict, our headline number, the paper's, the threshold, a link to its report.

    Args:
        summary: what ``symgen reproduce --json`` prints: ``experiments`` (name, run id, report path
            relative to the page, seconds, claims), ``machine``, ``versions``, ``seed``, ``seconds``.

    Returns:
        The HTML text.
    """
    from symgen.terminal import claim_headline

    rows, n_pass, n_all = [], 0, 0
    for exp in summary["experiments"]:
        href = safe_href(exp["report"])
        link = f'<a href="{_esc(href)}">report</a>' if href else f"(link refused: {_esc(exp['report'])})"
        for c in exp["claims"]:
            h = claim_headline(c)
            n_all += 1
            n_pass += bool(c["passed"])
            verdict = '<span class="pass">PASS</span>' if c["passed"] else '<span class="fail">FAIL</span>'
            num = "-" if h["measured"] is None else f"{h['key']} = {format_value(h['measured'])}"
            rows.append(
                f'<tr data-claim="{_esc(exp["name"])}:{_esc(c["id"])}"><td>{_esc(exp["name"])}</td>'
                f'<td>{_esc(c["id"])}</td><td>{verdict}</td><td class="ours">{_esc(num)}</td>'
                f'<td class="paper">{_esc("-" if h["paper"] is None else format_value(h["paper"]))}</td>'
                f'<td class="threshold">{_esc(format_value(c["threshold"]))}</td>'
                f"<td>{_esc(c['statement'])}</td><td>{link}</td></tr>"
            )
    claims = (
        '<table id="claims"><thead><tr><th>experiment</th><th>claim</th><th>verdict</th><th>ours</th>'
        "<th>paper</th><th>threshold</th><th>statement</th><th>report</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    exps = _table(
        [
            {
                "experiment": e["name"],
                "run": e["run"],
                "claims passed": f"{e['passed']}/{len(e['claims'])}",
                "seconds": round(e["seconds"], 1),
            }
            for e in summary["experiments"]
        ],
        "experiments",
    )
    env = _table(
        [
            {"what": k, "value": v}
            for k, v in {
                **summary["machine"],
                **summary["versions"],
                "seed": summary.get("seed"),
                "settings": summary.get("settings"),
            }.items()
        ],
        "environment",
    )
    title = f"symgen reproduce: {n_pass}/{n_all} claims pass"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"
        f"<p>total time {float(summary['seconds']):.1f} s, started {_esc(summary.get('started', ''))}</p>"
        f"<h2>Claims</h2>{claims}<h2>Experiments</h2>{exps}<h2>Machine, versions, seeds</h2>{env}"
        f"{_json_script(summary)}</body></html>"
    )
    return page

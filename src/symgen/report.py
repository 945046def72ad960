"""Static HTML reports: claims table, result tables and figures, one self-contained page.

Figures are embedded as base64 PNG so ``report.html`` opens from disk without a server.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from symgen.io import atomic_write
from symgen.terminal import format_value

__all__ = ["write_report", "render_page", "render_index", "format_value", "pyplot", "save_figure"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4} .pass{color:#176f2c;font-weight:bold} .fail{color:#b00020;font-weight:bold}
figure{display:inline-block;margin:1em;max-width:520px} figure.missing{border:1px dashed #aaa;padding:1em;color:#555;min-height:6em;vertical-align:top} figure img{max-width:100%} figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
"""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend: figures are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120, *, tight: bool = True) -> Path:
    """Save ``fig`` as a PNG at ``path`` (tight layout, folders made as needed), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def _table(rows: Sequence[dict[str, Any]], table_id: str = "") -> str:
    if not rows:
        return "<p>(empty)</p>"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
    )
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _claims_table(claims: Sequence[dict[str, Any]]) -> str:
    rows = []
    for c in claims:
        verdict = '<span class="pass">PASS</span>' if c["passed"] else '<span class="fail">FAIL</span>'
        rows.append(
            f'<tr data-claim="{html.escape(c["id"])}"><td>{html.escape(c["id"])}</td>'
            f'<td>{html.escape(c["statement"])}</td><td class="measured">{html.escape(format_value(c["measured"]))}</td>'
            f"<td>{html.escape(format_value(c['threshold']))}</td><td>{verdict}</td>"
            f"<td>{html.escape(c.get('note', ''))}</td></tr>"
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
            f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(p.name)}</figcaption></figure>"
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
    """One self-contained HTML page. ``placeholders``: (figure name, why it is missing) shown in its place."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    if subtitle:
        parts.append(f"<p>{html.escape(subtitle)}</p>")
    if claims:
        n = sum(bool(c["passed"]) for c in claims)
        parts.append(f"<h2>Claims ({n}/{len(claims)} pass)</h2>{_claims_table(claims)}")
    if figures or placeholders:
        missing = "".join(
            f'<figure class="missing" data-figure="{html.escape(n)}"><p>{html.escape(why)}</p>'
            f"<figcaption>{html.escape(n)} (not drawn)</figcaption></figure>"
            for n, why in placeholders
        )
        parts.append(f"<h2>Figures</h2>{_figures(figures)}{missing}")
    for name, rows in (tables or {}).items():
        parts.append(f"<h2>{html.escape(name)}</h2>{_table(rows, table_id=name.replace(' ', '-'))}")
    if config is not None:
        parts.append(f"<h2>Configuration</h2><pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>")
    if data_json is not None:
        parts.append(
            '<script type="application/json" id="data">' + json.dumps(data_json).replace("</", "<\\/") + "</script>"
        )
    parts.append("</body></html>")
    return "".join(parts)


def write_report(run: Any) -> Path:
    """Write ``report.html`` for a run directory (anything with a ``path``) from its config, claims, result
    tables and figures."""
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

    ``summary`` (what ``symgen reproduce --json`` prints): ``experiments`` (name, run id, report
    path relative to the page, seconds, claims), ``machine``, ``versions``, ``seed``, ``seconds``.
    Every claim is a row: verdict, our headline number, the paper's, the threshold, a link to its report.
    """
    from symgen.terminal import claim_headline

    rows, n_pass, n_all = [], 0, 0
    for exp in summary["experiments"]:
        link = html.escape(exp["report"])
        for c in exp["claims"]:
            h = claim_headline(c)
            n_all += 1
            n_pass += bool(c["passed"])
            verdict = '<span class="pass">PASS</span>' if c["passed"] else '<span class="fail">FAIL</span>'
            num = "-" if h["measured"] is None else f"{h['key']} = {format_value(h['measured'])}"
            rows.append(
                f'<tr data-claim="{html.escape(exp["name"])}:{html.escape(c["id"])}"><td>{html.escape(exp["name"])}</td>'
                f'<td>{html.escape(c["id"])}</td><td>{verdict}</td><td class="ours">{html.escape(num)}</td>'
                f'<td class="paper">{html.escape("-" if h["paper"] is None else format_value(h["paper"]))}</td>'
                f'<td class="threshold">{html.escape(format_value(c["threshold"]))}</td>'
                f'<td>{html.escape(c["statement"])}</td><td><a href="{link}">report</a></td></tr>'
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
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>total time {summary['seconds']:.1f} s, started {html.escape(str(summary.get('started', '')))}</p>"
        f"<h2>Claims</h2>{claims}<h2>Experiments</h2>{exps}<h2>Machine, versions, seeds</h2>{env}"
        '<script type="application/json" id="data">'
        + json.dumps(summary).replace("</", "<\\/")
        + "</script></body></html>"
    )
    return page

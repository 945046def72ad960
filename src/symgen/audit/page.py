"""The audit's HTML page: the summary table first (every number with its uncertainty, its precision flag
and what it means), then the figures at a readable size, then each section's cost and, where a section did
not run, why, in place of its figure. Rendering only; the shell writes it. The sections, their figures and
their metrics' meanings come from the registry (:mod:`symgen.audit.registry`)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from symgen.audit.result import AuditResult

__all__ = ["render_audit_page", "meaning", "figure_of"]

# figures one per row, as wide as the page allows up to their own pixel size (drawn at figures.DPI); the
# summary's text columns (flag, note, meaning) wide enough and small enough that the table stays short
_CSS = (
    "<style>table#summary td,table#summary th{font-size:85%}"
    "table#summary td:nth-child(n+5){min-width:12em}"
    "section.figures figure{display:block;max-width:none;margin:1.5em 0}"
    "section.figures figure img{max-width:100%;height:auto}"
    "section.figures figure.missing{display:inline-block}</style>"
)


def figure_of() -> dict[str, str]:
    """Section name -> the figure it draws (registered sections with a figure)."""
    from symgen.audit.registry import sections

    return {s.name: s.figure for s in sections() if s.figure is not None}


def meaning(metric: str, section: str | None = None) -> str:
    """One sentence saying what ``metric`` means, from its section's registration.

    Args:
        metric: a metric's name (``loss_increase@0.01`` and the like included).
        section: its section's name (None: the first registered section that explains it).

    Returns:
        The sentence ("" when no section explains it).
    """
    from symgen.audit.registry import sections

    for s in sections():
        if section is None or s.name == section:
            text = s.meaning(metric)
            if text:
                return text
    return ""


def _summary_rows(result: AuditResult) -> list[dict[str, Any]]:
    return [{**r, "meaning": meaning(r["metric"], r["section"])} for r in result.summary_rows()]


def _figures_html(figures: Sequence[Path], placeholders: list[tuple[str, str]]) -> str:
    esc = html.escape
    out = []
    for p in figures:
        data = base64.b64encode(Path(p).read_bytes()).decode()
        out.append(
            f'<figure><img alt="{esc(Path(p).stem, quote=True)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(Path(p).name)}</figcaption></figure>"
        )
    for name, why in placeholders:
        out.append(
            f'<figure class="missing" data-figure="{esc(name, quote=True)}"><p>{esc(why)}</p>'
            f"<figcaption>{esc(name)} (not drawn)</figcaption></figure>"
        )
    return f'{_CSS}<h2>Figures</h2><section class="figures">{"".join(out)}</section>' if out else ""


def render_audit_page(result: AuditResult, figures: Sequence[Path], *, title: str | None = None) -> str:
    """The self-contained page of an audit (figures embedded), with its numbers as JSON in ``#data``.

    The summary table comes first, the figures after it, then the sections' costs and the rest.

    Args:
        result: what the audit measured.
        figures: the PNG files to embed.
        title: the page's title (default: the model's name).

    Returns:
        The HTML.
    """
    from symgen.report import render_page

    data = result.to_dict()
    tables = result.report_tables()
    tables["summary"] = _summary_rows(result)
    head: dict[str, list[dict[str, Any]]] = {k: tables.pop(k) for k in ("flags", "summary") if k in tables}
    drawn = {Path(f).stem for f in figures}
    placeholders = []
    for name, fig in figure_of().items():
        sec = result.sections.get(name)
        if sec is not None and fig not in drawn:
            why = "; ".join(sec.skipped) or sec.status
            placeholders.append((fig, f"{sec.title}: {sec.status}. {why}"))
    page = render_page(
        title or f"symgen audit: {result.model}",
        subtitle=(
            f"data {result.data}, action {result.action or 'none'}, budget {result.budget}, "
            f"device {result.device}, {result.num_params} parameters, {result.seconds:.1f} s"
        ),
        tables={**head, **tables},
        config={k: data[k] for k in ("model", "data", "action", "budget", "device", "dtype", "seed", "limits")},
        data_json=data,
    )
    # the figures go right after the summary table (render_page puts figures before every table)
    at = page.index("</table>", page.index('id="summary"')) + len("</table>")
    return page[:at] + _figures_html(figures, placeholders) + page[at:]

"""What an audit measured: estimates with their standard errors, per-section results, summaries.

Computing and summarizing only: writing a run directory (``audit.json``, ``report.html``) is the
shell's job (:func:`symgen.runs.write_audit_run`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from symgen.audit.precision import RESOLVED_FRACTION, flag_text

__all__ = ["Estimate", "SectionResult", "AuditResult", "IMPRECISE"]

# An estimate whose standard error exceeds this fraction of its magnitude is not resolved (flagged).
IMPRECISE = RESOLVED_FRACTION


@dataclass
class Estimate:
    """A measured value with its standard error (``None`` where the number is deterministic)."""

    value: float
    stderr: float | None = None
    note: str = ""
    flag: str = ""  # "", IMPRECISE (misses its section's target) or NOT RESOLVED (stderr > |value|/2)
    target: float | None = None  # the standard error its section's precision target asks for at this value
    resolve_factor: float | None = None  # (stderr / goal)^2: x the section's seconds would meet it (1/sqrt(n))

    @property
    def imprecise(self) -> bool:
        """The standard error exceeds :data:`IMPRECISE` times the value's magnitude (not resolved)."""
        if self.stderr is None or not math.isfinite(self.value):
            return False
        return self.stderr > IMPRECISE * abs(self.value)


@dataclass
class SectionResult:
    """One section of the audit: its values, cost, what it skipped and why, and data for figures."""

    name: str
    title: str
    status: str = "ok"  # ok | skipped | failed
    seconds: float = 0.0  # wall time
    cpu_seconds: float = 0.0  # CPU time of this process (all threads): robust to a busy machine
    samples: int | None = None
    values: dict[str, Estimate] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # e.g. "partial: analysed 40 % of the parameters"
    coverage: float | None = None  # share of the parameters the section's analysis covered (None: all)

    def add(self, metric: str, value: float, stderr: float | None = None, note: str = "") -> None:
        """Record one measured value.

        Args:
            metric: its name, e.g. ``trace``.
            value: the value.
            stderr: its standard error (None: deterministic, or no error bar).
            note: how it was measured.
        """
        self.values[metric] = Estimate(float(value), None if stderr is None else float(stderr), note)


@dataclass
class AuditResult:
    """Everything ``audit`` measured. ``result["hessian"].values["trace"].value`` or ``result.value("hessian", "trace")``."""

    model: str
    data: str
    action: str | None
    budget: str
    device: str
    dtype: str
    seed: int
    num_params: int
    limits: dict[str, Any]
    sections: dict[str, SectionResult]
    seconds: float = 0.0
    flags: list[str] = field(default_factory=list)  # the model against its data: class count, input scale
    output: int | str | None = None  # which output held the logits (None: the rule of symgen.audit.outputs)
    threads: int | None = None  # intra-op threads the audit ran on (CPU; one when faster on a loaded machine)
    # the sections' figures drawn inside the budget (name -> PNG bytes); None: drawn when the run is written
    figures: dict[str, bytes] | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, name: str) -> SectionResult:
        return self.sections[name]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditResult:
        """The result that :meth:`to_dict` (``audit.json``) describes."""
        fields = dict(data)
        fields["sections"] = {
            name: SectionResult(**{**sec, "values": {k: Estimate(**v) for k, v in sec.get("values", {}).items()}})
            for name, sec in data.get("sections", {}).items()
        }
        return cls(**fields)

    def value(self, section: str, metric: str) -> float:
        """The value of ``metric`` in ``section``.

        Args:
            section: a section's name, e.g. ``hessian``.
            metric: a metric's name, e.g. ``trace``.

        Returns:
            The value.
        """
        return self.sections[section].values[metric].value

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (what ``audit.json`` holds): tuples as lists, NaN as None, +-inf as +-1e308."""
        data = asdict(self)
        data.pop("figures")  # files of the run, not values
        return _plain(data)

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per measured value: section, metric, value, stderr (``-`` when deterministic), note."""
        rows = []
        for s in self.sections.values():
            for metric, est in s.values.items():
                rows.append(
                    {
                        "section": s.name,
                        "metric": metric,
                        "value": est.value,
                        "stderr": "-" if est.stderr is None else est.stderr,
                        "flag": flag_text(est, s.seconds),
                        "note": est.note,
                    }
                )
        return rows

    def section_rows(self) -> list[dict[str, Any]]:
        """One row per section: status, seconds, samples, what it skipped and why."""
        return [
            {
                "section": s.name,
                "status": s.status,
                "seconds": round(s.seconds, 3),
                "cpu_seconds": round(s.cpu_seconds, 3),
                "samples": "-" if s.samples is None else s.samples,
                "coverage": "-" if s.coverage is None else f"{s.coverage:.0%}",
                "flags": "; ".join(s.flags) or "-",
                "skipped": "; ".join(s.skipped) or "-",
            }
            for s in self.sections.values()
        ]

    def summary(self) -> str:
        """A plain-text table of the values (what the CLI prints), after one line per flag."""
        lines = [f"warning: {f}" for f in self.flags]
        lines += [f"warning: {s.name}: {f}" for s in self.sections.values() for f in s.flags]
        for r in self.summary_rows():
            err = "" if r["stderr"] == "-" else f" ± {r['stderr']:.3g}"
            flag = f"  {r['flag']}" if r["flag"] else ""
            lines.append(f"{r['section']:>17} {r['metric']:<28} {r['value']:.4g}{err}{flag}")
        return "\n".join(lines)

    def report_tables(self) -> dict[str, list[dict[str, Any]]]:
        """The report's tables: ``summary`` (every value), ``sections`` (cost, skips), ``scale symmetries``."""
        tables = {"summary": self.summary_rows(), "sections": self.section_rows()}
        flags = [*self.flags, *(f"{s.name}: {f}" for s in self.sections.values() for f in s.flags)]
        if flags:
            tables = {"flags": [{"flag": f} for f in flags], **tables}
        sym = self.sections.get("scale_symmetries")
        if sym is not None and sym.details.get("symmetries"):
            tables["scale symmetries"] = [
                {
                    "weight": s["weight"],
                    "kind": s["kind"],
                    "blocks": s["num_blocks"],
                    "filters": s["num_filters"],
                    "through": ", ".join(s["normalizers"]),
                }
                for s in sym.details["symmetries"]
            ]
        return tables


def _plain(obj: Any) -> Any:
    """JSON types: dicts with string keys, lists, finite floats (the same encoding as the run store's)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    if isinstance(obj, Path):
        return str(obj)
    if callable(getattr(obj, "tolist", None)):  # numpy arrays and scalars, tensors
        return _plain(obj.tolist())
    return obj

"""The scale-symmetry section: parameter groups whose filters can be rescaled without changing the
model (a layer feeding a normalization; arXiv 1511.01029), confirmed numerically."""

from __future__ import annotations

from torch import nn

from symgen.audit.flags import coverage_flag
from symgen.audit.limits import AuditLimits
from symgen.audit.result import SectionResult
from symgen.audit.sections.common import stream, stream_seed, subsample
from symgen.audit.splits import Split

__all__ = ["scale_symmetries"]


def scale_symmetries(sec: SectionResult, model: nn.Module, train: Split, lim: AuditLimits, seed: int) -> None:
    """Groups, independent scale factors and the share of parameters in a scale-symmetric group.

    Args:
        sec: the section's result, filled in.
        model: the classifier.
        train: the training split.
        lim: the limits.
        seed: the audit's integer seed (streams ``scale_symmetries`` and ``scale_symmetries_check``).
    """
    from symgen.symmetry import find_scale_symmetries

    idx = subsample(train.num_data, max(2, lim.symmetry_num_data), stream(seed, "scale_symmetries"))
    report = find_scale_symmetries(model, train.take(idx)[0], generator=stream_seed(seed, "scale_symmetries_check"))
    total = sum(p.numel() for p in model.parameters())
    in_sym = sum(p.numel() for n, p in model.named_parameters() if n in set(report.parameters()))
    checks = [v for s in report.symmetries for k, v in s.check.items() if "exact" in k or k.startswith("max")]
    sec.add("groups", len(report.symmetries), None, "parameter groups with a scale symmetry")
    sec.add("filters", sum(s.num_blocks for s in report.symmetries), None, "independent scale factors")
    sec.add("parameter_fraction", in_sym / total if total else 0.0, None, "share of parameters in a symmetric group")
    if checks:
        sec.add("max_check_change", max(checks), None, "largest relative output change under random rescaling")
    sec.details.update(report.to_dict())
    # parameters the graph analysis could not decide (e.g. torch.fx failed and forward hooks do not see the
    # operations between modules): "groups 0" then means "not analysed", so the section says how much it covered
    sizes = dict(model.named_parameters())
    missed = sum(sizes[n].numel() for n in report.unanalysed if n in sizes)
    sec.coverage = (total - missed) / total if total else 1.0
    flag = coverage_flag(
        total - missed, total, f"{len(report.unanalysed)} parameter tensors unanalysed (graph: {report.method})"
    )
    if flag is not None:
        sec.flags.append(flag)
    for label, table in (("unanalysed", report.unanalysed), ("rejected", report.rejected)):
        for name, why in table.items():
            sec.skipped.append(f"{name} {label}: {why}")
    sec.skipped.extend(report.notes)
    sec.samples = idx.numel()

"""The audit's sections, one function each, filling a :class:`~symgen.audit.result.SectionResult`
from library measurements: ``evaluation`` (performance, invariance, robustness), ``curvature``
(hessian, noise_stability), ``ntk``, ``scale_symmetries``."""

__all__ = ["common", "curvature", "evaluation", "ntk", "scale_symmetries"]

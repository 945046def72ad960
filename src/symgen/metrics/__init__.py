"""symgen.metrics"""

__all__: list[str] = []

from symgen.metrics.equivariance import equivariance_error, invariance_metrics, invariance_report, orbit_outputs  # noqa: E402

__all__ += ["equivariance_error", "invariance_metrics", "invariance_report", "orbit_outputs"]

from symgen.metrics.stability import NoiseStability, noise_stability  # noqa: E402

__all__ += ["NoiseStability", "noise_stability"]

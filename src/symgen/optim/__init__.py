"""symgen.optim: optimizers on one step protocol, ``optimizer.step(closure)`` (torch.optim's)."""

from symgen.optim.unit_norm import UnitNormSGD

__all__: list[str] = []
__all__ += ["UnitNormSGD"]

from symgen.optim.closure import LossClosure  # noqa: E402
from symgen.optim.nso import NSO  # noqa: E402
from symgen.optim.sam import SAM  # noqa: E402

__all__ += ["LossClosure", "NSO", "SAM"]

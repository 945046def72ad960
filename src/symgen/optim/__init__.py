"""symgen.optim: optimizers on one step protocol, ``optimizer.step(closure)`` (torch.optim's)."""

from symgen.optim.closure import LossClosure
from symgen.optim.nso import NSO
from symgen.optim.ogd import OGD
from symgen.optim.sam import SAM
from symgen.optim.unit_norm import UnitNormSGD
from symgen.optim.wrapper import StepContext, WrapperOptimizer

__all__ = ["LossClosure", "NSO", "OGD", "SAM", "StepContext", "UnitNormSGD", "WrapperOptimizer"]

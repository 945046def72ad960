"""symgen.optim: optimizers on one step protocol, ``optimizer.step(closure)`` (torch.optim's)."""

from symgen.optim.closure import LossClosure
from symgen.optim.nso import NSO
from symgen.optim.sam import SAM
from symgen.optim.unit_norm import UnitNormSGD
from symgen.optim.wrapper import WrapperOptimizer

__all__ = ["LossClosure", "NSO", "SAM", "UnitNormSGD", "WrapperOptimizer"]

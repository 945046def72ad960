"""symgen.nn: equivariant layers on one base (check_equivariance, export) and masked convolutions.

``base`` (EquivariantModule), ``linear`` (EquivariantLinear, LiftingLinear, GroupLinear,
InvariantReadout), ``conv`` (LiftingConv2d, GroupConv2d, GCNN), ``steerable``
(LinearSteerableNet), ``masked`` (MaskedConv1d/2d, MaskedCNN). Representations and commutant
bases live in :mod:`symgen.groups`.
"""

from symgen.nn.base import EquivariantModule
from symgen.nn.conv import GCNN, GroupConv2d, LiftingConv2d
from symgen.nn.linear import EquivariantLinear, GroupLinear, InvariantReadout, LiftingLinear
from symgen.nn.masked import MaskedCNN, MaskedConv1d, MaskedConv2d, support_mask
from symgen.nn.steerable import LinearSteerableNet

__all__ = [
    "EquivariantModule",
    "EquivariantLinear",
    "LiftingLinear",
    "GroupLinear",
    "InvariantReadout",
    "LiftingConv2d",
    "GroupConv2d",
    "GCNN",
    "LinearSteerableNet",
    "MaskedCNN",
    "MaskedConv1d",
    "MaskedConv2d",
    "support_mask",
]

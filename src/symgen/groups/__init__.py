"""Finite groups, their actions on tensors, orbits, representations, commutant bases, the Reynolds projector.

``finite`` (groups as Cayley tables), ``actions`` (permutation actions on the trailing dims of
tensors), ``representations`` (rho: G -> GL(d), shared with ``GroupAction.matrices``, and the
Reynolds projector), ``commutant`` (bases of equivariant maps and of fixed spaces).
"""

from symgen.groups.actions import (
    CyclicShift,
    GroupAction,
    ImageDihedral,
    ImageRotation90,
    LiftedImageAction,
    PermutationAction,
    Reflection,
    TrivialAction,
    permutation_matrices,
)
from symgen.groups.commutant import commutant_basis, commutant_dimension, commutant_orbits, fixed_basis
from symgen.groups.finite import CyclicGroup, DihedralGroup, DirectProduct, FiniteGroup, PermutationGroup
from symgen.groups.representations import Representation, RepresentationAction, reynolds_projector

__all__ = [
    "FiniteGroup",
    "CyclicGroup",
    "DihedralGroup",
    "DirectProduct",
    "PermutationGroup",
    "GroupAction",
    "ImageRotation90",
    "ImageDihedral",
    "LiftedImageAction",
    "CyclicShift",
    "Reflection",
    "PermutationAction",
    "TrivialAction",
    "permutation_matrices",
    "Representation",
    "RepresentationAction",
    "reynolds_projector",
    "commutant_basis",
    "commutant_dimension",
    "commutant_orbits",
    "fixed_basis",
]

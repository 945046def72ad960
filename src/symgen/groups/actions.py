"""Group actions on the trailing dims of tensors by permuting entries: images, shifts, reflections.

Every action here is a permutation representation rho(g) on the flattened event (leading dims
are batch); ``permutations(shape)`` gives it as gather indices, ``matrices(shape)`` as matrices
(the same representation :meth:`symgen.groups.Representation.from_action` holds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from symgen.errors import GroupActionError
from symgen.groups.finite import CyclicGroup, DihedralGroup, FiniteGroup, PermutationGroup, as_perm_list

__all__ = [
    "GroupAction",
    "ImageRotation90",
    "ImageDihedral",
    "LiftedImageAction",
    "CyclicShift",
    "Reflection",
    "PermutationAction",
    "TrivialAction",
    "permutation_matrices",
]


def permutation_matrices(perms: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Matrices (|G|, d, d) of gather indices: ``M[g] @ v == v[perms[g]]``, i.e. M[g, i, perms[g, i]] = 1.

    Args:
        perms: gather indices (|G|, d).
        dtype: the matrices' dtype (default: torch's default).

    Returns:
        The matrices, on ``perms``' device.
    """
    n, d = perms.shape
    mats = torch.zeros(n, d, d, dtype=dtype or torch.get_default_dtype(), device=perms.device)
    mats.scatter_(2, perms[:, :, None], 1.0)
    return mats


class GroupAction:
    """A group acting on the trailing ``event_ndim`` dims of a tensor by permuting entries.

    ``apply(g, apply(h, x)) == apply(group.mul(g, h), x)``; ``orbit(x)`` has shape ``(|G|, *x.shape)``;
    ``permutations(shape)[g]`` is the gather index with ``apply(g, x).flatten()[i] = x.flatten()[perm[g, i]]``.
    """

    group: FiniteGroup
    event_ndim: int = 1

    @property
    def order(self) -> int:
        """|G|, the number of group elements (the length of an orbit)."""
        return self.group.order

    # -- to implement ---------------------------------------------------------------------------
    def _apply(self, g: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_event(self, shape: tuple[int, ...]) -> None:
        """Raise GroupActionError if the trailing dims of ``shape`` do not fit."""

    # -- public ---------------------------------------------------------------------------------
    def check(self, shape: Sequence[int] | torch.Size) -> None:
        """Check that the action fits an input of this shape.

        Args:
            shape: the input's shape.

        Raises:
            GroupActionError: it does not fit.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) < self.event_ndim:
            raise GroupActionError(
                f"{self!r} acts on the last {self.event_ndim} dim(s); got an input of shape {shape} "
                f"with {len(shape)} dim(s). Reshape the input so its last dims are the acted-on ones."
            )
        self._check_event(shape)

    def _check_element(self, g: int) -> int:
        g = int(g)
        if not 0 <= g < self.order:
            raise GroupActionError(f"group element {g} is out of range for {self!r} (0..{self.order - 1}).")
        return g

    def apply(self, g: int, x: Tensor) -> Tensor:
        """rho(g) x on the trailing dims.

        Args:
            g: a group element.
            x: the input.

        Returns:
            The transformed input.
        """
        self.check(x.shape)
        return self._apply(self._check_element(g), x)

    def event_shape(self, shape: Sequence[int] | torch.Size) -> tuple[int, ...]:
        """The trailing dims this action acts on.

        Args:
            shape: an input's shape.

        Returns:
            Its last ``event_ndim`` dims.
        """
        shape = tuple(int(s) for s in shape)
        return shape[len(shape) - self.event_ndim :]

    def permutations(self, shape: Sequence[int] | torch.Size, device: torch.device | str | None = None) -> Tensor:
        """Gather indices (|G|, d), d = prod(shape).

        ``apply(g, x).reshape(..., d)[..., i] == x.reshape(..., d)[..., perm[g, i]]``.

        Args:
            shape: the acted-on shape.
            device: where the indices go.

        Returns:
            The indices.
        """
        shape = tuple(int(s) for s in shape)
        self.check(shape)
        perms = _permutation_table(self, shape)
        return perms.to(device) if device is not None else perms.clone()

    def matrices(
        self,
        shape: Sequence[int] | torch.Size,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The representation on flattened inputs, (|G|, d, d): ``vec(apply(g, x)) = matrices[g] @ vec(x)``.

        Equal to ``Representation.from_action(self, shape).matrices`` (one helper builds both).

        Args:
            shape: the acted-on shape.
            dtype: the matrices' dtype.
            device: where they go.

        Returns:
            The matrices.
        """
        return permutation_matrices(self.permutations(shape, device=device), dtype)

    def orbit(self, x: Tensor) -> Tensor:
        """All transforms of ``x`` by one gather.

        Args:
            x: the input.

        Returns:
            (|G|, *x.shape).
        """
        self.check(x.shape)
        ev = self.event_shape(x.shape)
        d = math.prod(ev)
        batch = x.shape[: x.ndim - self.event_ndim]
        perms = _permutation_table(self, ev).to(x.device)
        flat = x.reshape(*batch, d)
        out = flat[..., perms]  # (*batch, |G|, d)
        return out.movedim(-2, 0).reshape(self.order, *x.shape)

    def apply_each(self, elements: Tensor, x: Tensor) -> Tensor:
        """Apply ``elements[b]`` to ``x[b]`` for every sample b of the leading batch dim, by one gather.

        Args:
            elements: one element per sample, shape (B,).
            x: the batch (B, ...).

        Returns:
            The transformed batch.

        Raises:
            GroupActionError: a wrong number of elements, or an element out of range.
        """
        self.check(x.shape[1:])
        elements = torch.as_tensor(elements, dtype=torch.long, device=x.device)
        if elements.shape != (x.shape[0],):
            raise GroupActionError(
                f"apply_each: need one element per sample, shape ({x.shape[0]},); got {tuple(elements.shape)}."
            )
        if elements.numel() and (int(elements.min()) < 0 or int(elements.max()) >= self.order):
            raise GroupActionError(f"apply_each: elements must lie in 0..{self.order - 1}.")
        ev = self.event_shape(x.shape)
        d = math.prod(ev)
        perms = _permutation_table(self, ev).to(x.device)[elements]  # (B, d)
        flat = x.reshape(x.shape[0], -1, d)
        idx = perms[:, None, :].expand_as(flat)
        return flat.gather(2, idx).reshape(x.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.group!r})"


def _permutation_table(action: GroupAction, event_shape: tuple[int, ...]) -> Tensor:
    # Applying the action to the index tensor 0..d-1 yields the gather index directly.
    cache: dict[tuple[int, ...], Tensor] = action.__dict__.setdefault("_perm_cache", {})
    if event_shape not in cache:
        d = math.prod(event_shape)
        idx = torch.arange(d).reshape(event_shape)
        cache[event_shape] = torch.stack([action._apply(g, idx).reshape(d) for g in range(action.order)])
    return cache[event_shape]


class ImageRotation90(GroupAction):
    """C4 acting on the last two (square) dims: element k rotates by k*90 degrees (``torch.rot90``)."""

    event_ndim = 2

    def __init__(self) -> None:
        self.group = CyclicGroup(4)

    def _check_event(self, shape: tuple[int, ...]) -> None:
        if shape[-1] != shape[-2]:
            raise GroupActionError(
                f"ImageRotation90 needs square images (last two dims equal); got {shape[-2]}x{shape[-1]} "
                f"in input shape {shape}. Crop or pad to a square."
            )

    def _apply(self, g: int, x: Tensor) -> Tensor:
        return torch.rot90(x, k=g, dims=(-2, -1))


class ImageDihedral(GroupAction):
    """D4 acting on the last two (square) dims: element ``k + 4s`` is rot90^k after a horizontal flip^s."""

    event_ndim = 2

    def __init__(self) -> None:
        self.group = DihedralGroup(4)

    def _check_event(self, shape: tuple[int, ...]) -> None:
        if shape[-1] != shape[-2]:
            raise GroupActionError(
                f"ImageDihedral needs square images (last two dims equal); got {shape[-2]}x{shape[-1]} "
                f"in input shape {shape}. Crop or pad to a square."
            )

    def _apply(self, g: int, x: Tensor) -> Tensor:
        k, s = g % 4, g // 4
        if s:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, k=k, dims=(-2, -1))


class LiftedImageAction(GroupAction):
    """G acting on lifted feature maps (..., |G|, H, W) of a G-CNN: (L_k f)[h](u) = f[k^-1 h](k^-1 u).

    The group axis -3 is permuted by the regular representation. Source: Cohen & Welling,
    arXiv 1602.07576, eq. (11).

    Args:
        image_action: the action (C4 or D4 on the last two dims) that moves the pixels.

    Raises:
        GroupActionError: ``image_action`` does not act on two dims.
    """

    event_ndim = 3

    def __init__(self, image_action: GroupAction) -> None:
        if image_action.event_ndim != 2:
            raise GroupActionError(
                f"LiftedImageAction needs an action on the last two (spatial) dims; got {image_action!r}."
            )
        self.image_action = image_action
        self.group = image_action.group
        # regular[k, h] = k^-1 h: the group index gathered into position h
        self._regular = self.group.table[self.group.inverses]

    def _check_event(self, shape: tuple[int, ...]) -> None:
        if shape[-3] != self.group.order:
            raise GroupActionError(
                f"{self!r} acts on (..., |G|={self.group.order}, H, W); input shape {shape} has {shape[-3]} "
                "at dim -3. Pass lifted features, e.g. the output of LiftingConv2d."
            )
        self.image_action.check(shape)

    def _apply(self, g: int, x: Tensor) -> Tensor:
        x = self.image_action._apply(g, x)
        return x.index_select(-3, self._regular[g].to(x.device))

    def __repr__(self) -> str:
        return f"LiftedImageAction({self.image_action!r})"


class CyclicShift(GroupAction):
    """C_n acting by cyclic shifts along ``dim``: element k rolls by k.

    Args:
        n: the group order.
        dim: the shifted dim, negative (counted from the end).

    Raises:
        GroupActionError: ``dim >= 0``.
    """

    def __init__(self, n: int, dim: int = -1) -> None:
        if dim >= 0:
            raise GroupActionError(f"CyclicShift acts on trailing dims; give dim as a negative index, got {dim}.")
        self.group = CyclicGroup(n)
        self.n = n
        self.dim = dim
        self.event_ndim = -dim

    def _check_event(self, shape: tuple[int, ...]) -> None:
        if shape[self.dim] != self.n:
            raise GroupActionError(
                f"CyclicShift(n={self.n}, dim={self.dim}) needs size {self.n} along dim {self.dim}; "
                f"input shape {shape} has {shape[self.dim]}. Use CyclicShift({shape[self.dim]}, dim={self.dim})."
            )

    def _apply(self, g: int, x: Tensor) -> Tensor:
        return torch.roll(x, shifts=g, dims=self.dim)

    def __repr__(self) -> str:
        return f"CyclicShift(n={self.n}, dim={self.dim})"


class Reflection(GroupAction):
    """C2 acting by flipping the given dims: element 1 is ``torch.flip(x, dims)``.

    Args:
        dims: the flipped dims, negative.

    Raises:
        GroupActionError: no dims, or a dim >= 0.
    """

    def __init__(self, dims: Sequence[int] = (-1,)) -> None:
        dims = tuple(int(d) for d in dims)
        if not dims or any(d >= 0 for d in dims):
            raise GroupActionError(f"Reflection acts on trailing dims; give negative dims, got {dims}.")
        self.group = CyclicGroup(2)
        self.dims = dims
        self.event_ndim = -min(dims)

    def _apply(self, g: int, x: Tensor) -> Tensor:
        return torch.flip(x, dims=self.dims) if g else x

    def __repr__(self) -> str:
        return f"Reflection(dims={self.dims})"


class PermutationAction(GroupAction):
    """A group acting by explicit permutations of the flattened trailing ``event_ndim`` dims.

    ``sigma_g`` moves the entry at position i to position sigma_g(i): ``apply(g, x)[sigma_g(i)] = x[i]``.

    Args:
        perms_or_generators: without ``group``, generators whose closure is the group
            (:class:`PermutationGroup`); with ``group``, ``perms[g]`` for every element.
        group: the group, or None.
        event_ndim: the number of trailing dims acted on.

    Raises:
        GroupActionError: the permutations do not form a representation of ``group`` (checked).
    """

    def __init__(
        self,
        perms_or_generators: Sequence[Sequence[int]] | Tensor,
        group: FiniteGroup | None = None,
        event_ndim: int = 1,
    ) -> None:
        rows = as_perm_list(perms_or_generators)
        if group is None:
            pg = PermutationGroup(rows)
            self.group = pg
            sigma = pg.perms
        else:
            if len(rows) != group.order:
                raise GroupActionError(
                    f"PermutationAction with group {group!r} needs one permutation per element "
                    f"({group.order}); got {len(rows)}."
                )
            sigma = torch.tensor(rows, dtype=torch.long)
            comp = (
                sigma[:, None, :].expand(-1, group.order, -1).gather(2, sigma[None, :, :].expand(group.order, -1, -1))
            )  # sigma_g o sigma_h
            if not torch.equal(comp, sigma[group.table]):
                raise GroupActionError(
                    f"the permutations do not form a representation of {group!r}: "
                    "perms[g*h] must equal perms[g] o perms[h] for all g, h."
                )
            self.group = group
        self.sigma = sigma
        self.degree = sigma.shape[1]
        self.event_ndim = int(event_ndim)
        # gather index = sigma_g^-1
        self._gather = torch.argsort(sigma, dim=1)

    def _check_event(self, shape: tuple[int, ...]) -> None:
        d = math.prod(shape[len(shape) - self.event_ndim :])
        if d != self.degree:
            raise GroupActionError(
                f"PermutationAction permutes {self.degree} features (the last {self.event_ndim} dim(s) "
                f"flattened); input shape {shape} has {d}. Flatten the features or give matching permutations."
            )

    def _apply(self, g: int, x: Tensor) -> Tensor:
        shape = x.shape
        lead = shape[: x.ndim - self.event_ndim]
        flat = x.reshape(*lead, self.degree)
        return flat[..., self._gather[g].to(x.device)].reshape(shape)

    def __repr__(self) -> str:
        return f"PermutationAction({self.group!r}, degree={self.degree})"


class TrivialAction(GroupAction):
    """The trivial action rho(g) = identity (for invariant outputs in ``equivariance_error``).

    Args:
        group: the group.
        event_ndim: the number of trailing dims acted on.
    """

    def __init__(self, group: FiniteGroup, event_ndim: int = 1) -> None:
        self.group = group
        self.event_ndim = int(event_ndim)

    def _apply(self, g: int, x: Tensor) -> Tensor:
        return x

"""Real representations rho: G -> GL(d) of finite groups, the action they define, the Reynolds projector.

One notion of representation: :meth:`Representation.from_action` holds exactly the matrices of
:meth:`GroupAction.matrices` (as gather indices, matrices built on demand by the same helper), and
:meth:`Representation.action` turns any representation back into a :class:`GroupAction` on tensors.
Reynolds projector: P_G = |G|^-1 sum_g rho(g) (Chen & Zhu, arXiv 2303.04198). Source for the rest:
Serre, Linear Representations of Finite Groups, ch. 1-2.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from symgen.errors import GroupActionError
from symgen.groups.actions import GroupAction, permutation_matrices
from symgen.groups.finite import FiniteGroup

__all__ = ["Representation", "RepresentationAction", "reynolds_projector"]

_ATOL = 1e-8


class Representation:
    """A real representation rho: G -> GL(d) of a finite group, given by its matrices (|G|, d, d).

    Args:
        matrices: rho(g) for every element, (|G|, d, d) (or give ``permutations``).
        group: fixes the element indexing and the Cayley table used to check rho(g) rho(h) = rho(g*h);
            without it, the matrices must be closed under multiplication and all of them serve as constraints.
        permutations: (|G|, d) marks a permutation representation, (rho(g) x)[i] = x[perm[g, i]]: its matrices
            are built only when asked for, and the commutant and fixed-point bases take the orbit fast path.
        name: the name in messages.
        check: check that rho is a homomorphism (:meth:`check`).
    """

    def __init__(
        self,
        matrices: Tensor | None = None,
        group: FiniteGroup | None = None,
        *,
        permutations: Tensor | None = None,
        name: str = "rho",
        check: bool = True,
    ) -> None:
        if matrices is None and permutations is None:
            raise GroupActionError(
                "Representation needs `matrices` (|G|, d, d) or `permutations` (|G|, d); got neither."
            )
        self.group = group
        self.name = name
        self.permutations: Tensor | None = None
        self._matrices: Tensor | None = None
        if permutations is not None:
            perms = torch.as_tensor(permutations, dtype=torch.long).detach().cpu()
            if perms.ndim != 2:
                raise GroupActionError(f"permutations must have shape (|G|, d); got {tuple(perms.shape)}.")
            n, d = perms.shape
            ar = torch.arange(d)
            if not torch.equal(perms.sort(dim=1).values, ar.expand(n, d)):
                raise GroupActionError(
                    f"representation '{name}': each row of `permutations` must be a permutation of 0..{d - 1}."
                )
            self.permutations = perms
            if matrices is not None:
                mats = torch.as_tensor(matrices, dtype=torch.float64).cpu()
                if mats.shape != (n, d, d) or not torch.allclose(mats, permutation_matrices(perms, torch.float64)):
                    raise GroupActionError(f"representation '{name}': `matrices` and `permutations` disagree.")
                self._matrices = mats
        else:
            mats = torch.as_tensor(matrices).detach().to(device="cpu", dtype=torch.float64)
            if mats.ndim != 3 or mats.shape[1] != mats.shape[2]:
                raise GroupActionError(
                    f"representation '{name}': matrices must have shape (|G|, d, d); got {tuple(mats.shape)}."
                )
            self._matrices = mats
            self.permutations = _as_permutations(mats)
        if group is not None and group.order != self.order:
            raise GroupActionError(
                f"representation '{name}' has {self.order} matrices but "
                f"{group!r} has {group.order} elements; give one matrix per element."
            )
        # commutant / fixed-point bases and orbit labels, keyed by kind and the other side's digest
        self._cache: dict[Hashable, Tensor | tuple[Tensor, Tensor]] = {}
        self._digest: str | None = None
        if check:
            self.check()

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_action(cls, action: GroupAction, shape: Sequence[int]) -> Representation:
        """The representation of ``action`` on inputs of ``shape`` (flattened): rho(g) = action.matrices(shape)[g].

        Args:
            action: the group action.
            shape: one input's shape.

        Returns:
            The (permutation) representation.
        """
        shape = tuple(int(s) for s in shape)
        action.check(shape)  # GroupActionError with the action's own message
        return cls(group=action.group, permutations=action.permutations(shape), name=f"{action!r} on {shape}")

    @classmethod
    def regular(cls, group: FiniteGroup) -> Representation:
        """The regular representation: (rho(g) f)(h) = f(g^-1 h), a permutation of |G| coordinates."""
        perms = group.table[group.inverses]  # perms[g, h] = table[g^-1, h]
        return cls(group=group, permutations=perms, name=f"regular({group.name})", check=False)

    @classmethod
    def trivial(cls, group: FiniteGroup, dim: int = 1) -> Representation:
        """The trivial representation rho(g) = I_dim."""
        perms = torch.arange(dim).expand(group.order, dim).clone()
        return cls(group=group, permutations=perms, name=f"trivial({group.name})^{dim}", check=False)

    @staticmethod
    def direct_sum(*reps: Representation) -> Representation:
        """rho_1 (+) rho_2 (+) ...: block-diagonal matrices, coordinates concatenated in order."""
        if not reps:
            raise GroupActionError("direct_sum needs at least one representation.")
        first = reps[0]
        for r in reps[1:]:
            check_same_group(first, r)
        name = " + ".join(r.name for r in reps)
        perm_list = [r.permutations for r in reps if r.permutations is not None]
        if len(perm_list) == len(reps):
            offs = np.cumsum([0] + [r.dim for r in reps])
            perms = torch.cat([p + int(o) for p, o in zip(perm_list, offs[:-1], strict=True)], dim=1)
            return Representation(group=first.group, permutations=perms, name=name, check=False)
        mats = torch.stack([torch.block_diag(*(r.matrices[g] for r in reps)) for g in range(first.order)])
        return Representation(mats, group=first.group, name=name, check=False)

    def copies(self, count: int) -> Representation:
        """``count`` copies rho (+) ... (+) rho, coordinate (c, i) at c*d + i."""
        if count < 1:
            raise GroupActionError(f"copies() needs count >= 1, got {count}.")
        return Representation.direct_sum(*([self] * count))

    def __add__(self, other: Representation) -> Representation:
        return Representation.direct_sum(self, other)

    def action(self, shape: Sequence[int] | None = None) -> RepresentationAction:
        """This representation as a :class:`GroupAction` on tensors whose trailing dims are ``shape`` (default (d,))."""
        return RepresentationAction(self, (self.dim,) if shape is None else shape)

    # -- properties -----------------------------------------------------------------------------
    @property
    def matrices(self) -> Tensor:
        """rho(g) for every g, (|G|, d, d) in float64 (built from the permutations on first use)."""
        if self._matrices is None:
            self._matrices = permutation_matrices(self._data(), torch.float64)
        return self._matrices

    def _data(self) -> Tensor:
        """The matrices if built, else the permutations (one of them always exists)."""
        if self._matrices is not None:
            return self._matrices
        if self.permutations is None:  # pragma: no cover - the constructor needs one of them
            raise GroupActionError(f"representation '{self.name}' has neither matrices nor permutations.")
        return self.permutations

    @property
    def dim(self) -> int:
        """d, the dimension of the representation space."""
        return int(self._data().shape[1])

    @property
    def order(self) -> int:
        """|G|, the number of matrices."""
        return int(self._data().shape[0])

    @property
    def is_permutation(self) -> bool:
        """Whether every rho(g) is a permutation matrix (given by ``permutations``)."""
        return self.permutations is not None

    @property
    def digest(self) -> str:
        """A content hash (group table and matrices), the key of the commutant cache."""
        if self._digest is None:
            if self.permutations is not None:
                h = hashlib.sha1(b"perm" + self.permutations.numpy().tobytes())
            else:
                h = hashlib.sha1(b"mat" + self.matrices.numpy().tobytes())
            h.update(str((self.order, self.dim)).encode())
            if self.group is not None:
                h.update(self.group.table.numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def character(self) -> Tensor:
        """chi(g) = tr rho(g), shape (|G|,)."""
        if self.permutations is not None:  # the trace of a permutation matrix counts its fixed points
            return (self.permutations == torch.arange(self.dim)).sum(1).to(torch.float64)
        return self.matrices.diagonal(dim1=1, dim2=2).sum(-1)

    def constraint_elements(self) -> list[int]:
        """Elements whose constraints define the commutant: the group's generators, else all elements."""
        if self.group is not None:
            return list(self.group.generators) or [0]
        return list(range(self.order))

    def inverse_matrices(self) -> Tensor:
        """rho(g)^-1 for every g, (|G|, d, d)."""
        if self.group is not None:
            return self.matrices[self.group.inverses]
        inverses: Tensor = torch.linalg.inv(self.matrices)
        return inverses

    def reynolds_projector(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        """Projector onto Fix(rho), (d, d): P_G = |G|^-1 sum_g rho(g) (arXiv 2303.04198).

        Args:
            dtype: its dtype.
            device: where it goes.

        Returns:
            P_G.
        """
        dtype = dtype or torch.get_default_dtype()
        if self.permutations is None:
            return self.matrices.mean(0).to(dtype=dtype, device=device)
        perms = self.permutations.to(device) if device is not None else self.permutations
        n, d = perms.shape
        # Scatter-add 1/|G| at (i, perm[g, i]) for every g: O(|G| d) work, no (|G|, d, d) tensor.
        p = torch.zeros(d, d, dtype=dtype, device=perms.device)
        rows = torch.arange(d, device=perms.device).expand(n, d)
        p.index_put_(
            (rows.reshape(-1), perms.reshape(-1)),
            torch.full((n * d,), 1.0 / n, dtype=dtype, device=perms.device),
            accumulate=True,
        )
        return p

    def check(self, atol: float = _ATOL) -> None:
        """Raise :class:`GroupActionError` unless rho is a homomorphism: rho(g) rho(h) = rho(g*h).

        Args:
            atol: the absolute tolerance of the comparison.
        """
        n, d = self.order, self.dim
        if self.group is not None:
            table = self.group.table
            if self.permutations is not None:
                p = self.permutations
                # (rho(g) rho(h) x)[i] = x[p[h, p[g, i]]] must equal x[p[g*h, i]].
                comp = p[None, :, :].expand(n, n, d).gather(2, p[:, None, :].expand(n, n, d))
                ok = torch.equal(comp, p[table])
                identity = torch.equal(p[0], torch.arange(d))
            else:
                if not torch.isfinite(self.matrices).all():
                    raise GroupActionError(f"representation '{self.name}' has non-finite matrix entries.")
                prod = torch.einsum("gij,hjk->ghik", self.matrices, self.matrices)
                ok = torch.allclose(prod, self.matrices[table], atol=atol * max(1.0, float(self.matrices.abs().max())))
                identity = torch.allclose(self.matrices[0], torch.eye(d, dtype=torch.float64), atol=atol)
            if not ok:
                raise GroupActionError(
                    f"representation '{self.name}' is not a homomorphism of {self.group!r}: rho(g) rho(h) != "
                    "rho(g*h) for some g, h. Give the matrices in the group's element order (element 0 = identity)."
                )
            if not identity:
                raise GroupActionError(f"representation '{self.name}': rho(identity) = rho(0) must be the identity.")
            return
        if not torch.isfinite(self.matrices).all():
            raise GroupActionError(f"representation '{self.name}' has non-finite matrix entries.")
        # Without a group: closure under multiplication, identity present.
        flat = self.matrices.reshape(n, -1)
        scale = max(1.0, float(flat.abs().max()))
        prod = torch.einsum("gij,hjk->ghik", self.matrices, self.matrices).reshape(n * n, -1)
        dist = torch.cdist(prod, flat)
        if not bool((dist.min(dim=1).values <= atol * scale * d).all()):
            raise GroupActionError(
                f"representation '{self.name}': the {n} matrices are not closed under multiplication, so they "
                "are not the image of a group homomorphism. Give rho(g) for every element g of the group."
            )
        if not bool((torch.cdist(torch.eye(d, dtype=torch.float64).reshape(1, -1), flat) <= atol * d).any()):
            raise GroupActionError(f"representation '{self.name}': the identity matrix is missing.")

    def __repr__(self) -> str:
        kind = "permutation " if self.is_permutation else ""
        return f"Representation({self.name}, {kind}dim={self.dim}, |G|={self.order})"


def _as_permutations(mats: Tensor) -> Tensor | None:
    """The gather indices if every matrix is a 0/1 permutation matrix, else None."""
    if not bool(((mats == 0) | (mats == 1)).all()):
        return None
    if not (bool((mats.sum(1) == 1).all()) and bool((mats.sum(2) == 1).all())):
        return None
    return mats.argmax(dim=2)


def check_same_group(a: Representation, b: Representation) -> None:
    """Raise :class:`GroupActionError` unless ``a`` and ``b`` index the same group elements.

    Args:
        a: a representation.
        b: another.
    """
    if a.order != b.order:
        raise GroupActionError(
            f"representations {a!r} and {b!r} belong to groups of different orders "
            f"({a.order} vs {b.order}); both must index the same group elements."
        )
    if a.group is not None and b.group is not None and not torch.equal(a.group.table, b.group.table):
        raise GroupActionError(
            f"representations {a!r} and {b!r} use different group tables; build both from the same group object."
        )


def as_representation_pair(
    in_rep: Representation | Tensor, out_rep: Representation | Tensor
) -> tuple[Representation, Representation]:
    """Two representations of one group from representations or raw matrix sets (checked jointly).

    Args:
        in_rep: a representation or matrices (|G|, d, d).
        out_rep: a representation or matrices.

    Returns:
        ``(rho_in, rho_out)``.
    """
    group = next((r.group for r in (in_rep, out_rep) if isinstance(r, Representation) and r.group is not None), None)
    if group is None and not isinstance(in_rep, Representation) and not isinstance(out_rep, Representation):
        # Two raw matrix sets: check closure of the pair jointly, so both index the same elements.
        a, b = torch.as_tensor(in_rep, dtype=torch.float64), torch.as_tensor(out_rep, dtype=torch.float64)
        if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
            raise GroupActionError(
                f"in/out matrices must be (|G|, d, d) with the same |G|; got {tuple(a.shape)} and {tuple(b.shape)}."
            )
        Representation(
            torch.stack([torch.block_diag(x, y) for x, y in zip(a, b, strict=True)]), name="rho_in + rho_out"
        )
        return Representation(a, name="rho_in", check=False), Representation(b, name="rho_out", check=False)
    i = _as_rep(in_rep, group, "rho_in")
    o = _as_rep(out_rep, group, "rho_out")
    check_same_group(i, o)
    return i, o


def _as_rep(rep: Representation | Tensor, group: FiniteGroup | None, name: str) -> Representation:
    if isinstance(rep, Representation):
        return rep
    if isinstance(rep, (Tensor, np.ndarray)):
        return Representation(torch.as_tensor(rep), group=group, name=name)
    raise GroupActionError(f"expected a Representation or a tensor of matrices (|G|, d, d); got {type(rep).__name__}.")


class RepresentationAction(GroupAction):
    """A representation acting on tensors: vec(apply(g, x)) = rho(g) vec(x) on the trailing dims ``shape``.

    A permutation representation acts by one gather (and has ``permutations``); any other by a
    matrix product. Works without a group (raw matrices): elements are then the matrix indices.

    Args:
        rep: the representation.
        shape: the acted-on trailing dims.
    """

    def __init__(self, rep: Representation, shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != rep.dim:
            raise GroupActionError(
                f"{rep!r} acts on {rep.dim} coordinates; the event shape {shape} has "
                f"{math.prod(shape)}. Give a shape with prod(shape) = {rep.dim}."
            )
        self.rep = rep
        # None for raw matrices without a group: the elements are then the matrix indices
        self.group = rep.group  # type: ignore[assignment]
        self.shape = shape
        self.event_ndim = len(shape)

    @property
    def order(self) -> int:
        """|G|, the number of matrices of the representation."""
        return self.rep.order

    def _check_event(self, shape: tuple[int, ...]) -> None:
        if self.event_shape(shape) != self.shape:
            raise GroupActionError(
                f"{self!r} needs inputs of shape (..., {', '.join(map(str, self.shape))}); got {shape}."
            )

    def _apply(self, g: int, x: Tensor) -> Tensor:
        flat = x.reshape(*x.shape[: x.ndim - self.event_ndim], self.rep.dim)
        if self.rep.permutations is not None:
            out = flat[..., self.rep.permutations[g].to(x.device)]
        else:
            out = flat @ self.rep.matrices[g].to(dtype=x.dtype, device=x.device).T
        return out.reshape(x.shape)

    def permutations(self, shape: Sequence[int] | torch.Size, device: torch.device | str | None = None) -> Tensor:
        """Gather indices (|G|, d) with apply(g, x).flatten()[i] = x.flatten()[perm[g, i]].

        Args:
            shape: the event shape (must be the action's).
            device: where to put the result (None: a CPU copy).

        Returns:
            a long tensor (|G|, d).
        """
        self.check(shape)
        if self.rep.permutations is None:
            raise GroupActionError(f"{self.rep!r} is not a permutation representation; use matrices(shape).")
        return self.rep.permutations.to(device) if device is not None else self.rep.permutations.clone()

    def matrices(
        self,
        shape: Sequence[int] | torch.Size,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The matrices rho(g), (|G|, d, d).

        Args:
            shape: the event shape (must be the action's).
            dtype: their dtype (None: torch's default dtype).
            device: their device.

        Returns:
            a tensor (|G|, d, d).
        """
        self.check(shape)
        return self.rep.matrices.to(dtype=dtype or torch.get_default_dtype(), device=device)

    def orbit(self, x: Tensor) -> Tensor:
        """Every transform of ``x``: out[g] = rho(g) x, by one einsum for a matrix representation.

        Args:
            x: a tensor (..., *shape).

        Returns:
            a tensor (|G|, ..., *shape).
        """
        if self.rep.permutations is not None:
            return super().orbit(x)
        self.check(x.shape)
        flat = x.reshape(*x.shape[: x.ndim - self.event_ndim], self.rep.dim)
        mats = self.rep.matrices.to(dtype=x.dtype, device=x.device)
        return torch.einsum("gij,...j->g...i", mats, flat).reshape(self.order, *x.shape)

    def apply_each(self, elements: Tensor, x: Tensor) -> Tensor:
        """One group element per sample: out[b] = rho(elements[b]) x[b].

        Args:
            elements: group element indices (B,).
            x: a batch (B, ..., *shape).

        Returns:
            a tensor shaped like ``x``.
        """
        if self.rep.permutations is not None:
            return super().apply_each(elements, x)
        self.check(x.shape[1:])
        elements = torch.as_tensor(elements, dtype=torch.long, device=x.device)
        if elements.shape != (x.shape[0],) or (
            elements.numel() and (int(elements.min()) < 0 or int(elements.max()) >= self.order)
        ):
            raise GroupActionError(
                f"apply_each: need one element in 0..{self.order - 1} per sample, shape "
                f"({x.shape[0]},); got {tuple(elements.shape)}."
            )
        flat = x.reshape(x.shape[0], -1, self.rep.dim)
        mats = self.rep.matrices.to(dtype=x.dtype, device=x.device)[elements]
        return torch.einsum("bij,bkj->bki", mats, flat).reshape(x.shape)

    def __repr__(self) -> str:
        return f"RepresentationAction({self.rep.name}, shape={self.shape})"


def reynolds_projector(
    action: GroupAction | Representation,
    shape: Sequence[int] | torch.Size | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Projector onto the invariant subspace, (d, d): P_G = |G|^-1 sum_g rho(g) (arXiv 2303.04198).

    Args:
        action: a group action, or a :class:`Representation` directly.
        shape: the input shape (one sample, no batch) for an action.
        dtype: its dtype.
        device: where it goes.

    Returns:
        P_G.
    """
    if isinstance(action, Representation):
        return action.reynolds_projector(dtype, device)
    if shape is None:
        raise GroupActionError(f"reynolds_projector({action!r}, shape) needs the input shape (one sample).")
    return Representation.from_action(action, shape).reynolds_projector(dtype, device)

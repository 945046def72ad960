"""Finite groups as Cayley tables: cyclic, dihedral, direct products and permutation groups.

A group is a multiplication table on the integers ``0..order-1`` with identity ``0``
(Serre, Linear Representations of Finite Groups, ch. 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from symgen.errors import GroupActionError

__all__ = ["FiniteGroup", "CyclicGroup", "DihedralGroup", "DirectProduct", "PermutationGroup"]


class FiniteGroup:
    """A finite group given by its Cayley table: ``table[g, h] = g*h``, elements ``0..order-1``, identity 0.

    Args:
        name: the group's name.
        table: the Cayley table (order, order), a Latin square with identity 0.
        generators: elements that generate the group.

    Raises:
        GroupActionError: the table is not a group table.
    """

    def __init__(self, name: str, table: Tensor, generators: Sequence[int]) -> None:
        table = torch.as_tensor(table, dtype=torch.long).cpu()
        n = table.shape[0]
        if table.ndim != 2 or table.shape != (n, n):
            raise GroupActionError(f"group table must be square (order, order); got shape {tuple(table.shape)}.")
        ar = torch.arange(n)
        if not (torch.equal(table[0], ar) and torch.equal(table[:, 0], ar)):
            raise GroupActionError(
                f"group '{name}': element 0 must be the identity (table[0] and table[:, 0] = 0..n-1)."
            )
        # Latin square: every row and column is a permutation (cancellation law).
        if not (
            torch.equal(table.sort(dim=1).values, ar.expand(n, n))
            and torch.equal(table.sort(dim=0).values, ar[:, None].expand(n, n))
        ):
            raise GroupActionError(f"group '{name}': table is not a Latin square, so it is not a group table.")
        self.name = name
        self.order = int(n)
        self.generators = [int(g) for g in generators]
        self.table = table
        self._inverse = (table == 0).long().argmax(dim=1)

    def mul(self, g: int, h: int) -> int:
        """The product ``g*h``.

        Args:
            g: an element.
            h: an element.

        Returns:
            The product.
        """
        return int(self.table[g, h])

    def inv(self, g: int) -> int:
        """The inverse ``g^-1``.

        Args:
            g: an element.

        Returns:
            The inverse.
        """
        return int(self._inverse[g])

    @property
    def inverses(self) -> Tensor:
        """All inverses as a LongTensor of shape (order,)."""
        return self._inverse.clone()

    def elements(self) -> range:
        """``range(order)``.

        Returns:
            The elements.
        """
        return range(self.order)

    def is_associative(self) -> bool:
        """Check (gh)k = g(hk) for all triples (O(order^3), for tests and user-built tables).

        Returns:
            Whether the table is associative.
        """
        t = self.table
        left = t[t]  # left[g, h, k] = table[table[g, h], k]
        right = t[:, t]  # right[g, h, k] = table[g, table[h, k]]
        return bool(torch.equal(left, right))

    def __len__(self) -> int:
        return self.order

    def __repr__(self) -> str:
        return f"{self.name}(order={self.order})"


class CyclicGroup(FiniteGroup):
    """C_n: element k is the rotation by k steps; ``k*l = (k + l) mod n``.

    Args:
        n: the order (>= 1).

    Raises:
        GroupActionError: ``n < 1``.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise GroupActionError(f"CyclicGroup needs n >= 1, got {n}.")
        a = torch.arange(n)
        super().__init__(f"C{n}", (a[:, None] + a[None, :]) % n, [1] if n > 1 else [])
        self.n = n


class DihedralGroup(FiniteGroup):
    """D_n of order 2n: element ``k + n*s`` is r^k s^s; ``(r^a s^b)(r^c s^d) = r^(a + (-1)^b c) s^(b+d)``.

    Args:
        n: the number of rotations (>= 1).

    Raises:
        GroupActionError: ``n < 1``.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise GroupActionError(f"DihedralGroup needs n >= 1, got {n}.")
        e = torch.arange(2 * n)
        k, s = e % n, e // n
        a, b = k[:, None], s[:, None]
        c, d = k[None, :], s[None, :]
        rot = (a + (1 - 2 * b) * c) % n
        ref = (b + d) % 2
        super().__init__(f"D{n}", rot + n * ref, [1 % (2 * n), n] if n > 1 else [n])
        self.n = n


class DirectProduct(FiniteGroup):
    """G x H: element ``g * |H| + h`` is the pair (g, h), multiplied componentwise.

    Args:
        first: G.
        second: H.
    """

    def __init__(self, first: FiniteGroup, second: FiniteGroup) -> None:
        m = second.order
        e = torch.arange(first.order * m)
        g, h = e // m, e % m
        table = first.table[g[:, None], g[None, :]] * m + second.table[h[:, None], h[None, :]]
        gens = [gg * m for gg in first.generators] + list(second.generators)
        super().__init__(f"{first.name}x{second.name}", table, gens)
        self.factors = (first, second)

    def pair(self, element: int) -> tuple[int, int]:
        """The components (g, h) of an element.

        Args:
            element: an element of G x H.

        Returns:
            ``(g, h)``.
        """
        return divmod(int(element), self.factors[1].order)

    def element(self, g: int, h: int) -> int:
        """The element of the pair (g, h).

        Args:
            g: an element of G.
            h: an element of H.

        Returns:
            The element of G x H.
        """
        return int(g) * self.factors[1].order + int(h)


def as_perm_list(perms: Sequence[Sequence[int]] | Tensor) -> list[tuple[int, ...]]:
    """Permutations as a list of tuples, checked.

    Args:
        perms: permutations of ``0..n-1``: a sequence of sequences, a (k, n) tensor or one (n,) tensor.

    Returns:
        The permutations as tuples.

    Raises:
        GroupActionError: none given, or a row that is not a permutation of ``0..n-1`` of the common length.
    """
    if isinstance(perms, Tensor):
        if perms.ndim == 1:
            perms = perms[None]
        rows = [tuple(int(v) for v in row) for row in perms.tolist()]
    else:
        rows = [tuple(int(v) for v in p) for p in perms]
    if not rows:
        raise GroupActionError("need at least one permutation; got none. Pass e.g. [[1, 2, 0]].")
    n = len(rows[0])
    for p in rows:
        if len(p) != n or sorted(p) != list(range(n)):
            raise GroupActionError(
                f"{list(p)} is not a permutation of 0..{n - 1}; each generator must list every index "
                "once, all of the same length."
            )
    return rows


class PermutationGroup(FiniteGroup):
    """The group generated by permutations of ``0..n-1`` (closure by breadth-first search).

    ``perms[g]`` is sigma_g; the product is composition ``sigma_{g*h}(i) = sigma_g(sigma_h(i))``.
    Element 0 is the identity, then the given permutations in order (duplicates dropped), then the
    rest in BFS order, so a list that is already a group with the identity first keeps its order.

    Args:
        generators: the generating permutations (:func:`as_perm_list`).
        name: the group's name (default ``Perm{n}``).
        max_order: the largest order accepted.

    Raises:
        GroupActionError: invalid permutations, or more than ``max_order`` elements.
    """

    def __init__(
        self, generators: Sequence[Sequence[int]] | Tensor, name: str | None = None, max_order: int = 100_000
    ) -> None:
        gens = as_perm_list(generators)
        n = len(gens[0])
        identity = tuple(range(n))
        elements: list[tuple[int, ...]] = [identity]
        index = {identity: 0}
        for p in gens:
            if p not in index:
                index[p] = len(elements)
                elements.append(p)
        frontier = list(elements)
        while frontier:
            new = []
            for p in frontier:
                for q in gens:
                    r = tuple(p[q[i]] for i in range(n))  # p o q
                    if r not in index:
                        index[r] = len(elements)
                        elements.append(r)
                        new.append(r)
                        if len(elements) > max_order:
                            raise GroupActionError(
                                f"the generated group has more than max_order={max_order} elements; "
                                "pass fewer generators or raise max_order."
                            )
            frontier = new
        perms = torch.tensor(elements, dtype=torch.long)
        order = perms.shape[0]
        # comp[g, h, i] = perms[g, perms[h, i]]  (sigma_g o sigma_h)
        comp = perms[:, None, :].expand(order, order, n).gather(2, perms[None, :, :].expand(order, order, n))
        allrows = torch.cat([perms, comp.reshape(order * order, n)])
        _, inverse = torch.unique(allrows, dim=0, return_inverse=True)
        # Map unique ids back to element indices via the first `order` rows (the elements themselves).
        id_to_elem = torch.empty(int(inverse.max()) + 1, dtype=torch.long)
        id_to_elem[inverse[:order]] = torch.arange(order)
        table = id_to_elem[inverse[order:]].reshape(order, order)
        gen_ids = sorted({index[p] for p in gens if p != identity})
        super().__init__(name or f"Perm{n}", table, gen_ids)
        self.perms = perms
        self.degree = n

"""Data augmentation over group orbits: the whole orbit, or one seeded random element per sample.

Full augmentation trains on {(g x_i, rho_out(g) y_i) : g in G}; stochastic augmentation draws
g ~ Uniform(G) per sample and step (Nordenfors & Flinth, arXiv 2410.01452).
"""

from __future__ import annotations

import torch
from torch import Tensor

from symgen import rng
from symgen.errors import GroupActionError, ShapeError
from symgen.groups import GroupAction

__all__ = ["OrbitAugment", "RandomGroupAugment"]


class OrbitAugment:
    """Replace a batch by its whole orbit: x of shape (B, ...) -> (|G| * B, ...), g-major.

    ``x_aug[g * B + b] = rho(g) x[b]``; labels are repeated (invariant task) or transformed by
    ``out_action`` (equivariant task). The one orbit augmentation (``margins`` uses it too).

    Args:
        action: the group action on inputs.
        out_action: the action of the same group on labels (equivariant task); None: labels repeated.

    Raises:
        GroupActionError: ``out_action`` acts by a different group.
    """

    def __init__(self, action: GroupAction, out_action: GroupAction | None = None) -> None:
        if out_action is not None and not torch.equal(out_action.group.table, action.group.table):
            raise GroupActionError(
                f"out_action's group {out_action.group!r} differs from the input "
                f"action's group {action.group!r}; both must act by the same group."
            )
        self.action = action
        self.out_action = out_action

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The orbit of the batch, x_aug[g * B + b] = rho(g) x[b], and the labels to match.

        Args:
            x: a batch (B, ...).
            y: labels (B, ...) or None.

        Returns:
            ``x_aug`` (|G| B, ...) if ``y`` is None, else ``(x_aug, y_aug)`` (y repeated, or transformed by ``out_action``).
        """
        x = torch.as_tensor(x)
        if x.ndim < 1:
            raise ShapeError(f"OrbitAugment: x must have a leading sample dim (B, ...); got shape {tuple(x.shape)}.")
        self.action.check(x.shape[1:])  # one sample must fit the action
        orbit = self.action.orbit(x)  # (|G|, B, ...)
        x_aug = orbit.reshape(-1, *x.shape[1:])
        if y is None:
            return x_aug
        y = torch.as_tensor(y)
        if y.ndim < 1 or y.shape[0] != x.shape[0]:
            raise ShapeError(f"OrbitAugment: x has {x.shape[0]} samples but y has shape {tuple(y.shape)}.")
        order = self.action.order
        if self.out_action is None:
            y_aug = y.unsqueeze(0).expand(order, *y.shape).reshape(-1, *y.shape[1:])
        else:
            y_aug = self.out_action.orbit(y).reshape(-1, *y.shape[1:])
        return x_aug, y_aug


class RandomGroupAugment:
    """Apply one uniformly random group element per sample, drawn from ``generator``.

    Every sample gets its own element. ``last_elements`` keeps the last draw (for equivariant
    targets, apply the same elements to y with :meth:`apply_elements`).

    Args:
        action: the group action on inputs.
        generator: an int seed or a ``torch.Generator`` (used as is, shared); None = seed 0.
        batch_dims: the number of leading sample dims of x (e.g. 2 for per-member batches ``(M, B, ...)``).
        out_action: the action of the same group on labels (equivariant task); None: labels unchanged.

    Raises:
        ShapeError: ``batch_dims < 1``.
        GroupActionError: ``out_action`` acts by a different group.
    """

    def __init__(
        self,
        action: GroupAction,
        generator: rng.Seed = None,
        batch_dims: int = 1,
        out_action: GroupAction | None = None,
    ) -> None:
        generator = rng.as_generator(generator)
        if batch_dims < 1:
            raise ShapeError(f"RandomGroupAugment: batch_dims must be >= 1, got {batch_dims}.")
        if out_action is not None and not torch.equal(out_action.group.table, action.group.table):
            raise GroupActionError(
                f"out_action's group {out_action.group!r} differs from the input action's group {action.group!r}."
            )
        self.action = action
        self.out_action = out_action
        self.generator = generator
        self.batch_dims = batch_dims
        self.last_elements: Tensor | None = None

    def sample(self, batch_shape: tuple[int, ...] | torch.Size) -> Tensor:
        """Draw group elements of the given batch shape (on CPU, from the generator).

        Args:
            batch_shape: the shape of the draw.

        Returns:
            Element indices of shape ``batch_shape``.
        """
        return torch.randint(
            0, self.action.group.order, tuple(batch_shape), generator=self.generator, device=self.generator.device
        )

    def apply_elements(self, elements: Tensor, x: Tensor, action: GroupAction | None = None) -> Tensor:
        """Apply ``elements`` sample by sample, by one gather.

        Args:
            elements: element indices, shape = the leading ``batch_dims`` of x.
            x: the batch.
            action: the action to apply (default: the input action).

        Returns:
            The transformed batch, shaped like x.

        Raises:
            ShapeError: ``elements`` does not match the batch dims of x.
        """
        action = action or self.action
        lead = x.shape[: self.batch_dims]
        if tuple(elements.shape) != tuple(lead):
            raise ShapeError(f"elements of shape {tuple(elements.shape)} do not match the batch dims {tuple(lead)}.")
        flat = x.reshape(-1, *x.shape[self.batch_dims :])
        return action.apply_each(elements.reshape(-1).to(x.device), flat).reshape(x.shape)

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """A fresh random group element per sample: x_aug[b] = rho(g_b) x[b] (kept in ``last_elements``).

        Args:
            x: a batch (*batch, ...) with ``batch_dims`` leading batch dims.
            y: labels or None.

        Returns:
            ``x_aug`` if ``y`` is None, else ``(x_aug, y)`` (``y`` transformed by ``out_action`` when given).
        """
        if x.ndim <= self.batch_dims:
            raise ShapeError(
                f"RandomGroupAugment: x of shape {tuple(x.shape)} has no dims after the {self.batch_dims} batch dim(s)."
            )
        elements = self.sample(x.shape[: self.batch_dims])
        self.last_elements = elements
        x_aug = self.apply_elements(elements, x)
        if y is None:
            return x_aug
        if self.out_action is None:
            return x_aug, y
        return x_aug, self.apply_elements(elements, y, self.out_action)

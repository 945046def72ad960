"""Randomness, one rule: every function that samples takes ``generator``, a seed or a ``torch.Generator``.

``generator=None`` means seed 0, so a call without one is deterministic; a library function never
reads or changes the global RNG state (``torch.manual_seed``), on the CPU or on a GPU. The one
exception is torch's own: a module's initializer (``generator`` of a layer or model constructor) draws
from the global CPU generator when given none, as every ``torch.nn`` module does (:func:`init_generator`). Draws are
made on the generator's device (CPU by default) and moved, so a seed gives the same numbers on
every device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from symgen.errors import ConfigError

__all__ = [
    "Seed",
    "as_generator",
    "init_generator",
    "seed_of",
    "derive",
    "randn",
    "rademacher",
    "randn_like",
    "rademacher_like",
    "isolated_seed",
]

Seed = int | torch.Generator | None


def as_generator(generator: Seed = None, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` from a seed (``None`` = 0) or the generator itself (used as is, shared).

    Args:
        generator: an int seed, a ``torch.Generator`` or None (seed 0).
        device: the device of a new generator (default: the CPU).

    Returns:
        The generator.
    """
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = 0
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise ConfigError(f"generator must be an int seed, a torch.Generator or None; got {type(generator).__name__}.")
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(int(generator) % (2**63))
    return g


def init_generator(generator: Seed = None) -> torch.Generator:
    """The generator of a module's initializer: like every ``torch.nn`` module, ``None`` draws from the global
    CPU generator (so ``rng.isolated_seed`` and ``functional.stacked_init`` seed it); a seed or generator overrides.

    Args:
        generator: an int seed, a ``torch.Generator`` or None (the global generator).

    Returns:
        The generator.
    """
    return torch.random.default_generator if generator is None else as_generator(generator)


def seed_of(generator: Seed = None) -> int:
    """An integer seed: the seed itself, 0 for ``None``, or one drawn from a generator (advancing it).

    Args:
        generator: an int seed, a ``torch.Generator`` or None.

    Returns:
        The seed.
    """
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return int(as_generator(generator).initial_seed())


def derive(seed: int, *keys: int) -> int:
    """A seed for the sub-stream ``keys`` of ``seed`` (member m, trial t, ...): fixed odd-multiplier mixing.

    The keys are summed, so ``derive(s, a, b)`` equals ``derive(s, a + b + 1)``: give each use one key
    (or nest, ``derive(derive(s, a), b)``).

    Args:
        seed: the parent seed.
        *keys: the sub-stream's keys.

    Returns:
        A seed in ``[0, 2**62)``.
    """
    h = int(seed) * 0x9E3779B1 + 0x5BD1E995
    for k in keys:
        h = h + (int(k) + 1) * 0x85EBCA77
    return h % (2**62)


def randn(
    shape: Sequence[int],
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """N(0, 1) draws of ``shape`` from ``generator`` (drawn on its device), returned on ``device``.

    Args:
        shape: the shape of the draw.
        generator: the generator drawn from.
        device: where the result goes (default: the generator's device).
        dtype: its dtype (default: torch's default).

    Returns:
        The tensor.
    """
    out = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return out.to(device) if device is not None else out


def rademacher(
    shape: Sequence[int],
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Random +-1 entries of ``shape`` from ``generator``, returned on ``device`` in ``dtype``.

    Args:
        shape: the shape of the draw.
        generator: the generator drawn from.
        device: where the result goes (default: the generator's device).
        dtype: its dtype (default: torch's default).

    Returns:
        The tensor.
    """
    r = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device)
    return (2 * r - 1).to(device=device if device is not None else r.device, dtype=dtype or torch.get_default_dtype())


def randn_like(tree: Mapping[str, Tensor], generator: torch.Generator, num: int | None = None) -> dict[str, Tensor]:
    """N(0, 1) tensors shaped like each entry of ``tree``, on its device and dtype.

    Args:
        tree: a dict of tensors.
        generator: the generator drawn from (in key order).
        num: a leading axis of this size, if given.

    Returns:
        A dict with the same keys.
    """
    lead = () if num is None else (num,)
    return {k: randn(lead + tuple(v.shape), generator, device=v.device, dtype=v.dtype) for k, v in tree.items()}


def rademacher_like(
    tree: Mapping[str, Tensor], generator: torch.Generator, num: int | None = None
) -> dict[str, Tensor]:
    """Random +-1 tensors shaped like each entry of ``tree``, on its device and dtype.

    Args:
        tree: a dict of tensors.
        generator: the generator drawn from (in key order).
        num: a leading axis of this size, if given.

    Returns:
        A dict with the same keys.
    """
    lead = () if num is None else (num,)
    return {k: rademacher(lead + tuple(v.shape), generator, device=v.device, dtype=v.dtype) for k, v in tree.items()}


@contextmanager
def isolated_seed(seed: int) -> Iterator[None]:
    """Run code that draws from the global RNG (``nn.Module`` initializers, dropout) under ``seed``, then
    restore every global generator: the CPU one and, where CUDA is initialized, each GPU's.

    Inside, the CPU generator and (where CUDA is initialized) every GPU generator are at ``seed``;
    nothing outside the block sees a change. ``torch.random.fork_rng(devices=[])`` around
    ``torch.manual_seed`` would instead silently reset the GPU generators for the caller.

    Args:
        seed: the seed inside the block.

    Yields:
        None, once (a context manager).
    """
    cpu_state = torch.random.get_rng_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    try:
        torch.random.default_generator.manual_seed(int(seed))
        if cuda:
            torch.cuda.manual_seed_all(int(seed))
        yield
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)

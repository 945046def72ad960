"""Validation shared by the empirical-NTK entry points: inputs, model, parameters, output size, device,
non-finite values and the output's size against the memory limit."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from symgen import memory
from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.functional import buffers_of, call, params_of
from symgen.numerics import check_tensors, first_bad_row

__all__: list[str] = []  # internal: used by symgen.ntk.empirical


def check_inputs(x1: Tensor, x2: Tensor | None) -> None:
    """Raise ShapeError unless x1 (and x2) are batches (N, ...) with N >= 1 and one per-sample shape."""
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{name} must be a batch tensor of shape (N, ...) with N >= 1, got {shape}.")
    if x2 is not None and x1.shape[1:] != x2.shape[1:]:
        raise ShapeError(
            f"x1 and x2 must have the same per-sample shape; got {tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}."
        )


def check_model(model: nn.Module) -> None:
    """Raise ConfigError unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")


def resolve_params(
    model: nn.Module, params: Mapping[str, Tensor] | None, buffers: Mapping[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The (detached) parameters to differentiate and the buffers: the given ones or the model's own."""
    check_model(model)
    p = {k: v.detach() for k, v in (params_of(model) if params is None else params).items()}
    if not p:
        raise ConfigError(
            "the model has no trainable parameters, so its NTK is zero; pass `params` or unfreeze "
            "parameters (requires_grad=True)."
        )
    b = dict(buffers_of(model) if buffers is None else buffers)
    return p, b


def output_size(model: nn.Module, params: Mapping[str, Tensor], fixed: Mapping[str, Tensor], x: Tensor) -> int:
    """O, the number of outputs per sample, from one forward pass on ``x[:1]``."""
    with torch.no_grad():
        out = call(model, params, fixed, x[:1])
    if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ShapeError(f"the model must map a batch (N, ...) to outputs (N, ...); for one input it returned {shape}.")
    return max(1, out[0].numel())


def check_device(p: Mapping[str, Tensor], x1: Tensor, x2: Tensor | None) -> None:
    """Raise ConfigError when the inputs are not on the parameters' device."""
    dev = next(iter(p.values())).device
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and x.device != dev:
            raise ConfigError(
                f"{name} is on {x.device} but the model's parameters are on {dev}; move the inputs "
                f"({name}.to(device)) or the model (model.to(device))."
            )


def check_finite(where: str, p: Mapping[str, Tensor], b: Mapping[str, Tensor], x1: Tensor, x2: Tensor | None) -> None:
    """Raise a DivergenceError naming the weight, buffer or input (x1 / x2 and its batch index) that holds non-finite values (NaN or inf).

    One stacked ``isfinite`` for the parameters, one for the buffers and one per input tensor.
    """
    check_tensors(where, "weight", p)
    check_tensors(where, "buffer", b)
    for name, x in (("x1", x1), ("x2", x2)):
        i = None if x is None else first_bad_row(x)
        if i is not None:
            raise DivergenceError(
                f"{where}: the input {name} at batch index {i} holds non-finite values (NaN or inf); clean or drop that sample."
            )


def kernel_bytes(n1: int, n2: int, output: str, o: int, item: int) -> int:
    """Bytes of an (n1, n2) kernel, or (n1, n2, O, O) for ``output="full"``."""
    return n1 * n2 * (o * o if output == "full" else 1) * item


def check_output_fits(
    n1: int, n2: int, output: str, o: int, dtype: torch.dtype, working: int, device: torch.device
) -> None:
    """Raise a MemoryBudgetError before an (n1, n2[, O, O]) kernel and ``working`` bytes of blocks are allocated,
    when they exceed the memory limit (:mod:`symgen.memory`)."""
    item = torch.empty(0, dtype=dtype).element_size()
    shape = f"({n1}, {n2}{f', {o}, {o}' if output == 'full' else ''})"
    fixes = [] if output != "full" else ["output='trace' (the sum over outputs: O^2 times smaller)"]
    fixes += [
        "kernel rows in slices (kernel(x1[i:j], x2)) or a smaller batch",
        "empirical_ntk_fn(model).stream(loader) for whole datasets only when the (N1, N2) kernel fits",
        "a lower memory_budget for the blocks",
    ]
    out = kernel_bytes(n1, n2, output, o, item)
    memory.check_fits(
        out + working,
        f"the empirical NTK's {shape} {dtype} output (output='{output}', {memory.format_bytes(out)}) and its blocks",
        "compute " + " / ".join(fixes),
        device=device,
    )

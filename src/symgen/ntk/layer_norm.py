"""LayerNorm written as means and a variance while a kernel is differentiated w.r.t. its inputs.

``torch.func`` gets the mixed derivative d/dx (d f / d W) wrong through ``aten::native_layer_norm`` in
torch 2.13: the input-gradient of an empirical NTK of ``Linear -> LayerNorm -> tanh -> Linear`` was off by
0.029 (float64, against central differences and against ``torch.autograd`` with ``create_graph``),
while the same network with LayerNorm written out as ``(x - mean) / sqrt(var + eps) * w + b`` agrees to
5e-9. Parameter Hessians (``jvp`` of ``grad``) through it are right. Inside :func:`composite_layer_norm`
``torch.nn.functional.layer_norm`` (what ``nn.LayerNorm`` calls) is that composite.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["composite_layer_norm", "layer_norm"]


def layer_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:  # fmt: skip
    """``F.layer_norm`` as ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dimensions
    (arXiv 1607.06450), in differentiable primitives only.

    Args:
        input: the input.
        normalized_shape: the trailing shape normalized over.
        weight: the elementwise scale (None: none).
        bias: the elementwise shift (None: none).
        eps: added to the variance.

    Returns:
        The normalized input.
    """
    dims = tuple(range(-len(normalized_shape), 0))
    centred = input - input.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


class _CompositeLayerNorm(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func is F.layer_norm:
            return layer_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def composite_layer_norm() -> Iterator[None]:
    """Inside: ``torch.nn.functional.layer_norm`` (and so ``nn.LayerNorm``) is :func:`layer_norm`.

    A torch function mode, so it holds for the calling thread only (other threads keep the real kernel).

    Yields:
        None, once (a context manager).
    """
    with _CompositeLayerNorm():
        yield

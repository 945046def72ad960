"""Convolution, eval-mode BatchNorm, ReLU and max pooling with a fast double backward, for curvature products on CPU.

A Hessian- or GGN-vector product on a retained graph differentiates the backward pass of every
layer. PyTorch's own double backward of ``conv2d`` forms the weight term as a convolution of the
batch-transposed tensors (a kernel the size of the feature map), and eval-mode ``batch_norm``
differentiates the general batch-statistics formula. Here ``conv2d`` is the closed triangle of
three bilinear maps, each the adjoint of the others, so every derivative of every order is one of

    A(x, W)  = conv(x, W)            (forward)
    B(g, W)  = A(., W)^T g           (input gradient,  = aten.convolution_backward[0])
    C(x, g)  = A(x, .)^T g           (weight gradient, = aten.convolution_backward[1])

with dB/dg^T = A, dB/dW^T h = C(h, g), dC/dx^T k = B(g, k), dC/dg^T k = A(x, k): oneDNN's forward,
backward-data and backward-weights kernels, run channels-last (NHWC), where they are 2-3x faster
than NCHW on CPU for few channels on large maps. Eval-mode BatchNorm is the centred affine map
``(x - mean) s + beta`` with ``s = gamma / sqrt(var + eps)``; ``relu``'s and ``max_pool2d``'s backward
passes are functions whose own derivative in the (piecewise constant) mask or argmax is None, not a zero tensor
that autograd would fill and add into every activation's tangent; max pooling is the pair P^T g (scatter to the
argmax) and P h (gather from it). Every tensor of the graph stays channels-last (elementwise kernels over two
layouts run strided, 5-15x slower), and a backward pass computes only the gradients the engine will use
(:func:`_needed`). Same products to round-off (tests/test_double_backward.py, tests/test_hvp_fast.py,
tests/test_double_backward_layouts.py).
Folding BatchNorm into the convolution's weight (conv(x, s W)) saves its elementwise passes but forms
d/dgamma from two large sums that cancel: 1e-4 relative error in float32 at batch 50; not done. Measured per
product, 1 thread, against PyTorch's kernels: a BN CNN on 8x8 digits (86k parameters, batch 512) 1.4x (Hessian,
kept graph) and 1.7x (GGN); CIFAR ResNet-20, batch 200, 1.3-1.5x on 2 cores (benchmarks/README.md); CIFAR
ResNet-18 (64-512 channels, already near the matmul rate) about 1.1x.

Activations come out channels-last, so a model that flattens a feature map with ``.view`` fails
inside :func:`fast_double_backward`; the operators then rebuild the graph with PyTorch's kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeAlias

import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.autograd import Function
from torch.overrides import TorchFunctionMode

__all__ = ["fast_double_backward", "fast_double_backward_applies"]

_aten = torch.ops.aten
# (stride, padding, dilation, groups) of a 2D convolution
ConvConfig: TypeAlias = tuple[list[int], list[int], list[int], int]


def _nhwc(t: Tensor) -> Tensor:
    # channels-last with explicit strides: a tensor with a size-1 dim (an input of 1 channel) is contiguous in both
    # layouts, and oneDNN, reading its strides, would pick NCHW for the output and every layer after it
    _, c, h, w = t.shape
    want = (c * h * w, 1, w * c, c)
    if t.stride() == want:
        return t
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided(t.shape, want)  # the same elements (the strides differ only on size-1 dims)
    return t.contiguous(memory_format=torch.channels_last)


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in ``ref``'s memory layout: elementwise kernels over two layouts run strided, 5-15x slower."""
    if all(a == b for a, b, n in zip(t.stride(), ref.stride(), ref.shape, strict=True) if n > 1):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _forward(x: Tensor, w: Tensor, cfg: ConvConfig) -> Tensor:
    stride, padding, dilation, groups = cfg
    y: Tensor = _aten.convolution(_nhwc(x), w, None, stride, padding, dilation, False, [0, 0], groups)
    return y


def _backward(g: Tensor, x: Tensor, w: Tensor, cfg: ConvConfig, which: int) -> Tensor:
    stride, padding, dilation, groups = cfg
    mask = [which == 0, which == 1, False]
    grads = _aten.convolution_backward(_nhwc(g), x, w, None, stride, padding, dilation, False, [0, 0], groups, mask)
    out: Tensor = grads[which]
    return out


def _shaped(like: Tensor, shape: torch.Size, nhwc: bool) -> Tensor:
    # an uninitialized tensor that only carries a shape (and, for activations, the NHWC layout that
    # makes oneDNN pick its channels-last kernel; a stride-0 expand would make it pick NCHW)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


_WILL_RUN = getattr(torch._C, "_will_engine_execute_node", lambda fn: True)  # as torch.autograd.graph uses it


def _needed(ctx: Any, i: int) -> bool:
    """Whether this backward pass uses the gradient of input ``i`` (a tensor input before any non-tensor one).

    ``ctx.needs_input_grad`` is fixed when the graph is built; the engine runs only the nodes on a path to what
    ``autograd.grad`` was asked for. J v = d(J^T u)/du of the generalized Gauss-Newton operator needs no gradient
    of the weights or activations: half the convolutions of that pass. A leaf's node cannot be queried under
    ``autograd.grad`` (:func:`_node` puts a view in front of the weights).
    """
    if not ctx.needs_input_grad[i]:
        return False
    fn = ctx.next_functions[i][0]
    try:
        return fn is not None and bool(_WILL_RUN(fn))
    except RuntimeError:  # a leaf (AccumulateGrad) under autograd.grad
        return True


def _node(t: Tensor | None) -> Tensor | None:
    """A leaf weight behind a view (free): :func:`_needed` can then ask whether its gradient is used."""
    return t.view_as(t) if t is not None and t.is_leaf and t.requires_grad else t


class _Conv(Function):
    """A(x, W) = conv(x, W)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, cfg: ConvConfig) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.cfg = cfg
        return _forward(x, w, cfg)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        # g = 0 exactly: the backward of J^T u at the dummy u = 0 that builds the GGN's graph; its values are
        # zeros, its graph is what counts (one pass over g against two convolutions)
        zero = g.numel() == 0 or not (bool(g[0].any()) or bool(g.any()))  # one sample first: rarely all zero
        gx = _InputGrad.apply(g, w, x.shape, ctx.cfg, zero) if _needed(ctx, 0) else None
        gw = _WeightGrad.apply(x, g, w.shape, ctx.cfg, zero) if _needed(ctx, 1) else None
        return gx, gw, None


class _InputGrad(Function):
    """B(g, W) = A(., W)^T g, linear in g and in W (``zero``: g = 0, the result is zeros)."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, w: Tensor, x_shape: torch.Size, cfg: ConvConfig, zero: bool) -> Tensor:
        ctx.save_for_backward(g, w)
        ctx.cfg = cfg
        if zero:
            return _shaped(g, x_shape, True).zero_()
        return _backward(g, _shaped(g, x_shape, True), w, cfg, 0)

    @staticmethod
    def backward(ctx: Any, h: Tensor) -> tuple[Tensor | None, ...]:
        g, w = ctx.saved_tensors
        gg = _Conv.apply(h, w, ctx.cfg) if _needed(ctx, 0) else None
        gw = _WeightGrad.apply(h, g, w.shape, ctx.cfg, False) if _needed(ctx, 1) else None
        return gg, gw, None, None, None


class _WeightGrad(Function):
    """C(x, g) = A(x, .)^T g, linear in x and in g (``zero``: g = 0, the result is zeros)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, g: Tensor, w_shape: torch.Size, cfg: ConvConfig, zero: bool) -> Tensor:
        ctx.save_for_backward(x, g)
        ctx.cfg = cfg
        if zero:
            return _shaped(x, w_shape, False).zero_()
        return _backward(g, _nhwc(x), _shaped(x, w_shape, False), cfg, 1)

    @staticmethod
    def backward(ctx: Any, k: Tensor) -> tuple[Tensor | None, ...]:
        x, g = ctx.saved_tensors
        gx = _InputGrad.apply(g, k, x.shape, ctx.cfg, False) if _needed(ctx, 0) else None
        gg = _Conv.apply(x, k, ctx.cfg) if _needed(ctx, 1) else None
        return gx, gg, None, None, None


def _pair(v: Any) -> list[int]:
    return [int(i) for i in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor | None:
    if isinstance(padding, str) or x.ndim != 4:
        return None  # padding="same"/"valid", unbatched input: PyTorch's own kernel
    out: Tensor = _Conv.apply(x, _node(weight), (_pair(stride), _pair(padding), _pair(dilation), int(groups)))
    return out if bias is None else out + bias[:, None, None]


def _batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor | None:
    if training or running_mean is None or running_var is None or x.ndim < 2:
        return None  # batch statistics: PyTorch's own kernel
    s = torch.rsqrt(running_var + eps)
    if weight is not None:
        s = s * weight
    shape = (1, -1) + (1,) * (x.ndim - 2)
    # centred, as PyTorch's kernel: d/dgamma = sum(g (x - mean)) / sqrt(var + eps). The uncentred x s + b
    # (b = beta - mean s) forms it as sum(g x) s' - mean sum(g) s', two large sums that cancel: 1e-4
    # relative error in float32 Hessian-vector products of a ResNet-20 at batch 50 (against 5e-7). The
    # per-channel sums of d/dgamma and d/dbeta are accumulated in float64, as PyTorch's CPU kernel does (a
    # BatchNorm layer of 16 channels on 32 x 32 x 32 activations: 1.2e-7 and 3.5e-8 relative, against 5.1e-7
    # and 1.9e-7 for PyTorch's own kernel).
    out: Tensor = _ChannelScale.apply(x - running_mean.reshape(shape), s)
    return out if bias is None else _ChannelShift.apply(out, _node(bias))


def _channel_dims(t: Tensor) -> list[int]:
    return [0, *range(2, t.ndim)]


_CHUNK = 1 << 16  # elements per partial sum: the float64 copy of a chunk stays in cache


def _channel_sum(g: Tensor, x: Tensor | None = None) -> Tensor:
    """``sum over all dims but 1 of g (or g x)``, accumulated in float64 (returned in float64).

    On one thread, summed a few samples at a time, each chunk's float64 sum added into the total: the same float64
    accumulation as one ``sum(dtype=float64)`` of the whole tensor, which converts it to float64 in memory first (2x
    slower on 2.5M elements; Hessian products 5-8% faster on ResNet-20 and the 86k BN CNN). With several threads the
    chunks' many small parallel kernels cost more than they save (ResNet-20, 2 threads on 2 cores: 0.95-0.99 s per
    Hessian product against 0.84 s): one sum.
    """
    step = max(1, _CHUNK // max(1, math.prod(g.shape[1:]))) if torch.get_num_threads() == 1 else max(1, g.shape[0])
    dims = _channel_dims(g)
    acc = g.new_zeros(g.shape[1], dtype=torch.float64)
    for i in range(0, g.shape[0], step):
        part = g[i : i + step] if x is None else g[i : i + step] * x[i : i + step]
        acc += part.sum(dims, dtype=torch.float64)
    return acc


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((1, -1) + (1,) * (like.ndim - 2))


class _ChannelScale(Function):
    """y[n, c, ...] = x[n, c, ...] s[c]; the gradient of s is a per-channel sum accumulated in float64."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Tensor) -> Tensor:
        ctx.save_for_backward(x, s)
        return x * _per_channel(s, x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, s = ctx.saved_tensors
        gx = _ChannelScale.apply(g, s) if _needed(ctx, 0) else None
        gs = _ChannelDot.apply(g, x) if _needed(ctx, 1) else None
        return gx, gs


class _ChannelDot(Function):
    """d[c] = sum over the batch and positions of g x, accumulated in float64 (returned in g's dtype)."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(g, x)
        return _channel_sum(g, x).to(g.dtype)

    @staticmethod
    def backward(ctx: Any, k: Tensor) -> tuple[Tensor | None, Tensor | None]:
        g, x = ctx.saved_tensors
        dg = _ChannelScale.apply(x, k) if _needed(ctx, 0) else None
        dx = _ChannelScale.apply(g, k) if _needed(ctx, 1) else None
        return dg, dx


class _ChannelShift(Function):
    """y[n, c, ...] = x[n, c, ...] + b[c]; the gradient of b is a per-channel sum accumulated in float64."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, b: Tensor) -> Tensor:
        ctx.dims = x.ndim
        return x + _per_channel(b, x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gb = _ChannelSum.apply(g) if _needed(ctx, 1) else None
        return g, gb


class _ChannelSum(Function):
    """d[c] = sum over the batch and positions of g, accumulated in float64; its adjoint broadcasts."""

    @staticmethod
    def forward(ctx: Any, g: Tensor) -> Tensor:
        ctx.shape = g.shape
        return _channel_sum(g).to(g.dtype)

    @staticmethod
    def backward(ctx: Any, k: Tensor) -> Tensor:
        return _per_channel(k, torch.empty(ctx.shape, device="meta")).expand(ctx.shape)


class _Relu(Function):
    """relu(x); its backward is :class:`_ReluGrad`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        grad: Tensor = _ReluGrad.apply(g, out)
        return grad


class _ReluGrad(Function):
    """g * 1[out > 0]: linear in g, piecewise constant in out (its derivative there is zero, not a zero tensor)."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, out: Tensor) -> Tensor:
        ctx.save_for_backward(out)
        grad: Tensor = _aten.threshold_backward(_like(g, out), out, 0)
        return grad

    @staticmethod
    def backward(ctx: Any, h: Tensor) -> tuple[Tensor | None, None]:
        (out,) = ctx.saved_tensors
        return (_ReluGrad.apply(h, out) if ctx.needs_input_grad[0] else None), None


def _relu(x: Tensor, inplace: bool = False) -> Tensor | None:
    if inplace:
        return None  # the caller may rely on the side effect: PyTorch's own kernel
    out: Tensor = _Relu.apply(x)
    return out


# (kernel, stride, padding, dilation, ceil_mode) of a 2D max pooling
PoolConfig: TypeAlias = tuple[list[int], list[int], list[int], list[int], bool]


class _MaxPool(Function):
    """max_pool2d(x) = P x with P the selection of each window's argmax: piecewise linear in x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cfg: PoolConfig) -> Tensor:
        pair: tuple[Tensor, Tensor] = _aten.max_pool2d_with_indices(x, *cfg)
        out, idx = pair
        ctx.save_for_backward(idx)
        ctx.x_shape, ctx.cfg = x.shape, cfg
        ctx.nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        (idx,) = ctx.saved_tensors
        return _PoolScatter.apply(g, idx, ctx.x_shape, ctx.nhwc, ctx.cfg), None


class _PoolScatter(Function):
    """P^T g: each window's g added at its argmax (``max_pool2d_with_indices_backward``), linear in g."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, idx: Tensor, x_shape: torch.Size, nhwc: bool, cfg: PoolConfig) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.x_shape, ctx.nhwc, ctx.cfg = x_shape, nhwc, cfg
        out: Tensor = _aten.max_pool2d_with_indices_backward(_like(g, idx), _shaped(g, x_shape, nhwc), *cfg, idx)
        return out

    @staticmethod
    def backward(ctx: Any, h: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        (idx,) = ctx.saved_tensors
        gg = _PoolGather.apply(h, idx, ctx.x_shape, ctx.nhwc, ctx.cfg) if ctx.needs_input_grad[0] else None
        return gg, None, None, None, None


class _PoolGather(Function):
    """P h: h read at each window's argmax, linear in h (its adjoint is :class:`_PoolScatter`).

    Channels-last, a gather along the positions of the (N, H W, C) view: 3x faster than PyTorch's gather of the
    (N, C, H W) view, which copies a channels-last h to NCHW first."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, idx: Tensor, x_shape: torch.Size, nhwc: bool, cfg: PoolConfig) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.x_shape, ctx.nhwc, ctx.cfg = x_shape, nhwc, cfg
        n, c, ho, wo = idx.shape
        if nhwc:
            hv = _nhwc(h).permute(0, 2, 3, 1).reshape(n, -1, c)
            out = torch.gather(hv, 1, idx.permute(0, 2, 3, 1).reshape(n, -1, c))
            return out.view(n, ho, wo, c).permute(0, 3, 1, 2)
        return torch.gather(h.reshape(n, c, -1), 2, idx.reshape(n, c, -1)).view(n, c, ho, wo)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        (idx,) = ctx.saved_tensors
        gh = _PoolScatter.apply(g, idx, ctx.x_shape, ctx.nhwc, ctx.cfg) if ctx.needs_input_grad[0] else None
        return gh, None, None, None, None


def _max_pool2d(
    x: Tensor,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor | None:
    if return_indices or x.ndim != 4:
        return None  # the indices wanted, unbatched input: PyTorch's own kernel
    k = _pair(kernel_size)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _pair(stride)
    out: Tensor = _MaxPool.apply(x, (k, s, _pair(padding), _pair(dilation), bool(ceil_mode)))
    return out


class _FastMode(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        fast = _FAST.get(func)
        if fast is not None:
            out = fast(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


_FAST: dict[Any, Any] = {TF.conv2d: _conv2d, TF.batch_norm: _batch_norm, TF.relu: _relu, TF.max_pool2d: _max_pool2d}


def fast_double_backward_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`fast_double_backward` is used for an operator on ``device`` in ``dtype``.

    Float32 on CPU, where it was measured (oneDNN has no float64 kernels; GPUs are not measured yet).

    Args:
        device: the operator's device.
        dtype: the operator's dtype.

    Returns:
        True for float32 on CPU.
    """
    return torch.device(device).type == "cpu" and dtype == torch.float32


@contextmanager
def fast_double_backward() -> Iterator[None]:
    """Inside: ``conv2d``, eval-mode ``batch_norm``, ``relu`` and ``max_pool2d`` build graphs whose double backward is fast (above).

    Yields:
        None, once (a context manager).
    """
    with _FastMode():
        yield

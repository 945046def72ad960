"""Infinite-width NNGP and NTK of convolutional nets (1D and 2D, stride 1), and the finite nets they describe.

``[Conv(filter_size), act] * depth`` then a Dense read-out, in NTK parameterization. With a dense read-out
of the flattened feature map (``readout="flatten"``) the kernel keeps only equal positions,
``K(x, y) = (1/|P|) sum_i C(x_i, y_i)``: the *local* kernel of Favero, Cagnetta & Wyart (arXiv 2106.08619)
with constituent C the NTK of a one-hidden-layer net on the patches x_i. With global average pooling
(``readout="gap"``) every pair of positions enters, ``K(x, y) = (1/|P|^2) sum_{i,j} C(x_i, y_j)``: their
*convolutional* kernel. Recursions: Novak et al. arXiv 1810.05148 (CNN-GP), Arora et al. arXiv 1904.11955
(CNTK); the parameterization equals neural-tangents' ``stax.Conv(..., padding)`` (arXiv 1912.02803).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from symgen.errors import ConfigError, ShapeError
from symgen.ntk import duals
from symgen.ntk.analytic import Erf, NTKLinear, check_finite_input
from symgen.ntk.conv_ops import filter_mean, pad_axis
from symgen.rng import Seed, init_generator

__all__ = ["CONV_READOUTS", "CONV_PADDINGS", "analytic_conv_ntk", "NTKConv", "ntk_cnn"]

CONV_READOUTS = ("flatten", "gap")
CONV_PADDINGS = ("circular", "same", "valid")
_ACTIVATIONS = ("relu", "erf", "identity")
_BLOCK_ENTRIES = 1 << 16


def _pads(filter_size: tuple[int, ...], padding: str) -> list[tuple[int, int]]:
    """(left, right) padding per spatial axis: 'same'/'circular' keep the size (left = (k-1)//2, like torch's 'same')."""
    if padding == "valid":
        return [(0, 0) for _ in filter_size]
    return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in filter_size]


def _act_var(v: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return v / 2.0
    if activation == "erf":
        return duals.erf_variance(v)
    return v


def _input_distances(xa: Tensor, b: Tensor, full: bool) -> Tensor:
    """``sum_c (xa[i, c, p] - b[j, c, q])^2`` from the differences themselves: (n1, n2, *S) at p = q, or
    (n1, n2, P, P) for all position pairs (``full``); exactly 0 where the pixels agree."""
    if full:
        fa, fb = xa.flatten(2), b.flatten(2)
        return ((fa[:, None, :, :, None] - fb[None, :, :, None, :]) ** 2).sum(2)
    return ((xa[:, None] - b[None]) ** 2).sum(2)


def _pad_distances(dist: Tensor, m1: Tensor, m2: Tensor, pads: list[tuple[int, int]]) -> Tensor:
    """Zero-pad the all-pairs distances ``dist`` (n1, n2, *S, *S) as the feature maps are zero-padded.

    A padded position p against a real q has distance ``m2(q) = E v_q^2`` (``m1``: (n1, *S), ``m2``: (n2, *S)
    the second moments), two padded positions 0."""
    dims = len(pads)
    for i, (left, right) in enumerate(pads):
        dist = pad_axis(pad_axis(dist, 2 + i, left, right, "zeros"), 2 + dims + i, left, right, "zeros")
        m1 = pad_axis(m1, 1 + i, left, right, "zeros")
        m2 = pad_axis(m2, 1 + i, left, right, "zeros")
    inner = m1.new_ones(tuple(n - lo - hi for n, (lo, hi) in zip(m1.shape[1:], pads, strict=True)))
    for i, (left, right) in enumerate(pads):
        inner = pad_axis(inner, i, left, right, "zeros")
    pad_mask = 1.0 - inner  # 1 at padded positions, (*S_padded)
    ones = [1] * dims
    p_pad = pad_mask.reshape(1, 1, *pad_mask.shape, *ones)
    q_pad = pad_mask.reshape(1, 1, *ones, *pad_mask.shape)
    m1_p = m1.reshape(m1.shape[0], 1, *m1.shape[1:], *ones)
    m2_q = m2.reshape(1, m2.shape[0], *ones, *m2.shape[1:])
    return dist + p_pad * m2_q + q_pad * m1_p


def _as_image(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() not in (3, 4) or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(
            f"{name} must have shape (N, C, L) (1D) or (N, C, H, W) (2D) with N >= 1, got {got}; "
            "add a channel axis with x.unsqueeze(1)."
        )
    check_finite_input(x, name, "analytic_conv_ntk")
    return x


def _check(
    depth: int,
    filter_size: int | tuple[int, ...],
    activation: str,
    readout: str,
    padding: str,
    weight_std: float,
    bias_std: float,
    dims: int,
) -> tuple[int, ...]:
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}.")
    if readout not in CONV_READOUTS:
        raise ConfigError(f"readout must be one of {CONV_READOUTS}, got {readout!r}.")
    if padding not in CONV_PADDINGS:
        raise ConfigError(f"padding must be one of {CONV_PADDINGS}, got {padding!r}.")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ConfigError(f"depth (number of conv layers) must be an int >= 0, got {depth!r}.")
    if weight_std < 0 or bias_std < 0:
        raise ConfigError(f"weight_std and bias_std must be >= 0, got {weight_std}, {bias_std}.")
    fs = (filter_size,) * dims if isinstance(filter_size, int) else tuple(filter_size)
    if len(fs) != dims or min(fs) < 1:
        raise ConfigError(
            f"filter_size must be an int >= 1 or a tuple of {dims} ints >= 1 for {dims}D inputs, got {filter_size!r}."
        )
    return fs


def analytic_conv_ntk(
    x1: Tensor,
    x2: Tensor | None = None,
    depth: int = 1,
    filter_size: int | tuple[int, ...] = 3,
    activation: str = "relu",
    readout: str = "flatten",
    padding: str = "circular",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    dtype: torch.dtype | None = None,
    fast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Infinite-width ``(nngp, ntk)``, each (N1, N2), of ``[Conv, act] * depth`` + read-out + Dense (NTK param.).

    ``x1``: (N1, C, L) or (N1, C, H, W); ``x2`` likewise or None (= x1). Input covariance per position pair
    ``x_p . y_q / C``. Per conv layer (stride 1, ``filter_size`` k, fan-in C k): ``K(p, q) <- W^2 mean_k
    K~(p + k, q + k) + b^2``, ``Theta(p, q) <- K(p, q) + W^2 mean_k Theta~(p + k, q + k)``; per activation
    ``K~ = E[act(u) act(v)]``, ``Theta~ = Theta E[act'(u) act'(v)]``. Read-out ``"flatten"`` (Dense on
    the flattened map; only p = q survive: the local kernel) or ``"gap"`` (global average pooling; all
    pairs: the convolutional kernel of arXiv 2106.08619). ``padding``: "circular" (periodic, as in arXiv
    2106.08619), "same" (zeros) or "valid". Row blocks keep memory bounded; ``dtype`` e.g. float64.
    ``fast``: ReLU nets go through :func:`symgen.ntk.conv_fast.relu_conv_kernels` (the same values, tiles of
    pairs, x2 = None mirrored; not differentiable: inputs that require grad take the generic path); False
    keeps this generic path (the reference of the tests). ``x2`` given as the very tensor ``x1`` is taken as
    None: K(x, x) is symmetric, each pair is computed once.
    """
    if x2 is x1:
        x2 = None
    a = _as_image(x1, "x1")
    b = a if x2 is None else _as_image(x2, "x2")
    if a.shape[1:] != b.shape[1:]:
        raise ShapeError(
            f"x1 and x2 must have the same channels and spatial size, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    dims = a.dim() - 2
    fs = _check(depth, filter_size, activation, readout, padding, weight_std, bias_std, dims)
    if dtype is None:
        dtype = a.dtype if a.is_floating_point() else torch.get_default_dtype()
    # Layer 0 (the input covariances, their first filter mean and angle) in float64 whatever ``dtype``.
    a, b = a.to(torch.float64), b.to(torch.float64)
    w2, b2 = float(weight_std) ** 2, float(bias_std) ** 2
    pads = _pads(fs, padding)
    mode = "circular" if padding == "circular" else "zeros"
    chans = a.shape[1]

    def pre_variances(x: Tensor) -> list[Tensor]:  # pre-activation variances of each layer, (N, *S), float64
        out, v = [], (x * x).sum(1) / chans
        for _ in range(depth):
            v = w2 * filter_mean(v, [(1 + i,) for i in range(dims)], fs, pads, mode) + b2
            out.append(v)
            v = _act_var(v, activation)
        return out

    sizes = list(a.shape[2:])
    for _ in range(depth):  # the error filter_mean would raise, before any work
        sizes = [n + lo + hi - k + 1 for n, (lo, hi), k in zip(sizes, pads, fs, strict=True)]
        if min(sizes) < 1:
            raise ShapeError(
                f"filter size {fs} is larger than the (padded) input; use a smaller filter or "
                "padding='same'/'circular'."
            )
    grads = torch.is_grad_enabled() and (x1.requires_grad or (x2 is not None and x2.requires_grad))
    if activation == "relu" and depth >= 1 and fast and not grads:
        from symgen.ntk.conv_fast import relu_conv_kernels

        out = relu_conv_kernels(a, None if x2 is None else b, depth, fs, pads, mode, w2, b2, readout == "gap", dtype)
        return out[0].to(x1.device), out[1].to(x1.device)
    va64 = pre_variances(a)
    vb64 = va64 if x2 is None else pre_variances(b)
    va, vb = [v.to(dtype) for v in va64], [v.to(dtype) for v in vb64]
    full = readout == "gap"
    relu = activation == "relu"

    def block(rows: slice) -> tuple[Tensor, Tensor]:
        xa = a[rows]
        if full:  # (n1, n2, *S, *S): every pair of positions
            fa, fb = xa.flatten(2), b.flatten(2)
            k = torch.einsum("acp,bcq->abpq", fa, fb) / chans
            k = k.reshape(xa.shape[0], b.shape[0], *a.shape[2:], *b.shape[2:])
            groups: list[tuple[int, ...]] = [(2 + i, 2 + dims + i) for i in range(dims)]
        else:  # (n1, n2, *S): equal positions only
            k = torch.einsum("ac...,bc...->ab...", xa, b) / chans
            groups = [(2 + i,) for i in range(dims)]
        # E(u - v)^2 of the pre-activations (no bias): filter means keep it exact, and with the variances it
        # gives v1 v2 - c^2 without the cancellation of forming it from c (ReLU angles near x = x').
        dist = _input_distances(xa, b, full).reshape(k.shape) / chans if relu else k
        ntk: Tensor | None = None
        for layer in range(depth):
            k = w2 * filter_mean(k, groups, fs, pads, mode) + b2
            ntk = k if ntk is None else k + w2 * filter_mean(ntk, groups, fs, pads, mode)
            if activation == "identity":
                k, ntk = k.to(dtype), ntk.to(dtype)
                continue
            vs = (va64, vb64) if layer == 0 else (va, vb)
            v1, v2 = vs[0][layer][rows][:, None], vs[1][layer][None]
            if full:
                v1 = v1.reshape(*v1.shape, *([1] * dims))
                v2 = v2.reshape(1, v2.shape[1], *([1] * dims), *v2.shape[2:])
            if not relu:
                k, dot = duals.erf_dual(v1, v2, k)
                k, ntk = k.to(dtype), (ntk * dot).to(dtype)
                continue
            if full and mode == "zeros":  # a zero pixel against a real one: E(u - 0)^2, not 0
                m1 = (a * a).sum(1) / chans if layer == 0 else va64[layer - 1] / 2.0
                m2 = (b * b).sum(1) / chans if layer == 0 else vb64[layer - 1] / 2.0
                dist = _pad_distances(dist, m1[rows].to(dist.dtype), m2.to(dist.dtype), pads)
                dist = w2 * filter_mean(dist, groups, fs, [(0, 0)] * dims, mode)
            else:
                dist = w2 * filter_mean(dist, groups, fs, pads, mode)
            det = (dist * (2.0 * (v1 + v2) - dist) - (v1 - v2) ** 2) / 4.0
            s = duals.safe_sqrt(det.to(dtype))
            k, ntk, v1, v2 = k.to(dtype), ntk.to(dtype), v1.to(dtype), v2.to(dtype)
            r1, r2 = duals.safe_sqrt(v1), duals.safe_sqrt(v2)
            nj1, phi, gap = duals.relu_dual(k, s, r1 * r2, signed=layer == 0, gap=layer < depth - 1)
            k, ntk = nj1 / (2.0 * math.pi), ntk * phi / (2.0 * math.pi)
            if gap is not None:  # E(relu(u) - relu(v))^2 = (sqrt v1 - sqrt v2)^2 / 2 + n - n J1 / pi
                dist = 0.5 * (r1 - r2) ** 2 + gap
        if ntk is None:  # depth 0: the read-out of the inputs
            k = k.to(dtype)
            ntk = torch.zeros_like(k)
        red = tuple(range(2, k.dim()))
        k_out = w2 * k.mean(red) + b2 if red else w2 * k + b2
        return k_out, k_out + w2 * (ntk.mean(red) if red else ntk)

    per_row = b.shape[0] * math.prod(a.shape[2:]) ** (2 if full else 1)
    step = max(1, _BLOCK_ENTRIES // max(1, per_row))
    if step >= a.shape[0]:
        return block(slice(None))
    parts = [block(slice(i, i + step)) for i in range(0, a.shape[0], step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class NTKConv(nn.Module):
    """Stride-1 convolution in NTK parameterization: ``y = (weight_std / sqrt(C_in k)) W * x + bias_std b``.

    W, b ~ N(0, 1) from ``generator`` (None: the global one, as torch.nn). ``padding``: "circular", "same"
    (zeros; left = (k-1)//2) or "valid". ``dims``: 1 (inputs (N, C, L)) or 2 (inputs (N, C, H, W)). Its
    infinite-width kernels are :func:`analytic_conv_ntk`'s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filter_size: int | tuple[int, ...],
        dims: int = 1,
        padding: str = "circular",
        weight_std: float = 1.0,
        bias_std: float = 0.0,
        *,
        generator: Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ConfigError(f"dims must be 1 or 2, got {dims!r}.")
        if in_channels < 1 or out_channels < 1:
            raise ConfigError(f"NTKConv needs in_channels, out_channels >= 1, got {in_channels}, {out_channels}.")
        self.filter_size = _check(1, filter_size, "relu", "flatten", padding, weight_std, bias_std, dims)
        self.dims, self.padding = dims, padding
        self.weight_std, self.bias_std = float(weight_std), float(bias_std)
        self.scale = self.weight_std / math.sqrt(in_channels * math.prod(self.filter_size))
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.filter_size, device=device, dtype=dtype)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if self.bias_std != 0.0 else None
        )
        g = init_generator(generator)
        with torch.no_grad():
            for p in (self.weight, self.bias):
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype, device=g.device))

    def forward(self, x: Tensor) -> Tensor:
        """y = (weight_std / sqrt(C k)) conv(pad(x), W) + bias_std b (NTK parameterization, stride 1).

        Args:
            x: inputs (N, C, L) or (N, C, H, W).

        Returns:
            outputs with the same spatial size under "same"/"circular" padding.
        """
        for i, (left, right) in enumerate(_pads(self.filter_size, self.padding)):
            x = pad_axis(x, 2 + i, left, right, "circular" if self.padding == "circular" else "zeros")
        conv = F.conv1d if self.dims == 1 else F.conv2d
        y = conv(x, self.weight) * self.scale
        if self.bias is not None:
            y = y + (self.bias * self.bias_std).reshape(-1, *([1] * self.dims))
        return y


def ntk_cnn(
    input_shape: tuple[int, ...],
    width: int,
    depth: int = 1,
    filter_size: int | tuple[int, ...] = 3,
    out_features: int = 1,
    activation: str = "relu",
    readout: str = "flatten",
    padding: str = "circular",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    *,
    generator: Seed = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """The finite net ``[NTKConv, act] * depth``, read-out (flatten or global average pool), ``NTKLinear``.

    ``input_shape``: (C, L) or (C, H, W) without the batch axis. As ``width`` (channels) -> inf its kernels
    are :func:`analytic_conv_ntk` with the same arguments. Randomness: ``generator`` shared by the layers.
    """
    if len(input_shape) not in (2, 3):
        raise ConfigError(f"input_shape must be (C, L) or (C, H, W), got {tuple(input_shape)}.")
    if width < 1:
        raise ConfigError(f"ntk_cnn needs width >= 1, got {width}.")
    dims = len(input_shape) - 1
    fs = _check(depth, filter_size, activation, readout, padding, weight_std, bias_std, dims)
    generator = init_generator(generator)
    layers: list[nn.Module] = []
    chans, spatial = input_shape[0], list(input_shape[1:])
    for _ in range(depth):
        layers.append(NTKConv(chans, width, fs, dims, padding, weight_std, bias_std, generator=generator, dtype=dtype))
        layers.append({"relu": nn.ReLU, "erf": Erf, "identity": nn.Identity}[activation]())
        chans = width
        if padding == "valid":
            spatial = [s - k + 1 for s, k in zip(spatial, fs, strict=True)]
            if min(spatial) < 1:
                raise ConfigError(
                    f"filter size {fs} with padding='valid' leaves no positions after {depth} layers "
                    f"on input {tuple(input_shape)}."
                )
    if readout == "gap":
        layers += [nn.Flatten(2), _Mean()]
        features = chans
    else:
        layers.append(nn.Flatten())
        features = chans * math.prod(spatial)
    layers.append(NTKLinear(features, out_features, weight_std, bias_std, generator=generator, dtype=dtype))
    return nn.Sequential(*layers).to(device=device)


class _Mean(nn.Module):
    """Global average pooling over the flattened positions: (N, C, P) -> (N, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(-1)

"""Scale symmetries: the result types, and the tables that sort layers and functions by how they
treat a positive rescaling of the filters feeding them (arXiv 1511.01029)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from symgen.errors import ShapeError

__all__ = ["RunningStatLink", "ScaleSymmetry", "ScaleSymmetryReport", "NORMALIZATION_LAYERS", "filter_axis"]

# ---------------------------------------------------------------------------------------------
# Function classes: how a layer or function treats a positive rescaling of its input's channels

BATCH_NORMS: tuple[type[nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
INSTANCE_NORMS: tuple[type[nn.InstanceNorm1d | nn.InstanceNorm2d | nn.InstanceNorm3d], ...] = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
RMS_NORMS: tuple[type[nn.RMSNorm], ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
NORMALIZATION_LAYERS: tuple[
    type[
        nn.BatchNorm1d
        | nn.BatchNorm2d
        | nn.BatchNorm3d
        | nn.SyncBatchNorm
        | nn.InstanceNorm1d
        | nn.InstanceNorm2d
        | nn.InstanceNorm3d
        | nn.LayerNorm
        | nn.GroupNorm
        | nn.RMSNorm
    ],
    ...,
] = BATCH_NORMS + INSTANCE_NORMS + (nn.LayerNorm, nn.GroupNorm) + RMS_NORMS

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
SOURCES: tuple[type[nn.Module], ...] = (nn.Linear,) + _CONVS + _CONV_TRANSPOSES

# Positively homogeneous but not affine: f(a z) = a f(z) for a > 0, f(z + b) != f(z) + b.
HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
# Copy or convexly average values within a channel: commute with per-channel scaling and shifts.
MOVEMENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
)
BREAKING_MODULES: tuple[type[nn.Module], ...] = SOURCES + (
    nn.Bilinear,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.GLU,
    nn.Tanhshrink,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Embedding,
)

HOMOGENEOUS_FUNCS = {
    "relu",
    "relu_",
    "leaky_relu",
    "leaky_relu_",
    "prelu",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "feature_dropout",
}
SCALE_FUNCS = {"neg", "clone", "detach", "contiguous", "float", "double", "half", "bfloat16", "to", "type_as"}
MOVEMENT_FUNCS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "repeat",
    "getitem",
    "narrow",
    "select",
    "flip",
    "roll",
    "movedim",
    "swapaxes",
    "view_as",
    "reshape_as",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "pixel_shuffle",
    "pixel_unshuffle",
    "interpolate",
    "upsample",
    "channel_shuffle",
}
BREAKING_FUNCS = {
    "gelu",
    "sigmoid",
    "tanh",
    "silu",
    "elu",
    "celu",
    "selu",
    "softplus",
    "softmax",
    "log_softmax",
    "hardtanh",
    "relu6",
    "mish",
    "hardswish",
    "hardsigmoid",
    "glu",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "pow",
    "sin",
    "cos",
    "abs",
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "matmul",
    "mm",
    "bmm",
    "square",
    "reciprocal",
}
METADATA_FUNCS = {"size", "dim", "numel", "getattr", "shape", "dtype", "device", "ndimension"}


# ---------------------------------------------------------------------------------------------
# Result types


@dataclass(frozen=True)
class RunningStatLink:
    """How a normalization layer's running statistics follow a filter rescaling (eval mode).

    Channel j of the layer sees ``gain_j * (source channel label_j) + shift_j``, so rescaling the
    filter by a maps ``running_mean -> a (running_mean - shift) + shift``, ``running_var -> a^2
    running_var`` with ``shift = const_j + gain_j * bias[label_j]`` (the bias term only when the
    bias is cancelled, i.e. not rescaled with its filter).
    """

    norm: str
    labels: tuple[int, ...]
    gains: tuple[float, ...]
    consts: tuple[float, ...]


@dataclass
class ScaleSymmetry:
    """Blocks of filters of ``weight`` that can each be rescaled by any a > 0 without changing the model.

    ``f(W_B -> a_B W_B (and b_B -> a_B b_B if ``bias`` is set)) = f(W)`` for every block B
    (arXiv 1511.01029). ``axis`` indexes filters (output channels) in the weight; ``kind`` is
    ``per_filter`` (every filter alone: BatchNorm), ``per_group`` (GroupNorm) or ``joint`` (one
    factor for all filters: LayerNorm). ``bias`` is the bias that must be scaled with its filter;
    ``redundant_bias`` the one the normalization cancels (any value gives the same function in
    train mode). ``check`` holds the numeric confirmation (relative output changes).
    """

    module: str
    weight: str
    axis: int
    kind: str
    blocks: tuple[tuple[int, ...], ...]
    bias: str | None
    redundant_bias: str | None
    normalizers: tuple[str, ...]
    paths: tuple[str, ...]
    stat_links: tuple[RunningStatLink, ...] = ()
    check: dict[str, float] = field(default_factory=dict)

    @property
    def num_filters(self) -> int:
        """The number of filters of the weight (its size along ``axis``)."""
        return sum(len(b) for b in self.blocks)

    @property
    def num_blocks(self) -> int:
        """The number of blocks, each rescaled by one factor."""
        return len(self.blocks)

    @property
    def members(self) -> tuple[str, ...]:
        """Parameters rescaled by the symmetry: the weight, and the bias when it is not cancelled."""
        return (self.weight,) + ((self.bias,) if self.bias else ())

    def channel_block(self, device: torch.device | str | None = None) -> Tensor:
        """Block index of every filter.

        Args:
            device: where the result goes (default CPU).

        Returns:
            ``(num_filters,)`` long tensor.
        """
        idx = torch.empty(self.num_filters, dtype=torch.long)
        for k, block in enumerate(self.blocks):
            idx[list(block)] = k
        return idx.to(device) if device is not None else idx

    def to_dict(self) -> dict[str, Any]:
        """The symmetry as plain JSON-ready values.

        Returns:
            The dict.
        """
        return {
            "module": self.module,
            "weight": self.weight,
            "axis": self.axis,
            "kind": self.kind,
            "num_filters": self.num_filters,
            "num_blocks": self.num_blocks,
            "bias_scaled_with_filter": self.bias,
            "redundant_bias": self.redundant_bias,
            "normalizers": list(self.normalizers),
            "paths": list(self.paths),
            "check": dict(self.check),
        }


@dataclass
class ScaleSymmetryReport:
    """What :func:`find_scale_symmetries` found, and what it could not decide.

    Every parameter of the model is in exactly one place: a confirmed symmetry (its weight or
    the bias scaled with it), ``redundant_biases``, ``not_invariant`` (analysed, no scale
    symmetry, with the reason), ``unanalysed`` (a candidate the analysis could not decide, with
    the reason), ``rejected`` (the graph predicted a symmetry the numeric check did not confirm)
    or ``not_candidates`` (not a linear / convolution weight or bias; not analysed).
    """

    symmetries: list[ScaleSymmetry]
    redundant_biases: dict[str, str]
    not_invariant: dict[str, str]
    unanalysed: dict[str, str]
    rejected: dict[str, str]
    not_candidates: dict[str, str]
    method: str
    notes: list[str]

    def parameters(self) -> list[str]:
        """Names of all parameters rescaled by some symmetry (weights and scaled biases).

        Returns:
            The names.
        """
        return [n for s in self.symmetries for n in s.members]

    def get(self, name: str) -> ScaleSymmetry | None:
        """The symmetry whose weight (or scaled bias) is ``name``.

        Args:
            name: a parameter name.

        Returns:
            The symmetry, or None.
        """
        for s in self.symmetries:
            if name in s.members:
                return s
        return None

    def reason(self, name: str) -> str:
        """Why ``name`` is or is not part of a symmetry.

        Args:
            name: a parameter name.

        Returns:
            One line.
        """
        s = self.get(name)
        if s is not None:
            return f"{s.kind} scale symmetry through {', '.join(s.normalizers)}"
        for label, table in (
            ("redundant bias", self.redundant_biases),
            ("not scale-invariant", self.not_invariant),
            ("not analysed", self.unanalysed),
            ("rejected by the numeric check", self.rejected),
            ("not a candidate", self.not_candidates),
        ):
            if name in table:
                return f"{label}: {table[name]}"
        return "not a parameter of the analysed model"

    def summary(self) -> str:
        """A plain-text table of the findings.

        Returns:
            The text.
        """
        lines = [f"scale symmetries ({self.method}):"]
        for s in self.symmetries:
            extra = f", bias {s.bias} scaled with it" if s.bias else ""
            extra += f", redundant bias {s.redundant_bias}" if s.redundant_bias else ""
            lines.append(
                f"  {s.weight}: {s.kind}, {s.num_blocks} block(s) of {s.num_filters} "
                f"filters (axis {s.axis}) via {' | '.join(s.paths)}{extra}"
            )
        for title, table in (
            ("not scale-invariant", self.not_invariant),
            ("could not be analysed", self.unanalysed),
            ("rejected by numeric check", self.rejected),
        ):
            if table:
                lines.append(f"{title}:")
                lines += [f"  {k}: {v}" for k, v in table.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values.

        Returns:
            The dict.
        """
        return {
            "method": self.method,
            "symmetries": [s.to_dict() for s in self.symmetries],
            "redundant_biases": dict(self.redundant_biases),
            "not_invariant": dict(self.not_invariant),
            "unanalysed": dict(self.unanalysed),
            "rejected": dict(self.rejected),
            "not_candidates": dict(self.not_candidates),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# Filter axes


def filter_axis(module: nn.Module) -> int | None:
    """Axis of the weight that indexes output filters.

    Args:
        module: a layer.

    Returns:
        The axis, or None when not a supported layer.
    """
    if isinstance(module, nn.Linear) or isinstance(module, _CONVS):
        return 0
    if isinstance(module, _CONV_TRANSPOSES):
        return 1 if module.groups == 1 else None
    return None


def source_weight(module: nn.Module) -> Tensor:
    """The ``weight`` of a linear / convolution layer.

    Args:
        module: a layer of ``SOURCES``.

    Returns:
        its weight tensor.
    """
    weight = module.weight
    if not isinstance(weight, Tensor):  # pragma: no cover - every source layer has a weight tensor
        raise ShapeError(f"{type(module).__name__}.weight is not a tensor.")
    return weight


def along_axis(vec: Tensor, axis: int, ndim: int) -> Tensor:
    """``vec`` reshaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return vec.reshape(shape)

"""Unit-norm SGD: Riemannian SGD on the product of unit spheres for scale-invariant filters."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import torch
from torch import Tensor, nn

from symgen.errors import ConfigError, DivergenceError
from symgen.functional import buffers_of, params_of
from symgen.optim.amp import GradScaler, ScaledStep
from symgen.optim.wrapper import StepSnapshot, all_finite, call_closure, divergence, model_of
from symgen.rng import Seed
from symgen.symmetry import ScaleSymmetry, ScaleSymmetryReport, block_norms, find_scale_symmetries, rescale_filters

__all__ = ["UnitNormSGD"]

LossT = TypeVar("LossT", Tensor, float)


@dataclass
class _Sphere:
    """One scale symmetry as the optimizer sees it: the tensors on the product of spheres."""

    symmetry: ScaleSymmetry
    weight: Tensor
    bias: Tensor | None
    block: Tensor  # (C,) block index of every filter


def _rows(t: Tensor, axis: int) -> Tensor:
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def _unrows(rows: Tensor, like: Tensor, axis: int) -> Tensor:
    moved = list(like.movedim(axis, 0).shape)
    return rows.reshape(moved).movedim(0, axis)


class UnitNormSGD(torch.optim.Optimizer):
    """Riemannian SGD on the unit sphere of every scale-invariant filter block; plain SGD for the rest.

    Per block w (unit norm): g_R = g - (w.g) w, d = g_R (+ momentum), w <- (w - lr d) / ||w - lr d||
    (Badrinarayanan, Mishra, Cipolla, arXiv 1511.01029).

    ``params``: the model (``nn.Module``) or, as for any optimizer, parameters / parameter groups.
    ``filters``: ``"auto"`` finds the scale symmetries with
    :func:`symgen.symmetry.find_scale_symmetries` (needs the module and ``example_input``, a
    batch; ``generator``, a seed or ``torch.Generator``, ``None`` = seed 0, drives its random
    check); a list of parameter names (each must be part of a detected symmetry, else
    :class:`ConfigError`) or of :class:`ScaleSymmetry`; a :class:`ScaleSymmetryReport`; or ``None``
    for none. Filters are normalized at construction (running statistics that already hold
    estimates are rescaled to match, so the model's function is unchanged in train and eval mode).
    ``lr`` is an angular step for sphere blocks and an ordinary step for the other parameters.
    The momentum buffer of a block is re-projected onto the tangent space of the current point
    before each update (transport by projection). ``weight_decay`` acts on the plain parameters
    only: on a sphere its gradient ``lambda w`` is radial and projects to zero. Other parameters
    follow ``torch.optim.SGD`` (dampening 0, no Nesterov) exactly. With ``filters="auto"`` and
    nothing detected, a warning is issued and every parameter takes plain SGD steps.

    A non-finite loss, gradient or update raises :class:`~symgen.errors.DivergenceError` with parameters,
    optimizer state and BatchNorm statistics (of the model given, or a LossClosure's) as before the step.

    Args:
        params: the model, or parameters / parameter groups.
        lr: the step size (angular on the spheres).
        momentum: heavy-ball momentum in [0, 1).
        weight_decay: L2 penalty on the plain parameters.
        filters: which filters live on spheres (see above).
        example_input: a batch of inputs, to detect or check the symmetries.
        generator: a seed or ``torch.Generator`` for the symmetry check (None: seed 0).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        filters: str | Sequence[str | ScaleSymmetry] | ScaleSymmetryReport | None = "auto",
        *,
        example_input: Any = None,
        generator: Seed = None,
    ) -> None:
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"UnitNormSGD: lr must be a positive number, got {lr!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"UnitNormSGD: momentum must be in [0, 1), got {momentum!r}.")
        if weight_decay < 0:
            raise ConfigError(f"UnitNormSGD: weight_decay must be >= 0, got {weight_decay!r}.")
        if isinstance(params, nn.Module):
            model: nn.Module | None = params
            param_list: list[Any] = [p for p in params.parameters() if p.requires_grad]
        else:
            model, param_list = None, list(params)
        super().__init__(param_list, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.model = model
        self.num_steps = 0
        symmetries = self._resolve(model, filters, example_input, generator)
        self.spheres: list[_Sphere] = []
        if model is not None and symmetries:
            self._attach(model, symmetries)

    # -- construction ---------------------------------------------------------------------

    @staticmethod
    def _resolve(model: nn.Module | None, filters: Any, example_input: Any, generator: Seed) -> list[ScaleSymmetry]:
        if filters is None or (isinstance(filters, (list, tuple)) and len(filters) == 0):
            return []
        if isinstance(filters, str):
            if filters != "auto":
                raise ConfigError(
                    f"UnitNormSGD: filters must be 'auto', a list of parameter names, "
                    f"a list of ScaleSymmetry, a ScaleSymmetryReport or None; got "
                    f"'{filters}'."
                )
            if model is None:
                warnings.warn(
                    "UnitNormSGD(filters='auto') was given parameters, not the module, so "
                    "it cannot detect scale symmetries: every parameter takes plain SGD "
                    "steps. Pass the nn.Module and example_input=<a batch>.",
                    UserWarning,
                    stacklevel=3,
                )
                return []
            if example_input is None:
                raise ConfigError(
                    "UnitNormSGD(filters='auto') needs example_input=<a batch of "
                    "inputs> to trace the model and confirm its symmetries; pass it, "
                    "or pass filters=find_scale_symmetries(model, x)."
                )
            report = find_scale_symmetries(model, example_input, generator=generator)
            if not report.symmetries:
                why = "; ".join(
                    f"{k}: {v}"
                    for k, v in list(report.not_invariant.items())[:3]
                    + list(report.unanalysed.items())[:3]
                    + list(report.rejected.items())[:3]
                )
                warnings.warn(
                    f"UnitNormSGD(filters='auto') found no scale-invariant filters in "
                    f"{type(model).__name__} ({why or 'no linear/convolution weights'}); "
                    "every parameter takes plain SGD steps.",
                    UserWarning,
                    stacklevel=3,
                )
            return list(report.symmetries)
        if isinstance(filters, ScaleSymmetryReport):
            if model is None:
                raise ConfigError(
                    "UnitNormSGD: a ScaleSymmetryReport names parameters of a module; "
                    "pass the nn.Module as the first argument."
                )
            return list(filters.symmetries)
        if isinstance(filters, (list, tuple)):
            out: list[ScaleSymmetry] = [f for f in filters if isinstance(f, ScaleSymmetry)]
            names = [f for f in filters if isinstance(f, str)]
            bad = [f for f in filters if not isinstance(f, (str, ScaleSymmetry))]
            if bad:
                raise ConfigError(
                    f"UnitNormSGD: filters list items must be parameter names or "
                    f"ScaleSymmetry; got {type(bad[0]).__name__}."
                )
            if (names or out) and model is None:
                raise ConfigError(
                    "UnitNormSGD: an explicit filters list names parameters of a "
                    "module; pass the nn.Module as the first argument."
                )
            if names:
                known = dict(model.named_parameters())  # type: ignore[union-attr]
                missing = [n for n in names if n not in known]
                if missing:
                    raise ConfigError(
                        f"UnitNormSGD: no parameter named {missing[0]!r}; the model's parameters are {sorted(known)}."
                    )
                if example_input is None:
                    raise ConfigError(
                        "UnitNormSGD: an explicit filters list is checked for scale "
                        "invariance; pass example_input=<a batch of inputs>."
                    )
                report = find_scale_symmetries(model, example_input, generator=generator)  # type: ignore[arg-type]
                for n in names:
                    sym = report.get(n)
                    if sym is None:
                        inv = report.parameters() or ["none"]
                        raise ConfigError(
                            f"UnitNormSGD: parameter {n!r} is not scale-invariant ({report.reason(n)}), "
                            f"so it cannot be kept on a unit sphere. Scale-invariant parameters of "
                            f"this model: {', '.join(inv)}. Remove it from filters or use "
                            "filters='auto'."
                        )
                    if all(s.weight != sym.weight for s in out):
                        out.append(sym)
            return out
        raise ConfigError(f"UnitNormSGD: unsupported filters value of type {type(filters).__name__}.")

    def _attach(self, model: nn.Module, symmetries: list[ScaleSymmetry]) -> None:
        named = dict(model.named_parameters())
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        taken: set[str] = set()
        for sym in symmetries:
            for name in sym.members:
                if name not in named:
                    raise ConfigError(
                        f"UnitNormSGD: symmetry names parameter {name!r}, which this "
                        f"model does not have; detect symmetries on this model."
                    )
                if name in taken:
                    raise ConfigError(f"UnitNormSGD: parameter {name!r} appears in two symmetries.")
                taken.add(name)
            w = named[sym.weight]
            if not any(named[n].requires_grad for n in sym.members):
                continue  # frozen filters are not optimized at all
            if w.dim() <= sym.axis or w.shape[sym.axis] != sym.num_filters:
                raise ConfigError(
                    f"UnitNormSGD: {sym.weight} has shape {tuple(w.shape)}, the "
                    f"symmetry expects {sym.num_filters} filters on axis {sym.axis}."
                )
            groups = {group_of.get(id(named[n])) for n in sym.members}
            if None in groups or len(groups) != 1:
                raise ConfigError(
                    f"UnitNormSGD: {', '.join(sym.members)} must all be optimized and in the same parameter group."
                )
            b = named[sym.bias] if sym.bias else None
            self.spheres.append(_Sphere(sym, w, b, sym.channel_block(w.device)))
        self._normalize(model)

    @torch.no_grad()
    def _normalize(self, model: nn.Module) -> None:
        # detached views share storage with the model: copy_ below writes the model itself
        params = params_of(model, requires_grad_only=False)
        buffers = buffers_of(model)
        for sphere in self.spheres:
            sym = sphere.symmetry
            norms = block_norms(params, sym)
            if not bool((norms > 0).all()):
                raise ConfigError(
                    f"UnitNormSGD: a block of filters of {sym.weight} has zero norm, "
                    f"so it has no direction on the sphere; initialize it with nonzero "
                    f"values."
                )
            # Running statistics are rescaled only where they already hold estimates.
            live = {
                k: v
                for k, v in buffers.items()
                if not any(
                    k.startswith(f"{link.norm}.running_")
                    and int(buffers.get(f"{link.norm}.num_batches_tracked", torch.ones(()))) == 0
                    for link in sym.stat_links
                )
            }
            new_p, new_b = rescale_filters(params, live, sym, 1.0 / norms)
            for name in sym.members:
                params[name].copy_(new_p[name])
            for k, v in new_b.items():
                if v is not buffers[k]:
                    buffers[k].copy_(v)

    # -- the update -----------------------------------------------------------------------

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise ConfigError("UnitNormSGD: a sphere parameter is no longer in any parameter group.")

    _step_supports_amp_scaling = True  # scaler.step(optimizer) calls step() itself; see symgen.optim.amp

    @overload
    def step(self, closure: None = None, scaler: GradScaler | None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], LossT], scaler: GradScaler | None = None) -> LossT: ...

    def step(self, closure: Callable[[], LossT] | None = None, scaler: GradScaler | None = None) -> LossT | None:
        """One update: Riemannian step with retraction on sphere blocks, SGD elsewhere.

        Mixed precision: ``scaler.step(optimizer)`` after ``scaler.scale(loss).backward()`` (the usual
        GradScaler pattern), or ``optimizer.step(closure, scaler=scaler)``; an inf/NaN step is skipped.

        Args:
            closure: optional; zeroes gradients, computes the loss, calls ``backward``, returns the loss.
            scaler: a ``torch.amp.GradScaler`` for mixed precision, or None.

        Returns:
            The closure's loss (None without a closure).
        """
        amp = ScaledStep(self, scaler, closure)
        snapshot = StepSnapshot(self, model_of(self.model, closure))
        try:
            with torch.no_grad():
                return self._guarded_step(closure, amp, snapshot)
        except BaseException:
            snapshot.restore()
            raise

    def _guarded_step(
        self, closure: Callable[[], LossT] | None, amp: ScaledStep, snapshot: StepSnapshot
    ) -> LossT | None:
        def fail(what: str) -> DivergenceError:
            return divergence("UnitNormSGD", self.num_steps + 1, what, "lower the learning rate, or check the data")

        loss = None if closure is None else call_closure(closure, "UnitNormSGD", self.num_steps + 1)
        loss_finite = loss is None or bool(torch.isfinite(torch.as_tensor(loss)).all())
        if amp.active:
            if not loss_finite or (not amp.from_scaler and not amp.grads_finite()):
                amp.skip()
                return loss
            if not amp.finish():
                self.zero_grad(set_to_none=True)
                return loss
        elif not loss_finite:
            raise fail(f"loss {float(torch.as_tensor(loss).sum())}")
        if not all_finite(p.grad for g in self.param_groups for p in g["params"]):
            raise fail("gradient")
        if not snapshot.finite()[1]:
            raise fail("BatchNorm running statistics after the closure's pass")
        snapshot.save_state()
        self._update()
        if not snapshot.finite()[0]:
            raise fail("update: the parameters after the step")
        self.num_steps += 1
        return loss

    def _update(self) -> None:
        on_sphere = {id(s.weight) for s in self.spheres} | {id(s.bias) for s in self.spheres if s.bias is not None}
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or id(p) in on_sphere:
                    continue
                d_p = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf.mul_(momentum).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-lr)
        for sphere in self.spheres:
            self._sphere_step(sphere)

    def _sphere_step(self, sphere: _Sphere) -> None:
        w_t, b_t, axis = sphere.weight, sphere.bias, sphere.symmetry.axis
        if w_t.grad is None and (b_t is None or b_t.grad is None):
            return
        group = self._group_of(w_t)
        lr, momentum = group["lr"], group["momentum"]
        nb = sphere.symmetry.num_blocks
        block = sphere.block.to(w_t.device)

        one_per_row = nb == block.numel()  # one filter per block (BatchNorm): block sums are the row sums

        def per_block(v: Tensor) -> Tensor:  # (C,) row sums -> block sums, back on every row
            if one_per_row:
                return v
            return torch.zeros(nb, dtype=v.dtype, device=v.device).index_add(0, block, v)[block]

        def cat(wt: Tensor, bt: Tensor | None) -> Tensor:
            r = _rows(wt, axis)
            return torch.cat([r, bt.reshape(-1, 1)], dim=1) if bt is not None else r

        zeros_b = None if b_t is None else (b_t.grad if b_t.grad is not None else torch.zeros_like(b_t))
        w = cat(w_t, b_t)
        g = cat(w_t.grad if w_t.grad is not None else torch.zeros_like(w_t), zeros_b)
        if w.dtype in (torch.float16, torch.bfloat16):  # norms and retraction in float32: no drift off the sphere
            w, g = w.float(), g.float()
        w = w / per_block(w.pow(2).sum(1)).sqrt().unsqueeze(1)
        g_r = g - per_block((w * g).sum(1)).unsqueeze(1) * w
        d = g_r
        if momentum != 0:
            state_w = self.state[w_t]
            buf_w = state_w.get("momentum_buffer")
            if buf_w is None:
                buf = g_r.clone()
            else:
                state_b = self.state[b_t] if b_t is not None else {}
                buf = cat(buf_w, state_b.get("momentum_buffer") if b_t is not None else None)
                buf = buf - per_block((w * buf).sum(1)).unsqueeze(1) * w  # transport by projection
                buf = momentum * buf + g_r
            k = _rows(w_t, axis).shape[1]
            state_w["momentum_buffer"] = _unrows(buf[:, :k], w_t, axis).clone()
            if b_t is not None:
                self.state[b_t]["momentum_buffer"] = buf[:, k].reshape(b_t.shape).clone()
            d = buf
        new = w - lr * d
        new = new / per_block(new.pow(2).sum(1)).sqrt().unsqueeze(1)
        k = _rows(w_t, axis).shape[1]
        w_t.copy_(_unrows(new[:, :k], w_t, axis))
        if b_t is not None:
            b_t.copy_(new[:, k].reshape(b_t.shape))

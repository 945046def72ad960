"""Vectorized deep ensembles: M members with stacked parameters, trained together under ``vmap``.

Ensemble prediction = mean of member logits, f_bar(x) = M^-1 sum_m f(x; w_m); with data augmentation
and a group-compatible architecture f_bar is equivariant as M -> infinity (Nordenfors & Flinth,
arXiv 2410.01452; Gerken & Kessel, arXiv 2403.03103). Each member has its own seeded init, data
order and augmentation draws, identical to what a loop training the members one by one would use.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from symgen import distributed as sd
from symgen import functional as sf
from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.groups import GroupAction
from symgen.rng import Seed, as_generator, derive, seed_of

__all__ = [
    "Ensemble",
    "member_generator",
    "epoch_plan",
    "train_ensemble",
    "sub_ensemble_metrics",
    "infinite_ensemble_deviation",
]


class Ensemble:
    """M copies of one architecture with stacked parameters ``params[name]: (M, *shape)``.

    ``member_logits(x)``: (M, B, K) in one vmapped call; ``ensemble(x)``: the mean over members.
    ``parameters()``: the stacked tensors as leaves for an optimizer (elementwise optimizers such as
    SGD or Adam then update each member independently).

    Sharded across ranks (``Ensemble.init(..., process_group=...)``): this process holds only its members
    (``member_ids``, a contiguous share of all ``total_members``); ``gathered_member_logits(x)`` and
    ``gathered()`` collect every rank's members, in member order.

    Args:
        module: the architecture (a template; calls use the stacked parameters).
        params: stacked parameters, name -> (M, *shape).
        buffers: stacked buffers, name -> (M, *shape).
        member_ids: member m's global index (it seeds init and training randomness); default 0..M-1.
        process_group: the group the members are sharded over (``symgen.distributed.resolve_group``).
    """

    def __init__(
        self,
        module: nn.Module,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor] | None = None,
        member_ids: Sequence[int] | None = None,
        process_group: sd.GroupSpec = "auto",
    ) -> None:
        self.process_group = sd.resolve_group(process_group)
        self.module = module
        self.params = {k: v for k, v in params.items()}
        self.buffers_ = {k: v for k, v in (buffers or {}).items()}
        m = sf.stacked_size(self.params)
        self.member_ids = list(range(m)) if member_ids is None else [int(i) for i in member_ids]
        if len(self.member_ids) != m:
            raise ShapeError(f"member_ids has {len(self.member_ids)} entries for {m} members.")

    @classmethod
    def init(
        cls,
        factory: Callable[[], nn.Module],
        num_members: int,
        generator: Seed = None,
        first_member: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        process_group: sd.GroupSpec = "auto",
    ) -> Ensemble:
        """Members ``first_member .. first_member + num_members - 1``, member i built under the seed ``s + i``.

        Args:
            factory: builds one member.
            num_members: the number of members (over all ranks).
            generator: s = ``rng.seed_of(generator)`` (an int seed is s itself; None = 0).
            first_member: the global id of the first member.
            device: where the members go.
            dtype: their floating dtype.
            process_group: "auto", None or a ``ProcessGroup``: split the members by rank (``distributed.shard_range``);
                each keeps its global id, so its init and training randomness are those of the one-process ensemble.

        Returns:
            The ensemble (this rank's members).
        """
        if num_members < 1:
            raise ConfigError(f"an ensemble needs num_members >= 1; got {num_members}.")
        group = sd.resolve_group(process_group)
        shard = sd.shard_range(num_members, group)
        if len(shard) == 0:
            raise ConfigError(
                f"{num_members} members cannot be split over {sd.world_size(group)} ranks (a rank "
                "would hold none); use at least as many members as ranks."
            )
        seed = seed_of(generator)
        module, params, buffers = sf.stacked_init(
            factory, len(shard), generator=seed + first_member + shard.start, device=device, dtype=dtype
        )
        ids = range(first_member + shard.start, first_member + shard.stop)
        ens = cls(module, params, buffers, ids, process_group=group)
        return ens

    @property
    def total_members(self) -> int:
        """Members on all ranks together (``num_members`` without a process group; a collective: every rank calls it)."""
        return int(sd.all_reduce_sum(torch.tensor([self.num_members]), self.process_group)[0])

    def gathered_member_logits(self, x: Tensor, chunk_size: int | None = None) -> Tensor:
        """Outputs of the members of every rank, in member order (a collective: every rank calls it).

        Args:
            x: the input batch.
            chunk_size: members per ``vmap`` chunk (None: all at once).

        Returns:
            (total M, B, ...).
        """
        return sd.all_gather_rows(self.member_logits(x, chunk_size), self.process_group)

    def gathered(self) -> Ensemble:
        """The whole ensemble on this process: every rank's members gathered (a copy; no process group).

        Returns:
            The gathered :class:`Ensemble`.
        """
        gather = lambda t: sd.all_gather_rows(t.detach().contiguous(), self.process_group)  # noqa: E731
        ids = gather(torch.tensor(self.member_ids, dtype=torch.int64)).tolist()
        params = {k: gather(v).clone() for k, v in self.params.items()}
        buffers = {k: gather(v).clone() for k, v in self.buffers_.items()}
        return Ensemble(self.module, params, buffers, ids, process_group=None)

    @property
    def num_members(self) -> int:
        """M, the number of members this process holds."""
        return sf.stacked_size(self.params)

    def parameters(self) -> list[Tensor]:
        """The stacked parameter tensors, as leaves that require grad, in ``params`` order.

        The first call makes them leaves (private copies); later calls return the same tensors, which an
        optimizer built on them updates in place: ``torch.optim.SGD(ensemble.parameters(), lr=0.1)``.

        Returns:
            The tensors.
        """
        for k, v in self.params.items():
            if not (v.is_leaf and v.requires_grad):
                self.params[k] = v.detach().clone().requires_grad_(True)
        return list(self.params.values())

    def member_logits(self, x: Tensor, chunk_size: int | None = None) -> Tensor:
        """Outputs of all members on the same input.

        Args:
            x: the input batch.
            chunk_size: members per ``vmap`` chunk (None: all at once).

        Returns:
            (M, B, ...).
        """
        return sf.ensemble_call(self.module, self.params, self.buffers_, x, chunk_size=chunk_size)

    def __call__(self, x: Tensor) -> Tensor:
        """Ensemble prediction: mean of member logits, (B, ...)."""
        return self.member_logits(x).mean(0)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Ensemble:
        """Move (and cast floating) parameters and buffers in place; returns self."""

        def cast(v: Tensor) -> Tensor:  # new tensors: call parameters() again for an optimizer
            return v.detach().to(device=device, dtype=dtype if v.is_floating_point() else None)

        self.params = {k: cast(v) for k, v in self.params.items()}
        self.buffers_ = {k: cast(v) for k, v in self.buffers_.items()}
        self.module.to(device=device, dtype=dtype)
        return self

    def subset(self, indices: Sequence[int] | Tensor) -> Ensemble:
        """The sub-ensemble of the given member positions (shares no storage with this one)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        dev = next(iter(self.params.values())).device
        params = {k: v.detach()[idx.to(dev)].clone() for k, v in self.params.items()}
        buffers = {k: v[idx.to(v.device)].clone() for k, v in self.buffers_.items()}
        return Ensemble(self.module, params, buffers, [self.member_ids[int(i)] for i in idx], process_group=None)

    def member(self, index: int) -> nn.Module:
        """A standalone module holding member ``index``'s parameters."""
        mod = copy.deepcopy(self.module)
        state = {k: v.detach()[index].clone() for k, v in self.params.items()}
        state.update({k: v[index].clone() for k, v in self.buffers_.items()})
        mod.load_state_dict(state, strict=False)
        return mod

    def __repr__(self) -> str:
        return f"Ensemble({type(self.module).__name__}, num_members={self.num_members}, num_params_per_member={sf.num_params(self.params) // self.num_members})"


def member_generator(seed: int, member: int) -> torch.Generator:
    """The generator of a member's data order and augmentation draws: ``rng.derive(seed, member)``.

    Args:
        seed: the ensemble's seed.
        member: the member's global id (the stream does not depend on M).

    Returns:
        The generator.
    """
    return as_generator(derive(seed, member))


def epoch_plan(generator: torch.Generator, num_data: int, group_order: int | None) -> tuple[Tensor, Tensor | None]:
    """One epoch of one member: a random order of the samples and a group element per position.

    Args:
        generator: the member's generator.
        num_data: the number of samples.
        group_order: |G| (None: no augmentation).

    Returns:
        ``(order, elements)``; ``elements`` None without a group.
    """
    order = torch.randperm(num_data, generator=generator)
    elements = None if group_order is None else torch.randint(0, group_order, (num_data,), generator=generator)
    return order, elements


def _check_optimizer(ensemble: Ensemble, optimizer: object) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        what = f"the class {optimizer.__name__}" if isinstance(optimizer, type) else repr(optimizer)
        raise ConfigError(
            f"optimizer must be an optimizer instance built on ensemble.parameters(), e.g. "
            f"torch.optim.SGD(ensemble.parameters(), lr=0.1); got {what}."
        )
    own = {id(p) for p in ensemble.params.values()}
    theirs = [p for g in optimizer.param_groups for p in g["params"]]
    if not theirs or not all(id(p) in own for p in theirs):
        raise ConfigError(
            "the optimizer must be built on ensemble.parameters() (the stacked leaf tensors, "
            "after any ensemble.to(...)); it holds other tensors."
        )


def train_ensemble(
    ensemble: Ensemble,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    augment: GroupAction | None = None,
    generator: Seed = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    on_epoch: Callable[[int, Tensor], None] | None = None,
    lr_factors: Tensor | Callable[[int, int], Tensor] | None = None,
    compile: bool | str = False,
) -> Tensor:
    """Train all members together (gradients through ``vmap``), stepping ``optimizer.step(closure)``.

    Member m (global id ``ensemble.member_ids[m]``) sees the samples in its own random order each
    epoch and, with ``augment``, one random group element per sample (``epoch_plan`` with
    ``member_generator(s, id)``, s = ``rng.seed_of(generator)``; None = 0). Each member's loss is
    ``loss_fn`` on its own mini-batch; the summed loss gives every member exactly its own gradient.
    A sharded ensemble (``Ensemble.init(..., process_group=...)``) trains its own members with no
    communication (each member's randomness depends on its global id only).

    Args:
        ensemble: the members.
        x: the training inputs.
        y: the labels.
        optimizer: an instance built on ``ensemble.parameters()``; an elementwise optimizer (SGD, Adam,
            weight decay, momentum) updates each member independently, exactly as if it were trained alone.
        epochs: passes over the data.
        batch_size: samples per member step.
        augment: a group action for random augmentation, or None.
        generator: the seed s (a seed or a generator; None = 0).
        loss_fn: ``loss_fn(logits, y)``, mean over the batch.
        progress: wraps the iterable of epochs (e.g. a progress bar).
        on_epoch: ``on_epoch(epoch, losses)`` after each epoch (0-based) with the members' mean losses (M,).
        lr_factors: per-member learning rates, member m stepping with ``lr * lr_factors[m]`` (``lr`` the
            optimizer's, under any torch scheduler): a tensor (M,), or a schedule ``lr_factors(epoch, step) ->
            (M,)`` called before every step. Each step is scaled afterwards, W_m <- W_m + f_m (W_m' - W_m),
            exact for optimizers whose update is lr times a direction that does not depend on lr (SGD with
            momentum or Nesterov, Adam, AdamW, RMSprop, Adagrad without lr_decay); not for LBFGS or Rprop.
        compile: run the members' vmapped forward and loss through ``torch.compile`` (``True``: backend
            "inductor"; a string: that backend, e.g. "aot_eager"; whole graph, static shapes, compiled on the
            first step, again for a smaller last batch); the backward is AOTAutograd's; eager's numbers up to
            round-off; 1.02x per epoch on a 2-core CPU with 1 thread (``benchmarks/ensemble.py --compile``,
            benchmarks/README.md). A failure raises :class:`~symgen.errors.CompileError` naming it.

    Returns:
        Per-member mean epoch losses (M, epochs); for a sharded ensemble, gathered over the ranks (total M, epochs).
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ShapeError(f"x and y need the same non-zero number of samples; got {x.shape[0]} and {y.shape[0]}.")
    if epochs < 0 or batch_size < 1:
        raise ConfigError(f"need epochs >= 0 and batch_size >= 1; got {epochs} and {batch_size}.")
    _check_optimizer(ensemble, optimizer)
    if augment is not None:
        augment.check(x.shape[1:])
    leaves = ensemble.params
    dev = next(iter(leaves.values())).device
    dtype = next(iter(leaves.values())).dtype
    x = x.to(device=dev, dtype=dtype)
    y = y.to(dev)
    n, m = x.shape[0], ensemble.num_members
    seed = seed_of(generator)
    gens = [member_generator(seed, i) for i in ensemble.member_ids]
    order_g = augment.group.order if augment is not None else None
    steps = math.ceil(n / batch_size)
    history = torch.zeros(m, epochs, dtype=dtype)
    was_training = ensemble.module.training
    ensemble.module.train()
    member_losses = _member_losses_fn(ensemble.module, loss_fn, compile)
    epoch_iter: Iterable[int] = range(epochs)
    if progress is not None:
        epoch_iter = progress(epoch_iter)
    try:
        for epoch in epoch_iter:
            plans = [epoch_plan(g, n, order_g) for g in gens]
            orders = torch.stack([p[0] for p in plans]).to(dev)  # (M, n)
            elems = torch.stack([e for _, e in plans if e is not None]).to(dev) if augment is not None else None
            total = torch.zeros(m, dtype=dtype, device=dev)
            for s in range(steps):
                sl = slice(s * batch_size, min((s + 1) * batch_size, n))
                idx = orders[:, sl]  # (M, b)
                xb, yb = x[idx], y[idx]  # (M, b, ...)
                b = idx.shape[1]
                if augment is not None and elems is not None:
                    flat = xb.reshape(m * b, *x.shape[1:])
                    xb = augment.apply_each(elems[:, sl].reshape(-1), flat).reshape(xb.shape)
                losses: list[Tensor] = []

                def closure(
                    xb: Tensor = xb, yb: Tensor = yb, losses: list[Tensor] = losses, epoch: int = epoch, s: int = s
                ) -> Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    member_loss = member_losses(leaves, ensemble.buffers_, xb, yb)  # (M,)
                    loss = member_loss.sum()
                    if not torch.isfinite(loss):
                        bad = torch.nonzero(~torch.isfinite(member_loss)).flatten().tolist()
                        raise DivergenceError(
                            f"non-finite training loss for member(s) {bad[:8]} at epoch {epoch}, "
                            f"step {s}; lower the learning rate or the init scale."
                        )
                    losses.append(member_loss.detach())
                    loss.backward()
                    return loss.detach()

                factors = _member_factors(lr_factors, epoch, s, m, dev, dtype)
                before = [p.detach().clone() for p in leaves.values()] if factors is not None else []
                # torch's stub types a closure as returning float; the step protocol returns the loss tensor
                optimizer.step(closure)  # type: ignore[arg-type]
                if factors is not None:
                    with torch.no_grad():
                        for p, p0 in zip(leaves.values(), before, strict=True):
                            p.copy_(torch.lerp(p0, p, factors.view((m,) + (1,) * (p.dim() - 1))))
                total += losses[0] * b
            history[:, epoch] = (total / n).to(history.device)
            if on_epoch is not None:
                on_epoch(epoch, history[:, epoch])
    finally:
        ensemble.module.train(was_training)
    return sd.all_gather_rows(history, ensemble.process_group)


def _member_losses_fn(
    module: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], compile: bool | str
) -> Callable[..., Tensor]:
    """``(params, buffers, xb, yb) -> (M,)`` member losses: vmap over the members, eager or ``torch.compile``d."""

    def member_losses(params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        out = sf.ensemble_call(module, params, buffers, xb, shared_input=False)
        return vmap(loss_fn)(out, yb)

    return sf.compiled(
        member_losses,
        compile,
        f"the ensemble's member losses (vmap over functional_call of {type(module).__name__}, then "
        f"{getattr(loss_fn, '__name__', 'loss_fn')})",
        "train with compile=False (eager vmap), or try compile='aot_eager'",
        fullgraph=True,
        dynamic=False,
    )


def _member_factors(
    lr_factors: Tensor | Callable[[int, int], Tensor] | None,
    epoch: int,
    step: int,
    m: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor | None:
    """This step's per-member learning-rate factors (M,), checked; None when not given."""
    if lr_factors is None:
        return None
    f = lr_factors(epoch, step) if callable(lr_factors) else lr_factors
    f = torch.as_tensor(f)
    if f.shape != (m,) or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise ConfigError(
            f"lr_factors must give one finite factor >= 0 per member of this ensemble, shape ({m},); "
            f"got shape {tuple(f.shape)} at epoch {epoch}, step {step} (a sharded ensemble: index "
            "your factors with ensemble.member_ids)."
        )
    return f.to(device=device, dtype=dtype)


def sub_ensemble_metrics(
    member_outputs: Tensor,
    sizes: Sequence[int],
    metric_fn: Callable[[Tensor], Mapping[str, float]],
    num_subsets: int = 20,
    generator: Seed = None,
    replace: bool = False,
) -> dict[int, dict[str, dict[str, float]]]:
    """Metrics of random sub-ensembles against their size M: f_S = mean_{m in S} f_m, |S| = M.

    Args:
        member_outputs: (P, ...) per-member outputs of a pool of P members.
        sizes: the sizes M.
        metric_fn: the metrics of a mean output.
        num_subsets: subsets per size: without replacement (each an honest M-member ensemble) or, with
            ``replace=True``, bootstrap resamples.
        generator: a seed or a ``torch.Generator``; None = seed 0.
        replace: draw with replacement.

    Returns:
        ``{M: {metric: {mean, std, min, max}}}``.
    """
    pool = member_outputs.shape[0]
    gen = as_generator(generator)
    out: dict[int, dict[str, dict[str, float]]] = {}
    for size in sizes:
        size = int(size)
        if size < 1 or (not replace and size > pool):
            raise ConfigError(f"sub-ensemble size {size} must lie in 1..{pool} (the pool size).")
        values: dict[str, list[float]] = {}
        distinct = math.comb(pool, size) if not replace else None
        draws = num_subsets if distinct is None else min(num_subsets, distinct)
        for _ in range(draws):
            if replace:
                idx = torch.randint(0, pool, (size,), generator=gen)
            else:
                idx = torch.randperm(pool, generator=gen)[:size]
            mean = member_outputs[idx.to(member_outputs.device)].mean(0)
            for k, v in metric_fn(mean).items():
                values.setdefault(k, []).append(float(v))
        out[size] = {k: _summary(v) for k, v in values.items()}
    return out


def infinite_ensemble_deviation(member_orbit_logits: Tensor) -> dict[str, float]:
    """Unbiased estimate of the infinite ensemble's squared logit deviation over orbits, with jackknife SE.

    D_inf = mean_{g,x} ||E_w[f(gx; w) - f(x; w)]||^2, estimated by the U-statistic
    (||sum_i d_i||^2 - sum_i ||d_i||^2) / (P (P - 1)) with d_i = f_i(gx) - f_i(x); the finite-M
    ensemble's deviation is D_inf + tr(Cov d) / M, so this removes the 1/M noise floor
    (0 in expectation for an ensemble that becomes invariant).

    Args:
        member_orbit_logits: (P, |G|, N, K), P >= 3, g = 0 the identity.

    Returns:
        ``{"estimate", "se"}``.
    """
    if member_orbit_logits.ndim != 4 or member_orbit_logits.shape[0] < 3:
        raise ShapeError(f"need member orbit logits (P >= 3, |G|, N, K); got {tuple(member_orbit_logits.shape)}.")
    d = (member_orbit_logits - member_orbit_logits[:, :1]).flatten(1).double()  # (P, D)
    p, dim = d.shape
    norm = dim / member_orbit_logits.shape[-1]  # average over (g, x), sum over classes
    s = d.sum(0)
    q_i = (d * d).sum(1)  # ||d_i||^2
    ss, q = float(s @ s), float(q_i.sum())
    est = (ss - q) / (p * (p - 1)) / norm
    # leave-one-out: ||S - d_i||^2 = ||S||^2 - 2 <S, d_i> + ||d_i||^2
    sd = d @ s
    loo = ((ss - 2 * sd + q_i) - (q - q_i)) / ((p - 1) * (p - 2)) / norm
    se = float(((p - 1) / p * ((loo - loo.mean()) ** 2).sum()).sqrt())
    return {"estimate": est, "se": se}


def _summary(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "min": float(t.min()), "max": float(t.max()), "n": float(len(values))}

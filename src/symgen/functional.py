"""The functional core: a model as ``(module, params, buffers)``.

Everything that needs a network as a function of its parameters goes through here:
Jacobians and NTKs, Hessian-vector products, vectorized ensembles (``vmap`` over stacked
parameter sets), noise-perturbed copies (NSO) and Hutchinson probes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from symgen.errors import CompileError, ConfigError, ShapeError
from symgen.rng import Seed, isolated_seed, seed_of

__all__ = [
    "Params",
    "params_of",
    "buffers_of",
    "state_of",
    "call",
    "stack",
    "unstack",
    "stacked_size",
    "stacked_init",
    "ensemble_call",
    "flatten",
    "unflatten",
    "num_params",
    "tree_map",
    "tree_add",
    "tree_scale",
    "tree_dot",
    "tree_norm",
    "loss_function",
    "hvp",
    "per_sample_jacobian",
    "jvp_outputs",
    "vjp_outputs",
    "math_attention",
]

Params = dict[str, Tensor]


def params_of(module: nn.Module, *, detach: bool = True, requires_grad_only: bool = True) -> Params:
    """Named parameters of ``module`` as a dict (detached copies that share storage by default)."""
    return {
        name: (p.detach() if detach else p)
        for name, p in module.named_parameters()
        if p.requires_grad or not requires_grad_only
    }


def buffers_of(module: nn.Module) -> Params:
    """Named buffers (BatchNorm running statistics, masks) as a dict."""
    return {name: b for name, b in module.named_buffers()}


def state_of(module: nn.Module) -> tuple[Params, Params]:
    """``(params, buffers)`` of ``module``."""
    return params_of(module), buffers_of(module)


def call(
    module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None, *args: Any, **kwargs: Any
) -> Any:
    """``module(*args)`` evaluated with the given parameters and buffers (``torch.func.functional_call``).

    Parameters not in ``params`` (e.g. frozen ones) are taken from the module itself.
    """
    tensors = dict(params)
    if buffers:
        tensors.update(buffers)
    return functional_call(module, tensors, args, kwargs, strict=False)


def stack(trees: Iterable[Mapping[str, Tensor]]) -> Params:
    """Stack M dicts with equal keys and shapes along a new leading axis (for ``vmap``)."""
    trees = list(trees)
    if not trees:
        raise ShapeError("stack() needs at least one parameter dict; got none.")
    keys = list(trees[0])
    for i, t in enumerate(trees[1:], 1):
        if list(t) != keys:
            raise ShapeError(f"stack(): dict {i} has keys {sorted(t)}, expected {sorted(keys)}.")
    return {k: torch.stack([t[k] for t in trees]) for k in keys}


def unstack(stacked: Mapping[str, Tensor], index: int) -> Params:
    """Member ``index`` of a stacked dict."""
    return {k: v[index] for k, v in stacked.items()}


def stacked_size(stacked: Mapping[str, Tensor]) -> int:
    """Number M of members in a stacked dict."""
    sizes = {v.shape[0] for v in stacked.values()}
    if len(sizes) != 1:
        raise ShapeError(f"stacked dict has inconsistent leading sizes {sorted(sizes)}.")
    return sizes.pop()


def stacked_init(
    factory: Callable[[], nn.Module],
    num_members: int,
    generator: Seed = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Params, Params]:
    """Build ``num_members`` independently initialized copies of ``factory()``.

    Member ``m`` is built under the CPU seed ``s + m`` (``s = rng.seed_of(generator)``), so it equals
    the module a plain loop ``torch.manual_seed(s + m); factory()`` would build; the global RNG state
    is left untouched (:func:`symgen.rng.isolated_seed`). Returns ``(base_module, stacked_params,
    stacked_buffers)``; the base module is a template (its own parameters are member 0's).
    """
    if num_members < 1:
        raise ConfigError(f"num_members must be >= 1, got {num_members}.")
    seed = seed_of(generator)
    members = []
    for m in range(num_members):
        with isolated_seed(seed + m):
            members.append(factory())
    for mod in members:
        mod.to(device=device, dtype=dtype)
    params = stack([params_of(mod) for mod in members])
    buffers = stack([buffers_of(mod) for mod in members]) if buffers_of(members[0]) else {}
    return members[0], params, buffers


def ensemble_call(
    module: nn.Module,
    stacked_params: Mapping[str, Tensor],
    stacked_buffers: Mapping[str, Tensor] | None,
    x: Tensor,
    *,
    shared_input: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Outputs of all M members, shape ``(M, *out)``.

    ``shared_input=True``: every member sees the same ``x``; otherwise ``x`` has a leading
    member axis ``(M, ...)`` (per-member batches). BatchNorm in train mode uses each member's
    own batch statistics and updates its own stacked running buffers.
    """
    buffers = dict(stacked_buffers) if stacked_buffers else {}

    def one(p, b, xi):
        return call(module, p, b, xi)

    return vmap(one, in_dims=(0, 0, None if shared_input else 0), chunk_size=chunk_size)(
        dict(stacked_params), buffers, x
    )


def flatten(tree: Mapping[str, Tensor]) -> Tensor:
    """Concatenate all tensors of a dict into one flat vector (in key order)."""
    return torch.cat([v.reshape(-1) for v in tree.values()])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten`: split ``vector`` into tensors shaped like ``like``."""
    n = sum(v.numel() for v in like.values())
    if vector.numel() != n:
        raise ShapeError(f"unflatten(): vector has {vector.numel()} entries, the dict needs {n}.")
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vector[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


def num_params(tree: Mapping[str, Tensor]) -> int:
    """Total number of scalars in a dict of tensors."""
    return sum(v.numel() for v in tree.values())


def tree_map(fn: Callable[..., Tensor], *trees: Mapping[str, Tensor]) -> Params:
    """Apply ``fn`` key by key to one or more dicts with the same keys."""
    return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


def tree_add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float = 1.0) -> Params:
    """``a + alpha * b`` key by key (perturbed copies: W + U)."""
    return {k: a[k] + alpha * b[k] for k in a}


def tree_scale(a: Mapping[str, Tensor], alpha: float | Tensor) -> Params:
    """``alpha * a`` key by key (``alpha`` a number or a broadcastable tensor)."""
    return {k: alpha * v for k, v in a.items()}


def tree_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Euclidean inner product of two parameter dicts."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def tree_norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of a parameter dict, sqrt(sum_k ||a_k||^2), a 0-dim tensor."""
    return tree_dot(a, a).sqrt()


def loss_function(
    module: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], buffers: Mapping[str, Tensor] | None = None
) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """``(params, x, y) -> loss_fn(module(x; params), y)``, a pure function of the parameters."""

    def f(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(call(module, params, buffers, x), y)

    return f


@contextmanager
def math_attention() -> Iterator[None]:
    """Inside: ``F.scaled_dot_product_attention`` runs its math backend (matmul, softmax, matmul) and
    ``nn.MultiheadAttention``/``TransformerEncoderLayer`` skip their fused fast path: the fused kernels
    (flash, ``_native_multi_head_attention``) have no double backward and no forward-mode rule. Used by
    HVPs, jvps, and Jacobians/vjps taken with grad on (they may be differentiated again)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def hvp(f: Callable[[Params], Tensor], params: Params, vector: Params) -> Params:
    """Hessian-vector product ``H v`` of a scalar ``f(params)`` by forward-over-reverse (in :func:`math_attention`)."""
    from torch.func import grad, jvp

    with math_attention():
        try:
            return jvp(grad(f), (params,), (vector,))[1]
        except RuntimeError as e:
            # Some backward formulas (e.g. mse_loss in torch 2.13) write in place into a forward-mode
            # ZeroTensor; reverse-over-reverse gives the same product at a higher cost.
            if "ZeroTensor" not in str(e):
                raise
            return grad(lambda p: tree_dot(grad(f)(p), vector))(params)


def per_sample_jacobian(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor] | None,
    x: Tensor,
    *,
    chunk_size: int | None = None,
    outputs: slice | None = None,
) -> Params:
    """Jacobian of each sample's flattened output w.r.t. ``params``: name -> (N, O, *param_shape).

    ``J_i = d vec(f(x_i)) / d theta`` by ``vmap(jacrev)`` over samples (each sample runs alone, so
    BatchNorm must be in eval mode). Entries of the module (or of ``buffers``) that are not in
    ``params`` are held fixed; pass fixed parameters inside ``buffers`` to override the module's.
    ``outputs``: only these entries of the flattened output (a slice), e.g. to bound memory.
    """
    from torch.func import jacrev

    def f(p: Params, xi: Tensor) -> Tensor:
        out = call(module, p, buffers, xi.unsqueeze(0)).reshape(-1)
        return out if outputs is None else out[outputs]

    with math_attention():
        return vmap(jacrev(f), in_dims=(None, 0), chunk_size=chunk_size)(dict(params), x)


def jvp_outputs(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor] | None,
    x: Tensor,
    tangents: Mapping[str, Tensor],
) -> tuple[Tensor, Tensor]:
    """``(f(x), J(x) v)``: outputs and their derivative along the parameter tangent ``v`` (in :func:`math_attention`)."""
    from torch.func import jvp

    with math_attention():
        out = jvp(lambda p: call(module, p, buffers, x), (dict(params),), (dict(tangents),))
    return out[0], out[1]


def vjp_outputs(
    module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None, x: Tensor, cotangent: Tensor
) -> Params:
    """``J(x)^T u``: the parameter gradient of ``<f(x), u>`` for an output-shaped cotangent ``u``."""
    from torch.func import vjp

    with math_attention():
        pullback = vjp(lambda p: call(module, p, buffers, x), dict(params))[1]
        grads: Params = pullback(cotangent)[0]
    return grads


# --- curvature and perturbed copies (issue 4) -------------------------------------------------

__all__ += ["ensemble_value_and_grad"]


def ensemble_value_and_grad(
    f: Callable[..., Tensor],
    stacked_params: Mapping[str, Tensor],
    *args: Any,
    in_dims: tuple[int | None, ...] | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Params]:
    """Per-member ``(f(p_m, *args), grad f(p_m, *args))`` over M stacked parameter sets.

    The members' forward passes run together under ``vmap``; ONE ordinary backward pass of
    ``sum_m f(p_m)`` then gives every member's gradient (members never interact under ``vmap``).
    This avoids the per-operation cost of nesting ``torch.func.grad`` inside ``vmap`` (about 2x
    faster for small MLPs on CPU). ``in_dims`` gives the mapped axis of each extra argument (``None``:
    shared, e.g. the batch; ``0``: per member, e.g. stacked BatchNorm buffers). Returns detached
    values ``(M,)`` and stacked grads. Call it outside other ``torch.func`` transforms.
    """
    dims = (0,) + (tuple(in_dims) if in_dims is not None else (None,) * len(args))
    if len(dims) != len(args) + 1:
        raise ShapeError(
            f"ensemble_value_and_grad(): {len(args)} extra arguments but in_dims has "
            f"{len(dims) - 1} entries; give one entry per argument."
        )
    leaves = {k: v.detach().requires_grad_(True) for k, v in stacked_params.items()}
    with torch.enable_grad():
        values = vmap(f, in_dims=dims, chunk_size=chunk_size)(leaves, *args)
        grads = torch.autograd.grad(values.sum(), list(leaves.values()), allow_unused=True)
    out = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads, strict=True)}
    return values.detach(), out


# --- BatchNorm modes and noise-perturbed copies (shared by curvature, NTK, NSO, SAM, noise stability) ---

__all__ += ["bn_mode", "frozen_running_stats", "gaussian_noise", "perturbed_copies", "expand_buffers", "compiled"]


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def bn_mode(module: nn.Module, mode: str) -> Iterator[None]:
    """Evaluate ``module`` with BatchNorm in ``mode`` ("eval": running statistics; "train": batch
    statistics) and every other layer (dropout, ...) in eval mode; every flag is restored after."""
    if mode not in ("eval", "train"):
        raise ConfigError(f"bn_mode must be 'eval' or 'train', got '{mode}'.")
    saved = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        if mode == "train":
            for m in _batchnorms(module):
                m.train()
        yield
    finally:
        for m, t in saved:
            m.training = t


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Passes inside leave BatchNorm running statistics (and batch counts) exactly as they were.

    For passes at perturbed weights (SAM's ascent point, NSO's noisy copies): the statistics are
    updated once per step, by the clean pass. Restores saved buffers, so it is exact for any momentum
    (including ``None``, the cumulative average).
    """
    buffers = [b for m in _batchnorms(module) for b in m.buffers()]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)


def gaussian_noise(
    params: Mapping[str, Tensor],
    sigma: float | Mapping[str, float],
    generator: torch.Generator,
    num: int,
    *,
    relative: bool | Mapping[str, bool] = False,
) -> Params:
    """``num`` Gaussian draws U per tensor, shape ``(num, *p.shape)``, std ``sigma`` (or per-tensor sigmas).

    ``relative``: std = sigma ||p|| / sqrt(numel p), so that ||U|| ~ sigma ||p|| (noise-to-weight
    ratio, arXiv 2306.08553). Drawn tensor by tensor in key order on the generator's device.
    """
    out = {}
    for k, p in params.items():
        s = sigma[k] if isinstance(sigma, Mapping) else sigma
        rel = relative[k] if isinstance(relative, Mapping) else relative
        z = torch.randn((num,) + tuple(p.shape), generator=generator, device=generator.device, dtype=p.dtype).to(
            p.device
        )
        std = s * p.detach().norm() / max(p.numel(), 1) ** 0.5 if rel else s
        out[k] = z * std
    return out


def perturbed_copies(
    params: Mapping[str, Tensor], noise: Mapping[str, Tensor], signs: tuple[float, ...] = (1.0, -1.0)
) -> Params:
    """Stacked copies ``W + s U_i``, ordered sign-major: [W + U_1 .. W + U_k, W - U_1 .. W - U_k]."""
    return {k: torch.cat([params[k].detach().unsqueeze(0) + s * noise[k] for s in signs]) for k in noise}


def expand_buffers(buffers: Mapping[str, Tensor], num: int) -> Params:
    """``num`` private copies of every buffer (stacked), so train-mode BatchNorm in ``vmap`` writes its own."""
    return {k: b.detach().unsqueeze(0).expand((num,) + tuple(b.shape)).clone() for k, b in buffers.items()}


def compiled(
    fn: Callable[..., Any], compile: bool | str | None, what: str, fix: str, **options: Any
) -> Callable[..., Any]:
    """``fn`` itself (``compile`` False/None), or ``torch.compile(fn, backend=..., **options)`` (``True``:
    "inductor"; a string: that backend) whose failures, at compile or at call time, are a
    :class:`CompileError` naming ``what`` was compiled and the ``fix``. One meaning of a ``compile=``
    option across the package (``HessianOperator``, ``train_ensemble``)."""
    if compile is False or compile is None:
        return fn
    if compile is not True and not (isinstance(compile, str) and compile):
        raise ConfigError(
            f"compile must be False, True (backend 'inductor') or a torch.compile backend name such "
            f"as 'aot_eager'; got {compile!r}."
        )
    from torch._dynamo.exc import TorchDynamoException

    backend = "inductor" if compile is True else compile
    what = f"torch.compile(backend={backend!r}) of {what}"
    try:
        compiled_fn = torch.compile(fn, backend=backend, **options)
    except TorchDynamoException as e:
        raise CompileError(f"{what} failed: {str(e).splitlines()[0]}; {fix}.") from e

    def run(*args: Any) -> Any:
        try:
            return compiled_fn(*args)
        except TorchDynamoException as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise CompileError(f"{what} is not supported here ({type(e).__name__}: {first}); {fix}.") from e

    return run

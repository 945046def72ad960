"""The model-based curvature operator: the batch loop over a model's data (streamed, data-parallel),
its normalization, BatchNorm mode and parameter selection, and the fast paths (the fast double
backward, Taylor-mode quadratic forms) with their visible fallbacks; shared by the Hessian and the
generalized Gauss-Newton operators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from symgen import distributed
from symgen import functional as F
from symgen.curvature.base import CurvatureOperator
from symgen.curvature.checks import warn_fallback
from symgen.curvature.double_backward import fast_double_backward, fast_double_backward_applies
from symgen.curvature.products import RetainedHVP
from symgen.distributed import GroupSpec
from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.numerics import check_batch, check_tensors
from symgen.streaming import BatchStream, model_device

__all__ = ["ModelOperator"]


class ModelOperator(CurvatureOperator):
    """A curvature matrix of a model's loss w.r.t. (some of) its parameters: the shared batch loop.

    The loss is ``L(W) = sum_b w_b loss_fn(model(x_b; W), y_b)`` over the batches of ``data``: one batch
    ``(x, y)``, a list of batches, or a ``torch.utils.data.DataLoader`` (any re-iterable of batches),
    streamed afresh on every product so memory holds one batch (and its graph) plus the vectors,
    whatever the dataset size (:class:`symgen.streaming.BatchStream`; batches are moved to the model's
    device). ``w_b = n_b / N`` for ``reduction="mean"`` (the dataset mean of a batch-mean loss, so the
    same operator whatever the batch size) or 1 for ``"sum"``; products are accumulated in float64.
    ``process_group``: data-parallel execution (:mod:`symgen.distributed`): each rank streams its own
    shard, the float64 sums and N are all-reduced (with a timeout), so every rank gets the products of
    the whole dataset; "auto" uses the default group when torch.distributed is initialized with more
    than one process, None this process only. ``param_names``: the parameters it is taken over (default
    all trainable ones; the rest stay fixed). ``bn_mode``: "eval" (running statistics) or "train" (batch
    statistics; running statistics are never updated); other layers run in eval mode. ``batching``:
    each batch's graph applies to the columns one by one ("loop") or with ``vmap`` ("vmap",
    ``chunk_size`` at a time). ``cache_graph``: keep each batch's product function (retained graph)
    between products (default: only for one in-memory batch). Products on CPU in float32 with
    ``batching="loop"`` build their graphs with :func:`symgen.curvature.double_backward.fast_double_backward`
    (same numbers to round-off; up to 1.5x faster on conv nets). Vectors are flat in ``functional.flatten``
    order; the operator is taken at the parameters' values when a batch's graph is built: build a new one
    after changing the model. Subclasses implement ``_build_product(x, y)``: ``v -> A_b v`` for the
    batch-mean (or batch-sum) loss of one batch.
    """

    taylor = False  # quadratic forms by Taylor mode (HessianOperator); else v . (A v)
    fast_double_backward = False  # graphs built with symgen.curvature.double_backward

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: Any,
        *,
        param_names: Iterable[str] | None = None,
        bn_mode: str = "eval",
        reduction: str = "mean",
        batching: str = "loop",
        chunk_size: int | None = None,
        cache_graph: bool | None = None,
        process_group: GroupSpec = "auto",
    ) -> None:
        if bn_mode not in ("eval", "train"):
            raise ConfigError(f"bn_mode must be 'eval' or 'train', got '{bn_mode}'.")
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"reduction must be 'mean' or 'sum', got '{reduction}'.")
        if batching not in ("loop", "vmap"):
            raise ConfigError(f"batching must be 'loop' or 'vmap', got '{batching}'.")
        self.model = model
        self.loss_fn = loss_fn
        self.bn_mode = bn_mode
        self.reduction = reduction
        self.batching = batching
        self.chunk_size = chunk_size
        self.group = distributed.resolve_group(process_group)
        self.timeout_s = distributed.DEFAULT_TIMEOUT_S
        all_params = F.params_of(model)
        if not all_params:
            raise ConfigError(f"{type(model).__name__} has no trainable parameters (requires_grad=True).")
        if param_names is None:
            self.params = all_params
        else:
            names = [param_names] if isinstance(param_names, str) else list(param_names)
            unknown = [n for n in names if n not in all_params]
            if unknown or not names:
                raise ConfigError(
                    f"param_names {unknown or names} are not trainable parameters of the model; "
                    f"valid names: {', '.join(all_params)}."
                )
            self.params = {n: all_params[n] for n in names}
        self.param_names = list(self.params)
        ref = next(iter(self.params.values()))
        super().__init__(F.num_params(self.params), ref.dtype, model_device(model))
        self.data = BatchStream(data, device=self.device, allow_empty=self.group is not None)
        in_memory = isinstance(self.data._source, (list, tuple))
        self.cache_graph = (in_memory and len(self.data) == 1) if cache_graph is None else bool(cache_graph)
        self._products: dict[int, Callable[[F.Params], F.Params]] = {}
        self._num_data: int | None = None
        # the fast paths this operator takes; a path not taken has its reason here (read by tests and reports)
        self.fallback_reasons: dict[str, str] = {}
        self.fast_double_backward = batching == "loop" and fast_double_backward_applies(self.device, self.dtype)
        if not self.fast_double_backward:
            self.fallback_reasons["fast_double_backward"] = (
                "batching='vmap'"
                if batching != "loop"
                else f"measured only for float32 on CPU, not {self.dtype} on {self.device.type}"
            )

    def _column_bytes(self) -> int:
        # per column: the columns in, their rows (k, n), the float64 accumulator, the products out
        return self.dim * (8 + 3 * torch.empty(0, dtype=self.dtype).element_size())

    @property
    def num_data(self) -> int:
        """N, the number of samples over all batches (and all ranks)."""
        if self._num_data is None:
            local = self.data.num_data
            if local is None:
                local = sum(x.shape[0] for x, _ in self.data)
            self._set_num_data(torch.tensor([float(local)], dtype=torch.float64, device=self.device))
        assert self._num_data is not None  # set by _set_num_data
        return self._num_data

    def _set_num_data(self, total: Tensor) -> None:
        n = int(round(float(total.reshape(-1)[0])))
        if n == 0:
            raise ShapeError("data holds no samples on any rank; pass a batch (x, y) or a non-empty loader.")
        self._num_data = n

    # -- the loss as a pure function of the parameters --

    def _buffers(self) -> F.Params:
        # fresh buffer copies in train mode: BatchNorm then updates the copies, never the model
        base = F.buffers_of(self.model)
        return {k: v.clone() for k, v in base.items()} if self.bn_mode == "train" else base

    def _batch_loss(self, x: Tensor, y: Tensor) -> Callable[[F.Params], Tensor]:
        def f(p: F.Params) -> Tensor:
            return self.loss_fn(F.call(self.model, p, self._buffers(), x), y)

        return f

    def _reduce(self, acc: Tensor, count: int, err: DivergenceError | None = None) -> Tensor:
        """Sum ``acc`` (float64) and the sample count over ranks; normalize for ``reduction="mean"``
        (in place on one process: ``acc`` may be k parameter-sized vectors). ``err``: this rank met NaN or
        inf; it rides on the same sum, so every rank raises instead of waiting in a collective."""
        if self.group is None:
            if err is not None:
                raise err
            self._set_num_data(torch.tensor([float(count)], dtype=torch.float64))
            out = acc
        else:
            self._check_ranks()
            tail = torch.tensor([float(count), float(err is not None)], dtype=torch.float64, device=acc.device)
            flat = torch.cat([acc.reshape(-1), tail])
            flat = distributed.all_reduce_sum(flat, self.group, timeout_s=self.timeout_s)
            if err is not None:
                raise err
            if float(flat[-1]) > 0:
                raise DivergenceError(
                    f"{type(self).__name__}: {int(flat[-1])} other rank(s) met NaN or inf (their error names where); "
                    "every rank stops here."
                )
            self._set_num_data(flat[-2:-1])
            out = flat[:-2].reshape(acc.shape)
        return out.div_(self.num_data) if self.reduction == "mean" else out

    def signature(self) -> dict[str, object]:
        """What every rank's operator must share before its first collective: the parameters taken (name,
        shape, dtype), the dimension, dtype and reduction (the products' all-reduce has ``k n + 2`` entries).

        Returns:
            The signature as a dict of plain values.
        """
        sig: dict[str, object] = {"dim": self.dim, "dtype": str(self.dtype), "reduction": self.reduction}
        for k, v in self.params.items():
            sig[f"parameter {k}"] = f"{list(v.shape)} {v.dtype}"
        return sig

    def _check_ranks(self) -> None:
        """Once per operator: the ranks compare :meth:`signature` (a DistributedError on every rank naming
        the keys that differ, instead of a backend abort on mismatched sizes)."""
        if self.group is not None and not getattr(self, "_ranks_checked", False):
            distributed.check_consistent(
                self.signature(), self.group, what=type(self).__name__, timeout_s=self.timeout_s
            )
            self._ranks_checked = True

    def _sweep(
        self, where: str, acc: Tensor, step: Callable[[int, Tensor, Tensor], None]
    ) -> tuple[int, DivergenceError | None]:
        """Run ``step(b, x, y)`` (which adds batch b's share into ``acc``) over the batches, checking the
        weights and buffers once, each batch's inputs and the accumulator after each batch (one
        ``isfinite`` each). Returns the sample count and, on a data-parallel run, the DivergenceError
        this rank met (raised after the all-reduce, on every rank); on one process it is raised here."""
        count = 0
        try:
            check_tensors(where, "weight", self.params)
            check_tensors(where, "buffer", F.buffers_of(self.model))
            for b, (x, y) in enumerate(self.data):
                check_batch(where, x, y, batch=b, offset=count)
                step(b, x, y)
                count += x.shape[0]
                if not bool(torch.isfinite(acc).all()):
                    raise self._diverged(where, b, x, y)
        except DivergenceError as e:
            if self.group is None:
                raise
            return count, e
        return count, None

    def _diverged(self, where: str, b: int, x: Tensor, y: Tensor) -> DivergenceError:
        """The error for batch b, whose inputs, weights and buffers are finite but whose products are not:
        names the model's output or the loss when they are non-finite (one extra forward pass, on failure only)."""
        with torch.no_grad():
            out = F.call(self.model, self.params, self._buffers(), x)
            if isinstance(out, Tensor) and not bool(torch.isfinite(out).all()):
                return DivergenceError(
                    f"{where}: the model's output on batch {b} holds non-finite values (NaN or inf) though its inputs, weights and "
                    "buffers are finite (an overflow inside the model); compute in float64 or rescale the model."
                )
            loss = self._batch_loss(x, y)(self.params)
        if not bool(torch.isfinite(loss).all()):
            return DivergenceError(
                f"{where}: the loss on batch {b} is {float(loss.double().sum())} though the model's output is "
                "finite (the loss overflowed); rescale the loss or compute in float64."
            )
        return DivergenceError(
            f"{where}: the products on batch {b} hold non-finite values (NaN or inf) though the loss ({float(loss):.4g}) is finite: "
            "its derivatives overflow; compute in float64 or rescale the loss."
        )

    def _weight(self, n_b: int) -> float:
        return float(n_b) if self.reduction == "mean" else 1.0

    def loss(self, params: F.Params | None = None) -> Tensor:
        """L at ``params`` (default the model's current parameters), accumulated in float64: sum_b w_b loss_fn(model(x_b), y_b).

        Args:
            params: dict name -> tensor of the operator's parameters to evaluate at (None: the model's own).

        Returns:
            The loss, a 0-dim tensor in the operator's dtype.
        """
        p = self.params if params is None else params
        acc = torch.zeros((), dtype=torch.float64, device=self.device)

        def step(b: int, x: Tensor, y: Tensor) -> None:
            acc.add_(self._weight(x.shape[0]) * self._batch_loss(x, y)(p).double())

        with torch.no_grad(), F.bn_mode(self.model, self.bn_mode):
            count, err = self._sweep(f"{type(self).__name__}.loss", acc, step)
        return self._reduce(acc, count, err).to(self.dtype)

    def gradient(self) -> Tensor:
        """The loss gradient dL/dW (flat, n entries), accumulated in float64 over the batches (and ranks).

        A batch whose product graph is kept (``cache_graph``) gives it from that graph (a
        :class:`~symgen.curvature.products.RetainedHVP` holds it), building the graph the next product needs
        anyway; otherwise one backward pass per batch.

        Returns:
            The gradient (n,) in the operator's dtype.
        """
        acc = torch.zeros(self.dim, dtype=torch.float64, device=self.device)

        def step(b: int, x: Tensor, y: Tensor) -> None:
            fn = self._product(b, x, y) if self.cache_graph else None
            if isinstance(fn, RetainedHVP):
                grads = fn.gradient
            else:
                keys = list(self.params)
                leaves = [p.detach().requires_grad_(True) for p in self.params.values()]
                with torch.enable_grad():
                    loss = self._batch_loss(x, y)(dict(zip(keys, leaves, strict=True)))
                    out = torch.autograd.grad(loss, leaves, allow_unused=True)
                grads = {k: torch.zeros_like(p) if o is None else o for k, p, o in zip(keys, leaves, out, strict=True)}
            acc.add_(F.flatten(grads).double(), alpha=self._weight(x.shape[0]))

        with F.bn_mode(self.model, self.bn_mode):
            count, err = self._sweep(f"{type(self).__name__}.gradient", acc, step)
        return self._reduce(acc, count, err).to(self.dtype)

    def start_direction(self) -> Tensor | None:
        """The loss gradient (:meth:`gradient`): the loss Hessian's and GGN's top eigenvectors lean towards it.

        Returns:
            The gradient (n,).
        """
        return self.gradient()

    # -- products: the sum over batches --

    def _build_product(self, x: Tensor, y: Tensor) -> Callable[[F.Params], F.Params]:
        raise NotImplementedError(f"{type(self).__name__} must implement _build_product(x, y).")

    def _build(self, x: Tensor, y: Tensor) -> Callable[[F.Params], F.Params]:
        if self.fast_double_backward:
            try:
                with fast_double_backward():
                    return self._build_product(x, y)
            except RuntimeError as e:
                # the model flattens a channels-last feature map with .view: PyTorch's kernels from now on
                if "view size is not compatible" not in str(e):
                    raise
                self.fallback(
                    "fast_double_backward",
                    "the model reshapes a channels-last feature map with .view (use .flatten or .reshape)",
                )
        return self._build_product(x, y)

    def fallback(self, path: str, reason: str) -> None:
        """Give up the fast path ``path`` ("taylor" or "fast_double_backward") from now on, and say so.

        Sets the attribute ``path`` to False, records ``reason`` in ``fallback_reasons[path]`` and warns
        once (:class:`~symgen.curvature.checks.FallbackWarning`, a UserWarning).

        Args:
            path: "taylor" or "fast_double_backward".
            reason: why the path cannot be used (e.g. the operation without a Taylor rule).
        """
        setattr(self, path, False)
        self.fallback_reasons[path] = reason
        name = {"taylor": "Taylor mode", "fast_double_backward": "the fast double backward"}.get(path, path)
        warn_fallback(self, name, reason)

    def _build_forms(self, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor] | None:
        """Subclass hook, called when ``self.taylor``: ``rows (k, n) -> (z_i^T A_b z_i)_i`` for one batch
        without products, or None after calling ``self.fallback("taylor", reason)``."""
        return None

    def _batch_forms(self, b: int, x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        """``z_i^T A_b z_i`` (float64, shape (k,)) for batch b: Taylor-mode forms where the subclass has
        them, else from the products. The forms are built afresh (one forward pass per call, for all k
        rows) after freeing the batch's cached product graph, so the two never hold memory at once."""
        if self.taylor:
            self._products.pop(b, None)
            forms = self._build_forms(x, y)
            if forms is not None:
                return forms(rows).double()
        prods = torch.zeros(rows.shape, dtype=torch.float64, device=self.device)
        self._accumulate(prods, self._product(b, x, y), rows, 1.0)
        return (prods * rows).sum(1)

    def _product(self, b: int, x: Tensor, y: Tensor) -> Callable[[F.Params], F.Params]:
        # call inside bn_mode; uncached, only one batch's graph is alive at a time
        if not self.cache_graph:
            return self._build(x, y)
        if b not in self._products:
            self._products[b] = self._build(x, y)
        return self._products[b]

    def _accumulate(self, acc: Tensor, fn: Callable[[F.Params], F.Params], rows: Tensor, weight: float) -> None:
        """``acc += weight * A_b rows`` (rows ``(k, n)``), one row at a time for ``batching="loop"``:
        no ``(k, n)`` temporary beside the float64 accumulator."""
        if self.batching == "loop" or rows.shape[0] == 1:
            for a, r in zip(acc, rows, strict=True):
                a.add_(F.flatten(fn(F.unflatten(r, self.params))).detach(), alpha=weight)
            return
        # split the rows into contiguous per-parameter blocks (k, *shape) outside vmap: convolution
        # backward cannot query the layout of a batched strided view
        k, blocks, i = rows.shape[0], {}, 0
        for name, p in self.params.items():
            blocks[name] = rows[:, i : i + p.numel()].reshape((k,) + tuple(p.shape)).contiguous()
            i += p.numel()
        out = vmap(fn, chunk_size=self.chunk_size)(blocks)
        acc.add_(torch.cat([out[name].reshape(k, -1) for name in self.params], dim=1).detach(), alpha=weight)

    def _matmat(self, V: Tensor) -> Tensor:
        rows = V.T.contiguous()
        acc = torch.zeros(rows.shape, dtype=torch.float64, device=self.device)

        def step(b: int, x: Tensor, y: Tensor) -> None:
            if self.batching == "vmap":
                # canonical strides: an input with a size-1 channel axis can also look channels-last,
                # and convolution backward under vmap cannot handle that layout
                x = x.clone(memory_format=torch.contiguous_format)
            fn = self._product(b, x, y)  # built outside vmap: requires_grad_ is not allowed inside it
            self._accumulate(acc, fn, rows, self._weight(x.shape[0]))

        with F.bn_mode(self.model, self.bn_mode):
            count, err = self._sweep(f"{type(self).__name__}.matmat", acc, step)
        return self._reduce(acc, count, err).to(self.dtype).T

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v[:, None])[:, 0]

    def _quadratic_forms(self, V: Tensor) -> Tensor:
        rows = V.T.contiguous()
        acc = torch.zeros(rows.shape[0], dtype=torch.float64, device=self.device)

        def step(b: int, x: Tensor, y: Tensor) -> None:
            acc.add_(self._batch_forms(b, x, y, rows), alpha=self._weight(x.shape[0]))

        with F.bn_mode(self.model, self.bn_mode):
            count, err = self._sweep(f"{type(self).__name__}.quadratic_forms", acc, step)
        return self._reduce(acc, count, err).to(self.dtype)

"""Symmetric linear operators for curvature: the base class, a dense-matrix operator, and the
model-based layer (the batch loop, its normalization, BatchNorm mode and parameter selection)
shared by the Hessian and the generalized Gauss-Newton operators.

Vectors are columns, as in SciPy and curvlinops: ``op.matvec(v)`` with ``v (n,)`` and
``op.matmat(V)`` with ``V (n, k)``; ``op.to_scipy()`` is a ``scipy.sparse.linalg.LinearOperator``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from symgen import distributed
from symgen import functional as F
from symgen.curvature.double_backward import fast_double_backward, fast_double_backward_applies
from symgen.errors import ConfigError, ShapeError
from symgen.rng import Seed
from symgen.streaming import BatchStream, model_device

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

    from symgen.curvature.results import Eigenpairs, SpectralDensity, TraceEstimate

__all__ = ["CurvatureOperator", "MatrixOperator", "ModelOperator", "as_operator"]


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def as_operator(op: Any, caller: str) -> CurvatureOperator:
    """``op`` itself if it is a :class:`CurvatureOperator`; otherwise a ConfigError that says how to make one."""
    if not isinstance(op, CurvatureOperator):
        raise ConfigError(
            f"{caller}() takes a CurvatureOperator (HessianOperator, GGNOperator, or "
            f"MatrixOperator(A) for a symmetric matrix A); got {type(op).__name__}."
        )
    return op


class CurvatureOperator:
    """A symmetric ``n x n`` linear operator known through its products, like curvlinops' operators.

    Subclasses implement ``_matvec(v)`` (``v (n,)`` already in the operator's dtype and device) and
    may override ``_matmat(V)`` (columns ``V (n, k)``, ``k >= 1``) with a batched product. The
    public ``matvec``/``matmat`` check shapes, convert and count ``num_matvecs``. ``chunk_size``:
    how many probe vectors the estimators pass per ``matmat`` (None: all at once).
    """

    chunk_size: int | None = None

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"

    # -- products --

    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _matvec(v).")

    def _matmat(self, V: Tensor) -> Tensor:
        # the products are stacked as rows and returned transposed: estimators that pass V = Z.T for
        # probe rows Z get back exactly the rows they would have computed one by one
        return torch.stack([self._matvec(v.contiguous()) for v in V.T]).T

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat vector ``v (n,)``."""
        if not isinstance(v, Tensor) or v.shape != (self.dim,):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ShapeError(f"matvec expects a flat vector of shape ({self.dim},), got {got}.")
        v = v.to(dtype=self.dtype, device=self.device)
        self.num_matvecs += 1
        return self._matvec(v)

    def _columns(self, V: Tensor, caller: str, hint: str = ".") -> Tensor:
        """``V (n, k)`` in the operator's dtype and device, or a ShapeError naming ``caller``."""
        if not isinstance(V, Tensor) or V.ndim != 2 or V.shape[0] != self.dim:
            got = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ShapeError(f"{caller} expects columns V of shape ({self.dim}, k), got {got}{hint}")
        return V.to(dtype=self.dtype, device=self.device)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for columns ``V (n, k)``: A applied to each column."""
        V = self._columns(V, "matmat", "; vectors are columns (for rows R use op.matmat(R.T).T).")
        if V.shape[1] == 0:
            return V.clone()
        self.num_matvecs += V.shape[1]
        return self._matmat(V)

    def _quadratic_forms(self, V: Tensor) -> Tensor:
        return (V * self._matmat(V)).sum(0)

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """``v_i^T A v_i`` for the columns ``v_i`` of ``V (n, k)``, shape ``(k,)``: what Hutchinson-type
        trace estimators need (k products are counted; a Hessian takes them without products where it can)."""
        V = self._columns(V, "quadratic_forms")
        if V.shape[1] == 0:
            return V.new_zeros(0)
        self.num_matvecs += V.shape[1]
        return self._quadratic_forms(V)

    def __matmul__(self, V: Tensor) -> Tensor:
        """``A @ v`` for ``v (n,)`` or ``A @ V`` for columns ``V (n, k)``."""
        if isinstance(V, Tensor) and V.ndim == 1:
            return self.matvec(V)
        return self.matmat(V)

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out), e.g. for ``eigsh``."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(v).detach().to(device="cpu", dtype=torch.float64).numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
            return self.matmat(V).detach().to(device="cpu", dtype=torch.float64).numpy()

        # symmetric: the adjoint products are the products
        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)

    # -- estimates (see symgen.curvature.trace and symgen.curvature.lanczos) --

    def trace(
        self,
        num_probes: int = 100,
        generator: Seed = None,
        *,
        method: str = "hutchinson",
        deflation_steps: int | None = None,
        rtol: float | None = None,
        max_matvecs: int | None = None,
    ) -> TraceEstimate:
        """tr(A) with its standard error from about ``num_probes`` products.

        ``method``: "hutchinson" (Rademacher probes), "hutch++" (arXiv 2010.09649) or "deflated"
        (Lanczos-deflated Hutchinson, arXiv 2205.01736: far lower variance on network Hessians,
        whose trace is dominated by a few outliers). ``rtol`` (deflated only): add probes until
        stderr <= rtol |trace|, at most ``max_matvecs`` products. ``generator``: seed or generator (None = 0).
        """
        from symgen.curvature.trace import deflated_trace, hutchinson_trace, hutchpp_trace

        _check_positive("num_probes", num_probes)
        if method == "hutchinson":
            return hutchinson_trace(self, num_probes, generator=generator, block_size=self.chunk_size)
        if method == "hutch++":
            return hutchpp_trace(self, max(num_probes, 4), generator=generator)
        if method == "deflated":
            return deflated_trace(
                self,
                max(num_probes, 3),
                deflation_steps=deflation_steps,
                rtol=rtol,
                max_matvecs=max_matvecs,
                generator=generator,
            )
        raise ConfigError(f"method must be 'hutchinson', 'hutch++' or 'deflated', got '{method}'.")

    def eigenpairs(
        self,
        k: int = 1,
        which: str = "largest",
        *,
        tol: float = 1e-4,
        max_steps: int | None = None,
        generator: Seed = None,
        criterion: str = "residual",
    ) -> Eigenpairs:
        """The k largest or smallest eigenpairs (vectors as columns) by Lanczos (:func:`lanczos_eigenpairs`)."""
        from symgen.curvature.lanczos import lanczos_eigenpairs

        return lanczos_eigenpairs(
            self, k, which, tol=tol, max_steps=max_steps, generator=generator, criterion=criterion
        )

    def eigenvalues(
        self,
        k: int = 1,
        which: str = "largest",
        *,
        tol: float = 1e-4,
        max_steps: int | None = None,
        generator: Seed = None,
    ) -> Tensor:
        """The k largest (descending) or smallest (ascending) eigenvalues, Lanczos to ``tol`` relative."""
        return self.eigenpairs(k, which, tol=tol, max_steps=max_steps, generator=generator).values

    def density(self, num_steps: int = 80, num_runs: int = 1, generator: Seed = None) -> SpectralDensity:
        """The eigenvalue density by stochastic Lanczos quadrature (``num_runs`` x ``num_steps`` products)."""
        from symgen.curvature.lanczos import slq_density

        return slq_density(self, num_steps, num_runs, generator=generator)

    def dense(self, max_dim: int = 5000) -> Tensor:
        """The full matrix (n, n), from n products, symmetrized: for tiny operators and validation only."""
        if self.dim > max_dim:
            raise ConfigError(
                f"dense() builds an n x n matrix; n = {self.dim} > max_dim = {max_dim}. "
                "Use trace()/eigenvalues() or raise max_dim if you have the memory."
            )
        A = self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))
        return 0.5 * (A + A.T)


class MatrixOperator(CurvatureOperator):
    """A dense symmetric matrix ``A (n, n)`` as a :class:`CurvatureOperator` (tests, or a matrix you already have)."""

    def __init__(self, A: Tensor, *, chunk_size: int | None = None) -> None:
        if not isinstance(A, Tensor) or A.ndim != 2 or A.shape[0] != A.shape[1] or not A.is_floating_point():
            got = f"shape {tuple(A.shape)}, dtype {A.dtype}" if isinstance(A, Tensor) else type(A).__name__
            raise ShapeError(f"MatrixOperator needs a square floating-point matrix (n, n); got {got}.")
        if not torch.isfinite(A).all():
            raise ShapeError("MatrixOperator: the matrix has NaN or inf entries.")
        scale = float(A.abs().max()) if A.numel() else 0.0
        if float((A - A.T).abs().max() if A.numel() else 0.0) > 100 * torch.finfo(A.dtype).eps * max(scale, 1e-30):
            raise ShapeError(
                "MatrixOperator needs a symmetric matrix (the estimators assume A = A^T); "
                "pass 0.5 * (A + A.T) if the asymmetry is rounding."
            )
        super().__init__(A.shape[0], A.dtype, A.device)
        self.matrix = A
        self.chunk_size = chunk_size

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V


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
        process_group: Any = "auto",
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
        self._fast_double_backward = batching == "loop" and fast_double_backward_applies(self.device, self.dtype)

    @property
    def num_data(self) -> int:
        """N, the number of samples over all batches (and all ranks)."""
        if self._num_data is None:
            local = self.data.num_data
            if local is None:
                local = sum(x.shape[0] for x, _ in self.data)
            self._set_num_data(torch.tensor([float(local)], dtype=torch.float64, device=self.device))
        return self._num_data  # type: ignore[return-value]

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

    def _reduce(self, acc: Tensor, count: int) -> Tensor:
        """Sum ``acc`` (float64) and the sample count over ranks; normalize for ``reduction="mean"``
        (in place on one process: ``acc`` may be k parameter-sized vectors)."""
        if self.group is None:
            self._set_num_data(torch.tensor([float(count)], dtype=torch.float64))
            out = acc
        else:
            flat = torch.cat([acc.reshape(-1), torch.tensor([float(count)], dtype=torch.float64, device=acc.device)])
            flat = distributed.all_reduce_sum(flat, self.group, timeout_s=self.timeout_s)
            self._set_num_data(flat[-1:])
            out = flat[:-1].reshape(acc.shape)
        return out.div_(self._num_data) if self.reduction == "mean" else out

    def _weight(self, n_b: int) -> float:
        return float(n_b) if self.reduction == "mean" else 1.0

    def loss(self, params: F.Params | None = None) -> Tensor:
        """L at ``params`` (default the model's current parameters), accumulated in float64."""
        p = self.params if params is None else params
        acc, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        with torch.no_grad(), F.bn_mode(self.model, self.bn_mode):
            for x, y in self.data:
                acc += self._weight(x.shape[0]) * self._batch_loss(x, y)(p).double()
                count += x.shape[0]
        return self._reduce(acc, count).to(self.dtype)

    # -- products: the sum over batches --

    def _build_product(self, x: Tensor, y: Tensor) -> Callable[[F.Params], F.Params]:
        raise NotImplementedError(f"{type(self).__name__} must implement _build_product(x, y).")

    def _build(self, x: Tensor, y: Tensor) -> Callable[[F.Params], F.Params]:
        if self._fast_double_backward:
            try:
                with fast_double_backward():
                    return self._build_product(x, y)
            except RuntimeError as e:
                # the model flattens a channels-last feature map with .view: PyTorch's kernels from now on
                if "view size is not compatible" not in str(e):
                    raise
                self._fast_double_backward = False
        return self._build_product(x, y)

    def _build_forms(self, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor] | None:
        """Subclass hook, called when ``self.taylor``: ``rows (k, n) -> (z_i^T A_b z_i)_i`` for one batch
        without products, or None (then ``self.taylor`` is False from now on)."""
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
        count = 0
        with F.bn_mode(self.model, self.bn_mode):
            for b, (x, y) in enumerate(self.data):
                if self.batching == "vmap":
                    # canonical strides: an input with a size-1 channel axis can also look channels-last,
                    # and convolution backward under vmap cannot handle that layout
                    x = x.clone(memory_format=torch.contiguous_format)
                fn = self._product(b, x, y)  # built outside vmap: requires_grad_ is not allowed inside it
                self._accumulate(acc, fn, rows, self._weight(x.shape[0]))
                count += x.shape[0]
                del fn
        return self._reduce(acc, count).to(self.dtype).T

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v[:, None])[:, 0]

    def _quadratic_forms(self, V: Tensor) -> Tensor:
        rows = V.T.contiguous()
        acc = torch.zeros(rows.shape[0], dtype=torch.float64, device=self.device)
        count = 0
        with F.bn_mode(self.model, self.bn_mode):
            for b, (x, y) in enumerate(self.data):
                acc.add_(self._batch_forms(b, x, y, rows), alpha=self._weight(x.shape[0]))
                count += x.shape[0]
        return self._reduce(acc, count).to(self.dtype)

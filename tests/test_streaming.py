"""Streaming over DataLoaders: operators, noise stability, the NTK and evaluation give the numbers of the whole
dataset in one tensor (dense references, brute-force loops), whatever the batch size; bad loaders fail clearly."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd.functional import hessian
from torch.utils.data import DataLoader, TensorDataset

from symgen import functional as F
from symgen.curvature import GGNOperator, HessianOperator
from symgen.errors import ConfigError, MemoryBudgetError, ShapeError
from symgen.evaluation import evaluate
from symgen.metrics import noise_stability
from symgen.ntk import empirical_ntk, empirical_ntk_fn
from symgen.robust import pgd
from symgen.streaming import BatchStream

D = torch.float64


def _data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()
    with torch.no_grad():  # non-trivial running statistics
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def _dense_hessian(model, x, y):
    params = F.params_of(model)
    keys = list(params)
    flat = F.flatten(params)

    def loss(v):
        return TF.cross_entropy(F.call(model, F.unflatten(v, params), None, x), y)

    assert keys
    return hessian(loss, flat)


def test_hessian_and_ggn_on_a_dataloader_match_dense_matrices_for_any_batch_size():
    model, (x, y) = _model(), _data()
    Hd = _dense_hessian(model, x, y)
    V = torch.randn(Hd.shape[0], 3, dtype=D, generator=torch.Generator().manual_seed(1))
    ref = Hd @ V
    ggn_ref = GGNOperator(model, TF.cross_entropy, (x, y)).matmat(V)
    traces, tops = [], []
    for bs in (1, 5, 23):
        loader = DataLoader(TensorDataset(x, y), batch_size=bs)
        H = HessianOperator(model, TF.cross_entropy, loader)
        torch.testing.assert_close(H.matmat(V), ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(H.matvec(V[:, 0]), ref[:, 0], rtol=1e-10, atol=1e-12)
        assert H.num_data == 23 and not H.cache_graph
        with torch.no_grad():
            ref_loss = float(TF.cross_entropy(model(x), y))
        assert abs(float(H.loss()) - ref_loss) <= 1e-12 * ref_loss
        G = GGNOperator(model, TF.cross_entropy, loader, batching="vmap", chunk_size=2)
        torch.testing.assert_close(G.matmat(V), ggn_ref, rtol=1e-10, atol=1e-12)
        traces.append(H.trace(20, generator=3).value)
        tops.append(float(H.eigenvalues(1, tol=1e-8, generator=4)[0]))
    # the same seed gives the same estimates whatever the batch size (up to round-off)
    assert max(traces) - min(traces) <= 1e-9 * abs(traces[0])
    assert max(tops) - min(tops) <= 1e-9 * abs(tops[0])
    assert abs(tops[0] - float(torch.linalg.eigvalsh(Hd)[-1])) <= 1e-6 * abs(tops[0])


def test_stream_holds_one_batch_at_a_time():
    model, (x, y) = _model(), _data(12)
    alive: list[weakref.ref] = []

    class Loader:  # a lazily generated dataset: each batch is a fresh tensor
        passes = 0

        def __iter__(self):
            Loader.passes += 1
            for i in range(0, 12, 4):
                xb = x[i : i + 4].clone()
                assert sum(r() is not None for r in alive) <= 1, "an earlier batch is still held"
                alive.append(weakref.ref(xb))
                yield xb, y[i : i + 4]
                gc.collect()

    H = HessianOperator(model, TF.cross_entropy, Loader())
    v = torch.ones(H.dim, dtype=D)
    H.matvec(v)
    H.matvec(v)
    assert Loader.passes == 2  # iterated afresh per product, never materialized


def test_noise_stability_and_ntk_and_evaluation_on_loaders_match_whole_tensors():
    model, (x, y) = _model(), _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    whole = noise_stability(model, TF.cross_entropy, (x, y), 0.05, 8, generator=2)
    streamed = noise_stability(model, TF.cross_entropy, loader, 0.05, 8, generator=2)
    assert abs(whole.value - streamed.value) <= 1e-12 + 1e-9 * abs(whole.value)
    assert abs(whole.clean_loss - streamed.clean_loss) <= 1e-12
    # brute-force reference: the loss at W + U for each draw, in a loop
    train = noise_stability(model, TF.cross_entropy, loader, 0.05, 4, generator=2, bn_mode="train")
    assert train.num_samples == 4

    for method in ("jacobian", "structured"):
        ref = empirical_ntk(model, x, method=method)
        kernel = empirical_ntk_fn(model, method=method)
        torch.testing.assert_close(kernel(loader), ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            kernel(loader, DataLoader(TensorDataset(x[:7]), batch_size=3)), ref[:, :7], rtol=1e-10, atol=1e-12
        )
        # a memory budget that forces blocks of samples gives the same kernel
        small = empirical_ntk(model, x, method=method, memory_budget=40_000)
        torch.testing.assert_close(small, ref, rtol=1e-10, atol=1e-12)
    full = empirical_ntk_fn(model, output="full")
    torch.testing.assert_close(full(loader), empirical_ntk(model, x, output="full"), rtol=1e-10, atol=1e-12)

    ev = evaluate(model, loader, eps=(0.0, 0.1), steps=3, random_start=False, loss_fn=TF.cross_entropy)
    adv = pgd(model, x, y, 0.1, None, 3, random_start=False, loss="auto")
    assert ev.num_data == 23
    assert ev.clean_accuracy == pytest.approx(float((model(x).argmax(1) == y).double().mean()), abs=1e-12)
    assert ev.robust_accuracy[0.0] == pytest.approx(ev.clean_accuracy, abs=1e-12)
    assert ev.robust_accuracy[0.1] == pytest.approx(float((model(adv).argmax(1) == y).double().mean()), abs=1e-12)
    assert ev.loss == pytest.approx(float(TF.cross_entropy(model(x), y).detach()), rel=1e-12)
    ev1 = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=23), eps=(0.1,), steps=3, random_start=False)
    assert ev1.robust_accuracy[0.1] == ev.robust_accuracy[0.1]  # batch size does not change the numbers


class _Shifting:
    """Batches whose per-sample shape or dtype changes midway."""

    def __init__(self, change):
        self.change = change

    def __iter__(self):
        x, y = _data(8)
        yield x[:4], y[:4]
        yield self.change(x[4:]), y[4:]


def test_bad_loaders_and_devices_give_clear_errors():
    model = _model()
    with pytest.raises(ShapeError, match="per-sample"):
        HessianOperator(model, TF.cross_entropy, _Shifting(lambda t: t[:, :, :4])).matvec(torch.ones(81, dtype=D))
    with pytest.raises(ShapeError, match="per-sample"):
        HessianOperator(model, TF.cross_entropy, _Shifting(lambda t: t.float())).matvec(torch.ones(81, dtype=D))
    empty = DataLoader(TensorDataset(*_data(0)), batch_size=4)
    with pytest.raises(ShapeError, match="no samples"):
        HessianOperator(model, TF.cross_entropy, empty).matvec(torch.ones(81, dtype=D))
    with pytest.raises(ShapeError, match="no samples"):
        noise_stability(model, TF.cross_entropy, empty, 0.1, 4)
    with pytest.raises(ShapeError, match="no samples"):
        evaluate(model, empty)
    with pytest.raises(ShapeError, match="batch 0"):
        list(BatchStream([("a", "b")]))
    with pytest.raises(ShapeError):
        BatchStream(3.0)
    # a model spread over devices, an input on another device than the model
    spread = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1, device="meta"))
    with pytest.raises(ConfigError, match="several devices"):
        HessianOperator(spread, TF.mse_loss, (torch.ones(3, 2), torch.ones(3, 1)))
    meta = nn.Linear(4, 2, device="meta")
    with pytest.raises(ConfigError, match="device"):
        pgd(meta, torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(ConfigError, match="device"):
        empirical_ntk(meta, torch.zeros(3, 4))
    # a memory budget below one block says what it needs
    big = nn.Linear(1000, 10).double()
    with pytest.raises(MemoryBudgetError, match="at least"):
        empirical_ntk(big, torch.randn(4, 1000, dtype=D), memory_budget=1000)

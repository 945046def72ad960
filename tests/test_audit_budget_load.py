"""The audit's time budget at any load: a clock that stops before a block it cannot finish, accuracy measured
until the clock stops it (a uniform subsample, said so), orbits in blocks, one thread when it is faster, the
figures drawn inside the budget, and a flag that says why when the fixed costs alone exceed it."""

import time

import pytest
import torch
from torch import nn

from symgen.audit import Section, audit, overrun_note, registry
from symgen.audit.planning import choose_threads
from symgen.audit.registry import Clock


def _digits(n):
    from symgen.data import load_dataset

    x, y = load_dataset("digits", "train")
    return x[:n], y[:n]


class Slow(nn.Module):
    """A user's classifier whose every forward pass takes ``pause`` seconds (a large model on a busy box)."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.pause = pause

    def forward(self, x):
        time.sleep(self.pause)
        return self.net(x)


class Slowing(nn.Module):
    """A classifier that gets 20x slower after its first ``calls`` forward passes (load arriving mid-audit):
    ``pause`` seconds per sample, then 20 ``pause``."""

    def __init__(self, pause: float, calls: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.pause, self.calls = pause, calls

    def forward(self, x):
        self.calls -= 1
        time.sleep(self.pause * x.shape[0] * (1 if self.calls >= 0 else 20))
        return self.net(x)


def test_the_clock_stops_before_a_block_that_would_end_past_the_deadline():
    clock = Clock(deadline=time.perf_counter() + 0.5)
    time.sleep(0.3)  # a first block of 0.3 s: a second one would end at 0.6 > 0.5
    assert clock.expired()
    relaxed = Clock(deadline=time.perf_counter() + 5.0)
    time.sleep(0.05)
    assert not relaxed.expired() and not Clock().expired()


def test_accuracy_is_measured_until_the_clock_stops_it_on_a_uniform_subsample():
    x, y = _digits(600)
    data = {"train": (x[:100], y[:100]), "test": (x[100:], y[100:])}
    res = audit(Slow(0.15), data, budget=3.0, sections=["performance"], limits={"batch_size": 10})
    perf = res["performance"]
    acc = perf.values["test_accuracy"]
    n = int(acc.note.split(" of ")[0])
    assert 10 <= n < 500 and "500 samples (in random order)" in acc.note, acc.note
    assert any("stopped at its share" in f for f in perf.flags), perf.flags
    assert res.seconds <= 1.25 * 3.0, res.seconds
    # the order is a seeded permutation: the same seed measures the same samples (up to the clock's cut)
    assert acc.stderr == pytest.approx((acc.value * (1 - acc.value) / n) ** 0.5, rel=1e-9)


def test_the_headline_accuracy_is_measured_whole_when_there_is_time():
    x, y = _digits(300)
    data = {"train": (x[:100], y[:100]), "test": (x[100:], y[100:])}
    res = audit(Slow(0.0), data, budget=60.0, sections=["performance"], limits={"batch_size": 10})
    assert res["performance"].values["test_accuracy"].note.startswith("200 samples, the whole split")
    assert not res["performance"].flags
    # the same numbers as one batch of everything (the order measured in does not change a sum)
    with torch.no_grad():
        out = Slow(0.0)(x[100:])
    acc = float((out.argmax(1) == y[100:]).double().mean())
    assert res.value("performance", "test_accuracy") == pytest.approx(acc, abs=1e-12)


def test_a_slow_section_in_blocks_keeps_the_whole_audit_near_its_budget():
    def run(sec, ctx):
        done = 0
        for i in range(200):  # 200 blocks of 0.25 s: 50 s of work against a 4 s budget
            if i > 0 and ctx.clock.expired():
                ctx.clock.stop(f"{done} of 200 blocks")
                break
            time.sleep(0.25)
            done += 1
        sec.add("blocks", float(done))

    budget = 4.0
    x, y = _digits(200)
    with registry.registered(Section("blocks", "Blocks", run, cost=lambda lim, t, s: 0.01, share=0.5, run_rank=15)):
        t0 = time.perf_counter()
        res = audit(Slow(0.0), (x, y), budget=budget, sections=["performance", "blocks"])
        wall = time.perf_counter() - t0
    assert wall <= 1.25 * budget, wall
    assert res["blocks"].status == "ok" and 1 <= res.value("blocks", "blocks") < 200
    assert any("stopped at its share" in f for f in res["blocks"].flags)


def test_orbits_are_measured_in_blocks_until_the_clock_stops_them():
    x, y = _digits(400)
    res = audit(
        Slowing(0.0005, calls=16),  # planned at 0.8 s of orbits, then 13 blocks of 1.3 s against about 4 s
        (x, y),
        "c4",
        budget=60.0,
        sections=["invariance"],
        limits={"invariance_num_data": 400, "batch_size": 32, "time_limit": 4.0},
    )
    inv = res["invariance"]
    assert inv.status == "ok" and inv.samples < 400 and any("orbits of" in f for f in inv.flags), (inv.flags, inv)
    assert 1 <= inv.values["osp"].value <= 4


class ThreadSensitive(nn.Module):
    """A model that is slow on several threads (as on a loaded machine) or on one (as on a quiet one)."""

    def __init__(self, slow_on_many: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.slow_on_many = slow_on_many

    def forward(self, x):
        many = torch.get_num_threads() > 1
        time.sleep(0.05 if many == self.slow_on_many else 0.0)
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("slow_on_many", [True, False])
def test_choose_threads_picks_the_faster_count_and_restores_it(slow_on_many):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, _ = _digits(16)
        threads, many, one = choose_threads(ThreadSensitive(slow_on_many), x)
        assert torch.get_num_threads() == 2
        assert threads == (1 if slow_on_many else 2), (many, one)
        assert (many > one) == slow_on_many
        torch.set_num_threads(1)
        assert choose_threads(ThreadSensitive(slow_on_many), x)[0] == 1
    finally:
        torch.set_num_threads(before)


def test_the_audit_runs_on_the_faster_thread_count_and_restores_the_users():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, y = _digits(100)
        res = audit(ThreadSensitive(True), (x, y), budget=30.0, sections=["performance"])
        assert res.threads == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_figures_are_drawn_inside_the_budget_and_written_as_drawn(tmp_path):
    from symgen.audit.figures import draw_figures

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    x, y = _digits(120)
    lim = {"hessian_num_data": 40, "hutchinson_probes": 4, "eigen_iters": 6, "density_runs": 1, "density_steps": 8}
    res = audit(model, (x, y), "c4", budget=60.0, sections=["performance", "invariance", "hessian"], limits=lim)
    assert res.figures is None  # not asked: drawn when the run is written
    res = audit(
        model, (x, y), "c4", budget=60.0, sections=["performance", "invariance", "hessian"], limits=lim, figures=True
    )
    assert set(res.figures) == {"invariance", "hessian"}
    assert all(png.startswith(b"\x89PNG") for png in res.figures.values())
    assert "figures" not in res.to_dict()
    paths = draw_figures(res, tmp_path)
    assert {p.read_bytes() for p in paths} == set(res.figures.values())


def test_a_figure_the_budget_leaves_no_time_for_is_not_drawn_and_said_so():
    from symgen.audit.registry import get
    from symgen.audit.result import SectionResult
    from symgen.audit.schedule import _draw

    res = audit(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), _digits(64), "c4", sections=["invariance"])
    res.figures = {}
    sec: SectionResult = res["invariance"]
    spent = _draw(get("invariance"), sec, res, end=time.perf_counter() - 1.0, last=0.5)
    assert spent == 0.5 and res.figures == {} and "figure not drawn: the time budget ran out" in sec.skipped


def test_an_audit_past_its_budget_says_why():
    assert overrun_note(70.0, 60.0, 10.0, 0.5) == ""
    note = overrun_note(95.0, 60.0, 56.0, 0.04)
    assert "95 s, over 1.25x its 60 s budget" in note and "4% of a CPU" in note and "56 s went to starting up" in note
    assert overrun_note(95.0, 0.0, 56.0, 0.04) == ""


def test_the_command_counts_its_budget_from_the_process_start():
    from symgen.cli_audit import process_start

    age = time.perf_counter() - process_start()
    assert 0.0 < age < 3600.0

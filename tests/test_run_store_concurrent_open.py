"""Processes that open a fresh run store at the same moment: one index, every run in it, no errors.

Before the index was created and checked under a lock, three `symgen run` processes started together on a new
``--out`` raced: one took another's half-created (0-byte) index for damaged, set it aside under that process's
open transaction, and that process failed with "disk I/O error" before its run began."""

import multiprocessing as mp

import pytest

from symgen.runs.store import RunStore

WORKERS = 6


def _open_and_index(root: str, barrier, queue) -> None:
    try:
        barrier.wait(30)
        store = RunStore(root)
        store._index.upsert({"id": f"run-{mp.current_process().name}", "status": "done"})
        queue.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        queue.put(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("attempt", range(3))
def test_processes_opening_a_fresh_store_at_once_share_one_index(tmp_path, attempt):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(WORKERS), ctx.Queue()
    root = tmp_path / "runs"
    procs = [ctx.Process(target=_open_and_index, args=(str(root), barrier, queue)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    outcomes = [queue.get(timeout=10) for _ in procs]
    assert outcomes == ["ok"] * WORKERS, outcomes
    assert not list(root.glob("index.sqlite.corrupt-*")), "a healthy index was set aside as damaged"
    assert len(RunStore(root)._index.rows()) == WORKERS

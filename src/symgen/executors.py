"""Executors of an experiment's trials: in this process, a local process pool, or a Ray cluster.

Each yields ``(index, result)`` as trials finish; the run store's context caches every result.
A pool's workers never outlive the process that runs the pool: on Linux the kernel kills them when
it dies (``PR_SET_PDEATHSIG``), elsewhere they notice within a second that their parent is gone;
an interrupted run stops them at once (:meth:`Executor.abort`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from symgen.errors import ConfigError
from symgen.experiments.base import num_threads

__all__ = ["Executor", "InProcessExecutor", "PoolExecutor", "RayExecutor", "make_executor"]


class Executor:
    """Runs trial functions; yields ``(index, result)`` as trials finish."""

    name = "inprocess"

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Apply ``fn`` to each item.

        Args:
            fn: a pure, picklable, module-level function of one item.
            items: the trials' settings.

        Returns:
            ``(index, result)`` pairs, as the trials finish.
        """
        for i, item in enumerate(items):
            yield i, fn(item)

    def close(self) -> None:
        """Release the executor's workers (nothing to release in process)."""

    def abort(self) -> None:
        """Stop at once: the trials still running are abandoned (an interrupted or failed run)."""
        self.close()


class InProcessExecutor(Executor):
    """Trials one after another in this process (the default; deterministic, no pickling)."""


class PoolExecutor(Executor):
    """Trials in a local process pool (spawned workers, each limited to one BLAS thread).

    Args:
        workers: the number of processes (default: one per CPU).
    """

    name = "pool"

    def __init__(self, workers: int | None = None):
        import multiprocessing as mp

        self.workers = workers or max(1, (os.cpu_count() or 2))
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(), 1)
        )

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Submit every item to the pool.

        Args:
            fn: a pure, picklable, module-level function of one item.
            items: the trials' settings.

        Returns:
            ``(index, result)`` pairs, as the trials finish.
        """
        futures = {self._pool.submit(fn, item): i for i, item in enumerate(items)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()

    def close(self) -> None:
        """Shut the pool down, cancelling the trials not started."""
        self._pool.shutdown(cancel_futures=True)

    def abort(self) -> None:
        """Terminate the workers (their trials are abandoned), then shut the pool down."""
        processes = dict(getattr(self._pool, "_processes", None) or {})
        for proc in processes.values():
            try:
                proc.terminate()
            except (OSError, ValueError):
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent: int, threads: int) -> None:
    """A pool worker's start: one BLAS thread, and death with its parent (the kernel's, else a watcher's)."""
    num_threads(threads)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills this worker when its parent dies
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="symgen-parent-watch", daemon=True).start()


class RayExecutor(Executor):
    """Trials as Ray tasks on a cluster (``ray start --head``; extra ``symgen[ray]``).

    Args:
        address: the cluster's address (None: a local Ray).
        num_cpus_per_trial: the CPUs Ray reserves for each trial.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus_per_trial: float = 1.0):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'symgen[ray]'.") from None
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        self._cpus = num_cpus_per_trial

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Run every item as a Ray task.

        Args:
            fn: a pure, picklable, module-level function of one item.
            items: the trials' settings.

        Returns:
            ``(index, result)`` pairs, as the trials finish.
        """
        ray = self._ray
        remote = ray.remote(num_cpus=self._cpus)(fn)
        refs = {remote.remote(item): i for i, item in enumerate(items)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield refs[done[0]], ray.get(done[0])


def make_executor(name: str = "inprocess", workers: int | None = None, ray_address: str | None = None) -> Executor:
    """The executor ``--executor NAME`` names.

    Args:
        name: inprocess, pool or ray.
        workers: the processes of a pool.
        ray_address: the Ray cluster's address.

    Returns:
        The executor.
    """
    if name == "inprocess":
        return InProcessExecutor()
    if name == "pool":
        return PoolExecutor(workers)
    if name == "ray":
        return RayExecutor(ray_address)
    raise ConfigError(f"unknown executor '{name}'; choose inprocess, pool or ray.")

"""The shell's run store: run directories (:mod:`symgen.runs.rundir`), their locks (:mod:`symgen.runs.locks`)
and their SQLite index (:mod:`symgen.runs.index`, :mod:`symgen.runs.store`), experiments
run into it with trial checkpoints (:mod:`symgen.runs.execution`), audits stored as runs
(:mod:`symgen.runs.audits`), and the executors trials run on (:mod:`symgen.executors`).
"""

from __future__ import annotations

from symgen.executors import Executor, InProcessExecutor, PoolExecutor, RayExecutor, make_executor
from symgen.runs.audits import AuditConfig, run_audit, write_audit_run
from symgen.runs.execution import RunContext, RunOutcome, execute, load_run_config, write_report
from symgen.runs.locks import RunLock
from symgen.runs.store import STATES, RunDir, RunStore, config_hash, share_mode

__all__ = [
    "RunDir",
    "RunStore",
    "RunLock",
    "STATES",
    "RunContext",
    "Executor",
    "InProcessExecutor",
    "PoolExecutor",
    "RayExecutor",
    "make_executor",
    "RunOutcome",
    "execute",
    "write_report",
    "load_run_config",
    "config_hash",
    "share_mode",
    "AuditConfig",
    "run_audit",
    "write_audit_run",
]

"""Runs `symgen` with the store toy registered, and an optional crash point (SYMGEN_STORE_FAULT):

register: SIGKILL right after the run directory appears, before the index learns of it.
before-report: SIGKILL after claims.json is written, before report.html.
"""

import os
import signal
import sys

from symgen.experiments import REGISTRY

REGISTRY["storetoy"] = "run_store_toy"


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


fault = os.environ.get("SYMGEN_STORE_FAULT")
if fault == "register":
    from symgen.runs.store import RunStore

    RunStore._index_write = _die
elif fault == "before-report":
    import symgen.runs.execution

    symgen.runs.execution.write_report = _die

if __name__ == "__main__":
    from symgen.cli import main

    sys.exit(main(sys.argv[1:]))

"""SAM, ASAM, NSO (both paths) and UnitNormSGD under DistributedDataParallel: 2 gloo processes on CPU, each
on half of the batch, end where one process ends on the whole batch (SAM's ascent direction is the
all-reduced gradient; NSO's vectorized estimate is averaged over the processes)."""

import subprocess
import sys
from pathlib import Path

import ddp_optim_worker as worker
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path):
    proc = subprocess.run([sys.executable, str(Path(worker.__file__)), str(tmp_path)], timeout=240,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, y = worker.data()
    for name in worker.NAMES:
        model = worker.net()
        worker.train(name, model, x, y)
        ref = model.state_dict()
        init = worker.net().state_dict()
        for k, v in ref.items():
            assert not torch.equal(v, init[k]) or "bias" in k or name == "unit_norm"
            for r in range(2):
                torch.testing.assert_close(ranks[r][name][k], v, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, name=name, k=k, r=r: f"{name} rank {r} {k}: {m}")

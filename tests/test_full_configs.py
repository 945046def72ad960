"""Full mode is reachable for every experiment: its full config builds and validates (on cpu and cuda), is
at least as large as its quick one, and a device this machine lacks is a clear one-line error, not a
traceback. Nothing here runs an experiment."""

import pytest
import torch

from symgen.cli import main
from symgen.experiments import REGISTRY, build_config, get_experiment
from symgen.experiments.base import _COUNT_NAMES, _COUNT_SUFFIXES


def _is_count(name: str) -> bool:
    return name in _COUNT_NAMES or name.endswith(_COUNT_SUFFIXES) or name.startswith("num_")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_full_config_is_valid_and_at_least_the_quick_one(name):
    exp = get_experiment(name)
    for device in ("cpu", "cuda"):
        full = build_config(exp.config, device=device)  # the defaults: the full setting
        assert full.device == device
        assert type(full).model_validate(full.model_dump()) == full  # a stored config reloads as itself
        if exp.validate is not None and device == "cpu":
            exp.validate(full)
    full, quick = build_config(exp.config), build_config(exp.config, quick=exp.quick)
    assert quick != full, f"{name}: --quick changes nothing"
    for key in exp.quick:
        q, f = getattr(quick, key), getattr(full, key)
        if f is None and _is_count(key):  # None = all of it
            continue
        if _is_count(key) and isinstance(q, (int, float)) and not isinstance(q, bool):
            assert f >= q, f"{name}.{key}: full {f} < quick {q}"
        elif isinstance(q, list) and q and all(isinstance(v, str) for v in q):
            assert set(q) <= set(f), f"{name}.{key}: quick {q} not within full {f}"  # datasets, methods
        elif isinstance(q, list) and q and all(isinstance(v, (int, float)) for v in q):
            assert len(f) >= len(q) and max(f) >= max(q), f"{name}.{key}: full {f} smaller than quick {q}"


@pytest.mark.parametrize("args", [["run", "flat-minima", "--full"], ["reproduce", "--full"]])
def test_cuda_without_cuda_is_a_clear_error(args, tmp_path, capsys):
    if torch.cuda.is_available():  # pragma: no cover - a GPU machine accepts the device (and would run it all)
        from symgen.cli import _check_device

        _check_device("cuda")
        return
    out = tmp_path / "store"
    code = main(args + ["--device", "cuda", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device" in err and "--device cpu" in err and "Traceback" not in err
    assert not (out / "index.sqlite").exists()  # nothing was started


def test_run_quick_and_full_exclude_each_other(tmp_path, capsys):
    assert main(["run", "flat-minima", "--quick", "--full", "--out", str(tmp_path)]) == 2
    assert "exclude each other" in capsys.readouterr().err

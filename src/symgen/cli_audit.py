"""``symgen audit``: audit a trained model into the run store (under torchrun: data-parallel, rank 0
writes the run), and the text an audit prints.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from symgen.cli_common import JsonOpt, OutOpt, check_device, emit, say
from symgen.distributed import DEFAULT_TIMEOUT_S, Group
from symgen.errors import ConfigError

if TYPE_CHECKING:
    pass

__all__ = ["audit", "audit_lines", "process_start", "torchrun_group"]


def audit(
    model: str = typer.Option(
        ...,
        "--model",
        help="MODULE:FACTORY (a dotted module or path/to/file.py) "
        "whose FACTORY() returns the nn.Module; literal arguments "
        "may follow: 'pkg.mod:build(\"cnn\", width=8)'.",
    ),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="State-dict file to load into the model."),
    data: str = typer.Option(..., "--data", help="Dataset: digits, mnist1d, mnist, fashion-mnist, cifar10."),
    root: Path | None = typer.Option(None, "--root", help="Directory with the dataset files (mnist, cifar10)."),
    action: str = typer.Option("none", "--action", help="Group action for invariance: c4, d4, shift or none."),
    budget: str = typer.Option(
        "quick",
        "--budget",
        help="quick (about a minute on a CPU, whatever the model), "
        "full, or a number of seconds: each section's work is "
        "sized to it.",
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    seed: int = typer.Option(0, "--seed", help="Seed of subsamples, probes, noise draws and attacks."),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Override a budget limit: key=value, e.g. ntk_num_data=100 (repeatable; see symgen.audit.AuditLimits).",
    ),
    output: str | None = typer.Option(
        None,
        "--output",
        help="Which output of the model holds the logits when it returns a tuple, a dict or an object: "
        "a position (0, 1, ...), a dict key or an attribute name (default: a tuple's first tensor, "
        "key 'logits' or a dict's only tensor, the .logits attribute).",
    ),
    collective_timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S,
        "--collective-timeout",
        help="Under torchrun: the longest wait, in seconds, of any collective for the other ranks; a rank "
        "that died or hangs then stops every rank with one error.",
    ),
    out: Path = OutOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Audit a trained model: accuracy, invariance, scale symmetries, curvature, noise stability, NTK, PGD."""
    import yaml

    from symgen import distributed
    from symgen.audit.limits import current_limit_names
    from symgen.audit.outputs import parse_output

    if not collective_timeout > 0:
        raise ConfigError(f"--collective-timeout must be > 0 seconds, got {collective_timeout:g}.")
    if device is not None:
        check_device(device)
    limits: dict[str, Any] = {}
    for item in set_:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        try:
            limits[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value '{raw}': {e}") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        limits = current_limit_names(limits)  # a former limit name: a one-line warning, then the current one
    for w in caught:
        say(f"warning: {w.message}", err=True)
    t0 = time.time()
    group = torchrun_group(device, collective_timeout)
    lead = group is None or distributed.rank(group) == 0

    def progress(title: str) -> None:
        if lead:
            say(f"  [{time.time() - t0:5.1f} s] {title}", err=True)

    try:
        from symgen.runs import run_audit

        result, run = run_audit(
            model,
            data,
            checkpoint=checkpoint,
            action=action,
            budget=budget,
            root=root,
            device=device,
            seed=seed,
            out=out,
            limits=limits,
            progress=progress,
            process_group=group,
            output=parse_output(output),
            collective_timeout_s=collective_timeout,
            started=process_start(),
        )
    finally:
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if run is None:  # another rank than 0 under torchrun: rank 0 writes the run and prints
        return
    if as_json:
        emit({"run": run.id, "path": str(run.path), "report": str(run.path / "report.html"), **result.to_dict()})
        return
    say(audit_lines(result.to_dict()))
    say(f"report: {run.path / 'report.html'}")


def torchrun_group(device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Under torchrun (RANK and WORLD_SIZE in the environment, more than one process): the initialized
    default process group (NCCL on CUDA, gloo on CPU), each rank on its local GPU; else None.

    Args:
        device: the ``--device`` option (a cuda device selects NCCL).
        timeout_s: the longest wait of every collective (``--collective-timeout``).

    Returns:
        The default group, or None outside torchrun.
    """
    import os

    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from symgen import distributed

    backend = "nccl" if device is not None and device.startswith("cuda") else "gloo"
    return distributed.init_process_group(backend, timeout_s=timeout_s)


def process_start() -> float:
    """The ``time.perf_counter()`` reading at this process's start (Linux ``/proc``; elsewhere: now), so
    that an audit's time budget counts the imports and the model's loading too.

    Returns:
        A ``time.perf_counter()`` value.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter()
    return time.perf_counter() - min(max(age, 0.0), 3600.0)


def audit_lines(data: dict[str, Any]) -> str:
    """The text ``symgen audit`` and ``symgen runs show`` print for an audit: one row per value.

    Args:
        data: the audit's ``audit.json`` (:meth:`symgen.audit.AuditResult.to_dict`).

    Returns:
        A header line and a table.
    """
    from symgen.audit import AuditResult
    from symgen.audit.precision import flag_text, resolve_seconds
    from symgen.terminal import text_table

    result = AuditResult.from_dict(data)
    rows = []
    flagged = False
    for name, sec in result.sections.items():
        if sec.status != "ok" and not sec.values:
            rows.append((name, sec.status, "-", "-", f"{sec.seconds:.1f}", "; ".join(sec.skipped)))
            continue
        partial = sec.coverage is not None and sec.coverage < 1
        for i, (metric, est) in enumerate(sec.values.items()):
            err = "-" if est.stderr is None else f"{est.stderr:.2g}"
            text = flag_text(est, sec.seconds)
            flag = text.split(" (")[0] if text else ""
            need = resolve_seconds(est, sec.seconds)
            if flag and need is not None:
                flag += f" (~{need:.3g} s)"
            flagged = flagged or bool(flag)
            rows.append(
                (
                    name if i == 0 else "",
                    metric,
                    f"{est.value:.4g}",
                    err,
                    f"{sec.seconds:.1f}" if i == 0 else "",
                    flag or ("PARTIAL" if i == 0 and partial else ""),
                )
            )
    threads = "" if result.threads is None else f", {result.threads} thread{'s' if result.threads != 1 else ''}"
    head = (
        f"audit of {result.model} on {result.data} ({result.seconds:.1f} s, budget {result.budget}, "
        f"{result.num_params} parameters{threads})"
    )
    warnings = [f"warning: {f}" for f in result.flags]
    warnings += [f"warning: {s.name}: {f}" for s in result.sections.values() for f in s.flags]
    legend = (
        "\nNOT RESOLVED: stderr > |value|/2; IMPRECISE: stderr above the section's precision target; "
        "(~N s): the section's seconds that would meet it (stderr ~ 1/sqrt(samples))"
        if flagged
        else ""
    )
    return (
        "\n".join([head, *warnings])
        + "\n"
        + text_table(["section", "metric", "value", "stderr", "seconds", "flag"], rows)
        + legend
    )

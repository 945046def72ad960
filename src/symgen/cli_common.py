"""What every ``symgen`` subcommand shares: plain output (never shortened, no markup), one JSON document on
stdout, the ``--out`` and ``--json`` options, and the device check made before anything runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from symgen.errors import ConfigError
from symgen.terminal import printable

__all__ = ["OutOpt", "JsonOpt", "SEED_HELP", "say", "emit", "check_device"]

OutOpt = typer.Option(Path("runs"), "--out", help="Run store root directory.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout instead of text.")
SEED_HELP = (
    "Sets the experiment config's `seed` field (data splits, initializations, noise draws and "
    "subsamples derive from it); default: the config's seed (0)."
)


def say(text: str = "", *, err: bool = False) -> None:
    """Print plain text (never shortened, no markup; control characters shown as visible escapes).

    Args:
        text: the text; a newline is added.
        err: write to stderr instead of stdout.
    """
    stream = sys.stderr if err else sys.stdout
    stream.write(printable(text) + "\n")
    stream.flush()


def emit(obj: Any) -> None:
    """Print ``obj`` as one JSON document on stdout (``--json``).

    Args:
        obj: JSON-able values.
    """
    from symgen.terminal import dump_json

    dump_json(obj)


def check_device(device: str) -> None:
    """A :class:`ConfigError` for a device this machine lacks or torch does not know.

    Args:
        device: cpu, cuda or cuda:N.
    """
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but this PyTorch has no CUDA device; use --device cpu.")
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device '{device}'; use cpu, cuda or cuda:N.") from None

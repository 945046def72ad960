"""What the audit flags about the model and its data before measuring: an output count that does not
match the classes, inputs that look like raw 0-255 pixels; and a section that analysed only part of
the model. A flag is one line in the terminal and an entry of ``flags`` in ``audit.json`` and the page."""

from __future__ import annotations

import torch

from symgen.audit.splits import Split
from symgen.errors import ShapeError

__all__ = ["DATASET_CLASSES", "data_flags", "coverage_flag"]

#: The classes of the datasets the audit loads by name.
DATASET_CLASSES = {"digits": 10, "mnist1d": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10}


def data_flags(outputs: int, splits: dict[str, Split], dataset: str) -> list[str]:
    """The flags of a model with ``outputs`` logits on ``splits``; labels beyond the outputs are an error.

    Args:
        outputs: the number of logits the model returns per input.
        splits: the audit's splits by name ("data", or "train" and "test").
        dataset: the dataset's name ("custom" for data given as tensors or a loader).

    Returns:
        One line per flag.

    Raises:
        ShapeError: when a label is at least ``outputs`` (the model cannot classify it).
    """
    flags: list[str] = []
    seen = max(s.num_classes for s in splits.values())
    if seen > outputs:
        raise ShapeError(
            f"the labels go up to {seen - 1} but the model has {outputs} outputs: it cannot classify them; "
            "audit a classifier with one logit per class (or pick the logits with --output)."
        )
    declared = DATASET_CLASSES.get(dataset) or next(
        (s.declared_classes for s in splits.values() if s.declared_classes), None
    )
    if declared is not None and declared != outputs:
        flags.append(
            f"class count: the model has {outputs} outputs but the data declares {declared} classes; "
            "accuracy and the NTK alignment are measured over all outputs (a head for another dataset?)"
        )
    elif declared is None and seen < outputs:
        flags.append(
            f"class count: the model has {outputs} outputs but the labels span only 0..{seen - 1}; "
            "check that the model was trained on this data"
        )
    for name, s in splits.items():
        lo, hi = s.bounds
        if s.source_dtype == torch.uint8 or hi > 2.0:
            what = "uint8" if s.source_dtype == torch.uint8 else "float"
            flags.append(
                f"input scale: the {name} inputs are {what} values in [{lo:g}, {hi:g}]; the model probably "
                "expects [0, 1] or normalized inputs (divide by 255 / apply the training transform)"
            )
    return flags


def coverage_flag(analysed: int, total: int, what: str) -> str | None:
    """A flag for a section whose analysis covered only ``analysed`` of ``total`` parameters.

    Args:
        analysed: the parameters (scalars) the analysis covered.
        total: all parameters of the model.
        what: why the rest was not covered, in a few words.

    Returns:
        The flag, or None when everything was covered.
    """
    if total <= 0 or analysed >= total:
        return None
    return (
        f"partial: analysed {analysed} of {total} parameters ({analysed / total:.0%}); {what}; "
        "the values describe the analysed part only"
    )

"""symgen.labels against hand-computed values: centred one-hot targets, per-row correctness, accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from symgen.errors import ShapeError, SymgenError
from symgen.labels import accuracy, centred_one_hot, correct


def test_centred_one_hot_matches_hand_computed_targets():
    y = torch.tensor([0, 2, 1])
    out = centred_one_hot(y, 3, dtype=torch.float64)
    third = 1.0 / 3.0
    expected = torch.tensor(
        [[1 - third, -third, -third], [-third, -third, 1 - third], [-third, 1 - third, -third]], dtype=torch.float64
    )
    assert out.dtype == torch.float64
    assert torch.equal(out, expected)
    assert torch.allclose(out.sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-15)  # rows sum to zero


def test_centred_one_hot_two_classes_and_default_dtype():
    out = centred_one_hot(torch.tensor([1, 0]), 2)
    assert out.dtype == torch.get_default_dtype()
    assert out.tolist() == [[-0.5, 0.5], [0.5, -0.5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_centred_one_hot_refuses_non_integer_labels(dtype):
    with pytest.raises(ShapeError, match="integer"):
        centred_one_hot(torch.tensor([0, 1]).to(dtype), 2)
    assert issubclass(ShapeError, SymgenError)


def test_correct_rows_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.2, 0.9], [float("nan"), 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 0])
    # row 0: argmax 0 == 0; row 1: argmax 1 != 2; row 2: argmax 2 == 2; row 3: non-finite counts as wrong
    assert correct(logits, labels).tolist() == [True, False, True, False]


def test_correct_broadcasts_over_leading_dims():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (2 members, 2 rows, 2 classes)
    labels = torch.tensor([0, 1])
    assert correct(logits, labels).tolist() == [[True, True], [False, True]]


def test_accuracy_by_hand():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, float("inf")]])
    labels = torch.tensor([0, 0, 0, 1])
    # correct: rows 0 and 2; row 1 wrong; row 3 has a non-finite logit -> wrong: 2 / 4
    acc = accuracy(logits, labels)
    assert isinstance(acc, float)
    assert acc == 0.5


def test_accuracy_of_no_rows_is_nan():
    assert math.isnan(accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


@pytest.mark.parametrize(
    "logits, labels",
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long)),  # logits not (n, C)
        (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long)),  # one label short
        (torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long)),  # labels not (n,)
        (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long)),  # a leading dim: use correct()
    ],
)
def test_accuracy_refuses_wrong_shapes(logits, labels):
    with pytest.raises(ShapeError, match="expected logits"):
        accuracy(logits, labels)

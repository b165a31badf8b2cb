"""Tests for nnunet_sam.losses.matching (Hungarian matching per slice)."""

import itertools

import numpy as np
import pytest
import torch

from nnunet_sam.losses.matching import linear_assignment, match_slices


def _brute_force_min(cost: np.ndarray, classes: np.ndarray) -> float:
    """Minimum total cost over all injective maps from the present classes to the queries."""
    best = np.inf
    for queries in itertools.permutations(range(cost.shape[0]), len(classes)):
        best = min(best, float(cost[list(queries), classes].sum()))
    return best


def test_match_slices_equals_brute_force_on_random_problems():
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_slices = int(rng.integers(1, 4))
        num_queries = int(rng.integers(1, 7))
        num_classes = int(rng.integers(1, 6))
        cost = rng.normal(size=(num_slices, num_queries, num_classes))
        present = np.zeros((num_slices, num_classes), dtype=bool)
        for s in range(num_slices):
            count = int(rng.integers(0, min(num_queries, num_classes) + 1))
            present[s, rng.choice(num_classes, size=count, replace=False)] = True

        slice_idx, query_idx, class_idx = match_slices(torch.from_numpy(cost).float(), torch.from_numpy(present))
        assert slice_idx.dtype == query_idx.dtype == class_idx.dtype == torch.long
        assert len(slice_idx) == len(query_idx) == len(class_idx) == int(present.sum())
        for s in range(num_slices):
            sel = slice_idx.numpy() == s
            queries, classes = query_idx.numpy()[sel], class_idx.numpy()[sel]
            # one-to-one, only present classes, every present class matched
            assert len(set(queries.tolist())) == len(queries)
            assert sorted(classes.tolist()) == np.flatnonzero(present[s]).tolist()
            assert np.all((queries >= 0) & (queries < num_queries))
            total = float(cost[s, queries, classes].sum())
            expected = _brute_force_min(cost[s], np.flatnonzero(present[s]))
            assert total == pytest.approx(expected, abs=1e-5)


def test_match_slices_too_many_classes_raises():
    cost = torch.zeros(2, 2, 4)
    present = torch.tensor([[True, False, False, False], [True, True, True, False]])
    with pytest.raises(ValueError, match="number of queries must be raised"):
        match_slices(cost, present)


def test_match_slices_empty_present_gives_no_matches():
    cost = torch.randn(3, 4, 5)
    present = torch.zeros(3, 5, dtype=torch.bool)
    slice_idx, query_idx, class_idx = match_slices(cost, present)
    assert slice_idx.numel() == query_idx.numel() == class_idx.numel() == 0
    present[1, 2] = True
    slice_idx, query_idx, class_idx = match_slices(cost, present)
    assert slice_idx.tolist() == [1]
    assert class_idx.tolist() == [2]
    assert query_idx.tolist() == [int(cost[1, :, 2].argmin())]


def test_match_slices_nan_cost_does_not_crash():
    cost = torch.tensor([[[float("nan"), 0.0], [1.0, 2.0]]])
    slice_idx, query_idx, class_idx = match_slices(cost, torch.tensor([[True, True]]))
    assert len(slice_idx) == 2 and len(set(query_idx.tolist())) == 2


@pytest.mark.parametrize("shape", [(3, 3), (2, 5), (5, 2), (4, 0), (0, 3)])
def test_linear_assignment_shapes(shape):
    cost = torch.rand(*shape, dtype=torch.float16)
    rows, cols = linear_assignment(cost)
    assert rows.dtype == cols.dtype == torch.long
    assert len(rows) == len(cols) == min(shape)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)


def test_linear_assignment_optimal():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = linear_assignment(cost)
    assert float(cost[rows, cols].sum()) == 5.0  # 1 + 2 + 2

"""Hungarian (minimum-cost bipartite) matching between predicted queries and ground-truth segments."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# Finite stand-in for NaN / inf costs: scipy rejects NaN, and a diverged forward pass should reach the loss
# (and the GradScaler's inf/NaN check) instead of crashing inside the matcher.
_INVALID_COST = 1e8


def _assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's linear_sum_assignment on a (Q, T) float64 array, robust to empty and non-finite inputs."""
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    cost = np.nan_to_num(cost, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=-_INVALID_COST)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def linear_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment between the rows and columns of ``cost``.

    Arguments:
      cost (Tensor): (Q, T) cost matrix on any device and of any dtype (converted to float64 on the CPU).
        Q < T, Q > T and T == 0 are all allowed; NaN / inf entries are replaced by a large finite cost.

    Returns:
      rows (Tensor): (k,) int64 row indices, k = min(Q, T), sorted ascending.
      cols (Tensor): (k,) int64 column indices, ``cols[i]`` is assigned to ``rows[i]``.
      Both are on ``cost.device``.
    """
    assert cost.dim() == 2, f"cost must have shape (Q, T), got {tuple(cost.shape)}"
    rows, cols = _assign(cost.detach().to("cpu", torch.float64).numpy())
    return torch.from_numpy(rows).to(cost.device), torch.from_numpy(cols).to(cost.device)


def match_slices(cost: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-slice minimum-cost matching between N queries and the classes present in each slice.

    Arguments:
      cost (Tensor): (S, N, C) cost of assigning query n to ground-truth class c in slice s.
      present (Tensor): (S, C) bool, which classes occur in each slice; absent columns are never matched.

    Returns:
      slice_idx, query_idx, class_idx (Tensor): (K,) int64 each, on ``cost.device``, K = number of present
        (slice, class) pairs. Within each slice every present class gets exactly one distinct query.

    Raises:
      ValueError: if a slice has more present classes than there are queries.
    """
    assert cost.dim() == 3, f"cost must have shape (S, N, C), got {tuple(cost.shape)}"
    assert present.shape == (cost.shape[0], cost.shape[2]), (
        f"present must have shape (S, C) = {(cost.shape[0], cost.shape[2])}, got {tuple(present.shape)}"
    )
    num_slices, num_queries, _ = cost.shape
    present_np = present.detach().to("cpu", torch.bool).numpy()
    counts = present_np.sum(axis=1)
    if num_slices > 0 and counts.max() > num_queries:
        raise ValueError(
            f"a slice contains {int(counts.max())} ground-truth segments but the model has only "
            f"{num_queries} queries; the number of queries must be raised to at least the maximum number of "
            "classes per slice"
        )
    cost_np = cost.detach().to("cpu", torch.float64).numpy()

    slice_parts, query_parts, class_parts = [], [], []
    for s in range(num_slices):  # the Hungarian algorithm itself is sequential (scipy)
        classes = np.flatnonzero(present_np[s])
        if classes.size == 0:
            continue
        rows, cols = _assign(cost_np[s][:, classes])
        slice_parts.append(np.full(rows.shape, s, dtype=np.int64))
        query_parts.append(rows)
        class_parts.append(classes[cols])

    def to_tensor(parts: list[np.ndarray]) -> Tensor:
        array = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(array.astype(np.int64)).to(cost.device)

    return to_tensor(slice_parts), to_tensor(query_parts), to_tensor(class_parts)

"""Learnable per-slice (depth) positional embeddings, zero at initialisation."""

from __future__ import annotations

import torch
from torch import nn


class DepthPositionalEmbedding(nn.Module):
    """One learnable vector per slice index, added to every token of that slice.

    Works on channels-last tokens (V * depth, h, w, C) and on channels-first maps (V * depth, C, h, w).
    """

    def __init__(self, depth: int, dim: int) -> None:
        super().__init__()
        self.depth = depth
        self.embedding = nn.Parameter(torch.zeros(depth, dim))

    def forward(self, x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
        """Add the embedding of slice ``i % depth`` to row i of x."""
        assert x.shape[0] % self.depth == 0, f"batch {x.shape[0]} is not a multiple of depth {self.depth}"
        e = self.embedding.to(x.dtype)
        shape = (1, self.depth, 1, 1, -1) if channels_last else (1, self.depth, -1, 1, 1)
        v = x.view(x.shape[0] // self.depth, self.depth, *x.shape[1:])
        return (v + e.view(shape)).view(x.shape)

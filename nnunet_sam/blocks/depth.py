"""Learnable per-slice (depth) positional embeddings, zero at initialisation."""

from __future__ import annotations

import torch
from torch import nn

from nnunet_sam.blocks.adapters import unfold_depth


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
        e = self.embedding.to(x.dtype)
        shape = (1, self.depth, 1, 1, -1) if channels_last else (1, self.depth, -1, 1, 1)
        return (unfold_depth(x, self.depth) + e.view(shape)).view(x.shape)

"""PanSAM's 3D aggregator: a few 3D convolutions over the stacked per-slice scores of neighbouring slices."""

from __future__ import annotations

import torch
from torch import nn


class SliceAggregator3D(nn.Module):
    """Refines per-slice logits (B, 1, D, H, W) with 3x3x3 convolutions across slices; same shape out.

    Residual: output = input + correction, and the last (1x1x1) convolution starts at zero, so an untrained
    aggregator passes the per-slice scores through unchanged. Each 3x3x3 layer widens the view by one slice on
    each side (``layers`` slices in all directions at the output).
    """

    def __init__(self, hidden: int = 16, layers: int = 2) -> None:
        super().__init__()
        assert layers >= 1, f"the aggregator needs at least one 3x3x3 layer, got {layers}"
        convs: list[nn.Module] = []
        channels = 1
        for _ in range(layers):
            convs += [nn.Conv3d(channels, hidden, 3, padding=1), nn.LeakyReLU(0.01)]
            channels = hidden
        self.body = nn.Sequential(*convs)
        self.out = nn.Conv3d(hidden, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.layers = layers

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, 1, D, H, W) per-slice logits -> aggregated logits (B, 1, D, H, W)."""
        assert scores.dim() == 5 and scores.shape[1] == 1, f"expected (B, 1, D, H, W) scores, got {tuple(scores.shape)}"
        return scores + self.out(self.body(scores))

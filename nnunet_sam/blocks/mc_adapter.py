"""MC-Adapter: per-class binary mask logits -> multi-class logits."""

from __future__ import annotations

import torch
from torch import nn


def binary_to_multiclass(binary: torch.Tensor) -> torch.Tensor:
    """(S, K, H, W) foreground logits -> (S, K + 1, H, W) logits with a zero background logit.

    softmax of the result treats every foreground class as an independent sigmoid against background.
    """
    return torch.cat([torch.zeros_like(binary[:, :1]), binary], dim=1)


class MCAdapter(nn.Module):
    """Inverted bottleneck of convs on the stacked per-class logits of one slice, residual to
    :func:`binary_to_multiclass`; the last conv starts at zero, so the adapter starts as that mapping."""

    def __init__(self, num_foreground: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(num_foreground, hidden, 3, padding=1),
            nn.InstanceNorm2d(hidden, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(hidden, num_foreground + 1, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, binary: torch.Tensor) -> torch.Tensor:
        """binary: (S, K, H, W) -> (S, K + 1, H, W)."""
        return binary_to_multiclass(binary) + self.net(binary)

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
    """Inverted bottleneck of convs on the stacked per-class logits of one slice, residual to the plain mapping
    (:func:`binary_to_multiclass` for foreground-only prompts, the identity when background was prompted too); the
    last conv starts at zero, so the adapter starts as that mapping."""

    def __init__(self, num_foreground: int, hidden: int = 32, background_prompted: bool = False) -> None:
        super().__init__()
        self.background_prompted = background_prompted
        num_inputs = num_foreground + 1 if background_prompted else num_foreground
        self.net = nn.Sequential(
            nn.Conv2d(num_inputs, hidden, 3, padding=1),
            nn.InstanceNorm2d(hidden, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(hidden, num_foreground + 1, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, binary: torch.Tensor) -> torch.Tensor:
        """binary: (S, K, H, W) foreground logits, or (S, K + 1, H, W) with background first -> (S, K + 1, H, W)."""
        base = binary if self.background_prompted else binary_to_multiclass(binary)
        return base + self.net(binary)

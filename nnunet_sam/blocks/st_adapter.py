"""ST-Adapter (Pan et al., "ST-Adapter: Parameter-Efficient Image-to-Video Transfer Learning", NeurIPS 2022).

A bottleneck whose middle is a depth-wise 3D convolution over the (depth, h, w) token grid, so a frozen 2D ViT
mixes neighbouring slices (frames there): ``x + up(dwconv3d(down(x)))``, one per ViT block, nothing between the
projections but the convolution (no activation, as the authors' public code). The convolution spans depth only
(kernel (3, 1, 1), the authors' ViT-B configurations) and starts at zero, so a fresh adapter adds nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_sam.blocks.adapters import unfold_depth


class STAdapter(nn.Module):
    """``dim -> dim * ratio`` (Linear) -> depth-wise Conv3d ``kernel`` -> ``dim`` (Linear), added to the input.

    ``forward(x, depth)``: x (V * depth, h, w, dim), the ``depth`` consecutive depth tokens of V volumes -> same
    shape. The convolution pads to keep the grid and never mixes volumes.
    """

    def __init__(self, dim: int, ratio: float = 0.5, kernel: tuple[int, int, int] = (3, 1, 1)) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel, padding=tuple(k // 2 for k in kernel), groups=hidden)
        self.up = nn.Linear(hidden, dim)
        for tensor in (self.conv.weight, self.conv.bias, self.down.bias, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        assert x.dim() == 4, f"STAdapter needs tokens on a (h, w) grid, got shape {tuple(x.shape)}"
        h = unfold_depth(self.down(x), depth).permute(0, 4, 1, 2, 3)  # (V, hidden, depth, h, w)
        h = self.conv(h).permute(0, 2, 3, 4, 1).reshape(*x.shape[:-1], -1)
        return x + self.up(h)

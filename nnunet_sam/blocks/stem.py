"""Modality stem: any number of input channels at the patch size -> 3 channels at the SAM input size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ModalityStem(nn.Module):
    """Inverted bottleneck M -> hidden -> 3 channels that also resizes patch_size -> input_size.

    When ``input_size / patch_size`` is a power of two > 1 the resize is learned (stride-2 transposed
    convolutions, as the public MaskSAM ACDC setting); otherwise the hidden features are interpolated
    bilinearly.
    """

    def __init__(self, in_channels: int, patch_size: int, input_size: int, hidden: int = 32) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.input_size = input_size
        self.expand = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.InstanceNorm2d(hidden, affine=True),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GELU(),
        )
        ratio = input_size / patch_size
        steps = round(math.log2(ratio)) if ratio > 1 else 0
        self.learned_upsampling = ratio > 1 and 2**steps == ratio
        self.upsample = nn.Sequential(
            *[
                layer
                for _ in range(steps if self.learned_upsampling else 0)
                for layer in (nn.ConvTranspose2d(hidden, hidden, 2, stride=2), nn.GELU())
            ]
        )
        self.project = nn.Conv2d(hidden, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (S, M, patch, patch) -> (S, 3, input_size, input_size)."""
        assert x.shape[-2:] == (self.patch_size, self.patch_size), (
            f"stem expects {self.patch_size}x{self.patch_size} slices, got {tuple(x.shape[-2:])}"
        )
        h = self.upsample(self.expand(x))
        if h.shape[-1] != self.input_size:
            h = F.interpolate(h, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.project(h)


class PlainStem(nn.Module):
    """No learned modality adaptation: the mean over input channels, repeated to 3, resized bilinearly.

    The "without MAdapter" setting of the Self-Prompt-SAM ablation.
    """

    def __init__(self, patch_size: int, input_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (S, M, patch, patch) -> (S, 3, input_size, input_size)."""
        x = x.mean(1, keepdim=True)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return x.expand(-1, 3, -1, -1)

"""Lightweight 3D CNN mask decoder with multi-layer aggregation (3DSAM-adapter).

The (prompt-conditioned) neck embedding and the token maps of intermediate encoder blocks, each projected by a
1x1x1 conv, are concatenated on the token grid and fused; stages of (3D conv, instance norm, ReLU, trilinear
upsampling) then bring the features to the patch resolution, where (3D conv, IN, ReLU, 3D conv) gives the
class logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_in_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3x3 conv -> instance norm -> ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.ReLU(inplace=True),
    )


class AggregatingMaskDecoder3D(nn.Module):
    """embedding (B, E, T, g, g) + features [(B, F, T, g, g)] -> logits (B, num_classes, *out_shape).

    ``num_stages`` upsampling stages (log2 of the ViT patch size) double the in-plane size each; depth grows by
    2 per stage until it reaches the output depth, and the last stage lands exactly on ``out_shape``.
    """

    def __init__(
        self,
        embed_dim: int,
        feature_dim: int,
        num_features: int,
        num_classes: int,
        num_stages: int,
        width: int = 128,
        feature_width: int = 32,
        min_width: int = 16,
    ) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv3d(feature_dim, feature_width, 1) for _ in range(num_features))
        self.fuse = conv_in_relu(embed_dim + num_features * feature_width, width)
        widths = [max(min_width, width // 2**i) for i in range(num_stages + 1)]
        self.stages = nn.ModuleList(conv_in_relu(widths[i], widths[i + 1]) for i in range(num_stages))
        self.head = nn.Sequential(conv_in_relu(widths[-1], widths[-1]), nn.Conv3d(widths[-1], num_classes, 1))

    def forward(
        self, embedding: torch.Tensor, features: Sequence[torch.Tensor], out_shape: Sequence[int]
    ) -> torch.Tensor:
        assert len(features) == len(self.projections), f"{len(features)} features for {len(self.projections)} inputs"
        x = torch.cat([embedding] + [p(f) for p, f in zip(self.projections, features)], dim=1)
        x = self.fuse(x)
        t, g = x.shape[2], x.shape[-1]
        for i, stage in enumerate(self.stages, start=1):
            last = i == len(self.stages)
            side = min(g * 2**i, out_shape[-1])  # a SAM input larger than the patch: never beyond the patch
            size = tuple(out_shape) if last else (min(t * 2**i, out_shape[0]), side, side)
            x = F.interpolate(stage(x), size=size, mode="trilinear", align_corners=False)
        return self.head(x)


def conv_norm_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3x3 conv without bias -> instance norm (not affine) -> ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.InstanceNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class MultiLevelMaskDecoder3D(nn.Module):
    """3DSAM-adapter's multi-level aggregation head: levels [(B, E, T, g, g)] + image (B, M, D, P, P) -> logits
    (B, num_classes, *out_shape).

    Each level passes two (3x3x3 conv, IN, ReLU) of ``width`` channels and is upsampled x2 (trilinear) to
    (2T, 2g, 2g); the levels and the image resized to that grid are concatenated, a (conv, IN, ReLU) and a 3x3x3
    conv give the class logits, trilinearly resized to ``out_shape``.
    """

    def __init__(self, embed_dim: int, num_levels: int, image_channels: int, num_classes: int, width: int = 128):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(conv_norm_relu(embed_dim, width), conv_norm_relu(width, width)) for _ in range(num_levels)
        )
        self.head = nn.Sequential(
            conv_norm_relu(num_levels * width + image_channels, width),
            nn.Conv3d(width, num_classes, 3, padding=1, bias=False),
        )

    def forward(self, levels: Sequence[torch.Tensor], image: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
        assert len(levels) == len(self.levels), f"{len(levels)} levels for a decoder of {len(self.levels)}"
        grid = tuple(2 * n for n in levels[0].shape[2:])
        up = [F.interpolate(m(x), size=grid, mode="trilinear", align_corners=True) for m, x in zip(self.levels, levels)]
        small = F.interpolate(image.to(up[0].dtype), size=grid, mode="trilinear", align_corners=False)
        logits = self.head(torch.cat(up + [small], dim=1))
        return F.interpolate(logits, size=tuple(out_shape), mode="trilinear", align_corners=True)

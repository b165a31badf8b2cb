"""Prompt generators: learned decoders from multi-level ViT features to auxiliary masks, boxes and tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv -> instance norm -> leaky ReLU, twice (nnU-Net's stage block)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.InstanceNorm2d(out_channels, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.InstanceNorm2d(out_channels, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class FeaturePyramidDecoder(nn.Module):
    """Hierarchical decoder from ViT token maps at grid g to the SAM input resolution g * patch_size.

    Level 0 processes the neck output at g. Level i (1..log2(patch_size)) upsamples the previous level x2
    with a transposed conv and concatenates the i-th deepest block feature, projected and brought to the
    same resolution by one transposed conv of stride 2**i; levels without a feature left use the upsampled
    path alone. ``embed_dim`` is the width of the block features: one for all, or one per feature (shallow ->
    deep; hierarchical encoders such as TinyViT have blocks of different widths).
    """

    def __init__(
        self,
        embed_dim: int | Sequence[int],
        neck_dim: int,
        num_features: int,
        patch_size: int,
        width: int = 256,
        min_width: int = 16,
    ) -> None:
        super().__init__()
        num_levels = int(math.log2(patch_size))
        assert 2**num_levels == patch_size, f"patch size {patch_size} must be a power of two"
        self.widths = [max(min_width, width // 2**i) for i in range(num_levels + 1)]
        self.num_skips = min(num_features, num_levels)
        deep_dims = [embed_dim] * self.num_skips if isinstance(embed_dim, int) else list(reversed(embed_dim))
        assert len(deep_dims) >= self.num_skips, f"{len(deep_dims)} feature widths for {self.num_skips} features"
        self.stem = conv_block(neck_dim, self.widths[0])
        self.up = nn.ModuleList()
        self.skip = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i in range(1, num_levels + 1):
            c_prev, c = self.widths[i - 1], self.widths[i]
            self.up.append(nn.ConvTranspose2d(c_prev, c, 2, stride=2))
            has_skip = i <= self.num_skips
            if has_skip:
                self.skip.append(nn.ConvTranspose2d(deep_dims[i - 1], c, 2**i, stride=2**i))
            self.blocks.append(conv_block(2 * c if has_skip else c, c))

    def forward(self, neck: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """neck (S, neck_dim, g, g), features [(S, g, g, embed_dim)] shallow -> deep.

        Returns the output of every level, coarse to fine: [(S, widths[i], g * 2**i, g * 2**i)].
        """
        deep_first = [f.permute(0, 3, 1, 2) for f in reversed(features)][: self.num_skips]
        x = self.stem(neck)
        levels = [x]
        for i, (up, block) in enumerate(zip(self.up, self.blocks)):
            x = up(x)
            if i < len(deep_first):
                x = torch.cat([x, self.skip[i](deep_first[i])], dim=1)
            x = block(x)
            levels.append(x)
        return levels


@dataclass
class PromptProposals:
    """Output of a prompt generator for S slices and N queries."""

    masks: torch.Tensor  # (S, N, H, W) auxiliary mask logits at the SAM input resolution
    boxes: torch.Tensor | None  # (S, N, 4) learned boxes, normalised (x1, y1, x2, y2) in [0, 1]
    tokens: torch.Tensor | None  # (S, N, token_dim) auxiliary classifier tokens


def _pooled_head(in_features: int, out_features: int, hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))


class MaskBoxPromptGenerator(nn.Module):
    """MaskSAM's prompt generator: N auxiliary masks, N learned boxes and N auxiliary classifier tokens.

    Masks come from a 1x1 conv on the finest pyramid level. Boxes: every level is average-pooled to 2x2,
    the results are concatenated and an MLP maps them to N boxes. Tokens: the same with 1x1 pooling.
    """

    def __init__(
        self, pyramid: FeaturePyramidDecoder, num_queries: int, token_dim: int, predict_boxes: bool = True
    ) -> None:
        super().__init__()
        self.pyramid = pyramid
        self.num_queries = num_queries
        self.token_dim = token_dim
        widths = pyramid.widths
        self.mask_head = nn.Conv2d(widths[-1], num_queries, 1)
        self.box_head = _pooled_head(4 * sum(widths), 4 * num_queries) if predict_boxes else None
        self.token_head = _pooled_head(sum(widths), token_dim * num_queries)

    def forward(self, neck: torch.Tensor, features: list[torch.Tensor]) -> PromptProposals:
        levels = self.pyramid(neck, features)
        s, n = neck.shape[0], self.num_queries
        masks = self.mask_head(levels[-1])
        pooled1 = torch.cat([nn.functional.adaptive_avg_pool2d(x, 1).flatten(1) for x in levels], dim=1)
        tokens = self.token_head(pooled1).view(s, n, self.token_dim)
        boxes = None
        if self.box_head is not None:
            pooled2 = torch.cat([nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) for x in levels], dim=1)
            cxcywh = torch.sigmoid(self.box_head(pooled2).view(s, n, 4).float())
            half = cxcywh[..., 2:] / 2
            boxes = torch.cat([cxcywh[..., :2] - half, cxcywh[..., :2] + half], dim=-1).clamp(0, 1)
        return PromptProposals(masks=masks, boxes=boxes, tokens=tokens)


class MultiScaleMaskGenerator(nn.Module):
    """Self-Prompt-SAM's MSPGenerator: one auxiliary mask per class at every pyramid level.

    A 1x1 conv head per level gives class logits; every level is deeply supervised, the finest one (at the
    SAM input resolution) is the prompt source. With a pyramid built from no block features
    (``num_features=0``) this is the paper's stacked-CNN generator (ablation S1).
    """

    def __init__(self, pyramid: FeaturePyramidDecoder, num_classes: int) -> None:
        super().__init__()
        self.pyramid = pyramid
        self.heads = nn.ModuleList(nn.Conv2d(w, num_classes, 1) for w in pyramid.widths)

    def forward(self, neck: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Class logits per level, coarse to fine: [(S, num_classes, g * 2**i, g * 2**i)]."""
        return [head(x) for head, x in zip(self.heads, self.pyramid(neck, features))]

"""Med-Adapter (Wang et al., "Med-Tuning: Exploring Parameter-Efficient Transfer Learning for Medical Volumetric
Segmentation", arXiv 2304.10880, 2023).

A bottleneck after every ViT block whose middle enhances the features within a stage (intra-stage) with
multi-scale 3D depth-wise convolutions, each factorised into an in-plane (1, k, k) and a through-plane (k, 1, 1)
convolution, followed by batch norm and ReLU, the scales summed and fused by a 1x1x1 convolution. The adapter after
the last block of a stage also merges the previous stage's enhanced feature (inter-stage interaction: a 1x1x1
projection of it, concatenated, fused by a 1x1x1 convolution) and passes its own on to the next stage; the first
stage's previous feature is zero. The bottleneck: ``down`` -> GELU -> enhancement with a skip -> ``up`` -> GELU,
added to the block's output. Not included: the Fourier-transform branch of the paper's later versions and of the
authors' code (see docs/presets.md). ``up`` starts at zero, so a fresh adapter adds nothing (GELU(0) = 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sam.blocks.adapters import unfold_depth
from nnunet_sam.blocks.checkpointing import recomputing


class BatchNorm3dOncePerStep(nn.BatchNorm3d):
    """BatchNorm3d whose running statistics are not updated again when a checkpointed block is recomputed in
    backward (:func:`~nnunet_sam.blocks.checkpointing.recomputing`): checkpointing changes memory, never results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and recomputing()):
            return super().forward(x)
        # batch statistics as in the first pass; momentum 0 leaves the running statistics as they are
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.0, self.eps)


def _multi_scale_branch(channels: int, k: int) -> nn.Sequential:
    """Depth-wise (1, k, k) then (k, 1, 1) convolution, BatchNorm3d, ReLU on (V, channels, depth, h, w)."""
    return nn.Sequential(
        nn.Conv3d(channels, channels, (1, k, k), padding=(0, k // 2, k // 2), groups=channels),
        nn.Conv3d(channels, channels, (k, 1, 1), padding=(k // 2, 0, 0), groups=channels),
        BatchNorm3dOncePerStep(channels),
        nn.ReLU(),
    )


class MedAdapter(nn.Module):
    """``forward(x, depth, carry)``: x (V * depth, h, w, dim) -> (same shape, carry).

    ``carry`` (V, dim * ratio, depth, h, w) or None: the enhanced feature of the previous stage's last adapter.
    With ``inter_stage`` (the adapter after a stage's last block) it is merged and replaced by this adapter's;
    otherwise passed on unchanged.
    """

    def __init__(
        self, dim: int, ratio: float = 0.5, inter_stage: bool = False, kernels: tuple[int, ...] = (3, 5)
    ) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.inter_stage = inter_stage
        self.down = nn.Linear(dim, hidden)
        self.scales = nn.ModuleList(_multi_scale_branch(hidden, k) for k in kernels)
        self.fuse = nn.Conv3d(hidden, hidden, 1)
        self.previous: nn.Conv3d | None = None
        self.merge: nn.Conv3d | None = None
        if inter_stage:
            self.previous = nn.Conv3d(hidden, hidden, 1)
            self.merge = nn.Conv3d(2 * hidden, hidden, 1)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(
        self, x: torch.Tensor, depth: int, carry: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert x.dim() == 4, f"MedAdapter needs tokens on a (h, w) grid, got shape {tuple(x.shape)}"
        h = unfold_depth(F.gelu(self.down(x)), depth).permute(0, 4, 1, 2, 3)  # (V, hidden, depth, h, w)
        enhanced = self.fuse(sum(scale(h) for scale in self.scales))
        if self.merge is not None and self.previous is not None:
            previous = torch.zeros_like(enhanced) if carry is None else carry
            enhanced = self.merge(torch.cat([enhanced, self.previous(previous)], dim=1))
            carry = enhanced
        h = (h + enhanced).permute(0, 2, 3, 4, 1).reshape(*x.shape[:-1], -1)
        return x + F.gelu(self.up(h)), carry

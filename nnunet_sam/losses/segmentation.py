"""Segmentation losses on dense logits: nnU-Net's deep-supervised CE + Dice (Self-Prompt-SAM, 3DSAM-adapter),
PanSAM's focal + Dice, and RadSAM's Dice + BCE with the oracle multi-mask choice."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import Tensor, nn

from nnunet_sam.losses.set_criterion import dice_loss
from nnunet_sam.prompting.radsam_prompts import MIN_LABEL_PIXELS, structure_masks


def downsample_target(target: Tensor, size: Sequence[int]) -> Tensor:
    """Label map (B, 1, *spatial) -> (B, 1, *size) by the label at each output cell's centre, as nnU-Net's own
    deep-supervision targets (batchgeneratorsv2's ``DownsampleSegForDSTransform``, ``nearest-exact``).

    Plain ``nearest`` takes the first pixel of each cell instead (224 -> 14: columns 0, 16, 32, ...), which shifts
    coarse targets by half a cell (7.5 px at 14x14) against the logits they supervise.
    """
    return F.interpolate(target.float(), size=tuple(size), mode="nearest-exact")


class DeepSupervisedSegLoss(nn.Module):
    """nnU-Net's CE + soft Dice on multi-class logits, over deep-supervision levels and a final output.

    ``forward(outputs, target)``: outputs["aux"] is a list of class logits (B, C, D, r, r) coarse to fine
    (weights 2**i normalised, the finest weighs most, targets resized by :func:`downsample_target`); when
    outputs has "logits" (B, C, D, P, P), its CE + Dice is added with weight 1 (Self-Prompt-SAM's stage 2).
    A 2d target (B, 1, P, P) is treated as D = 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dc_ce = DC_and_CE_loss(
            {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=1,
            dice_class=MemoryEfficientSoftDiceLoss,
        )

    def forward(self, outputs: dict, target: Tensor) -> Tensor:
        assert not isinstance(target, (list, tuple)), "pass one target tensor (deep supervision is done here)"
        if target.dim() == 4:
            target = target[:, :, None]
        target = target.float()
        levels = outputs["aux"]
        weights = [2.0**i for i in range(len(levels))]
        loss = 0.0
        for w, logits in zip(weights, levels):
            t = target if logits.shape[2:] == target.shape[2:] else downsample_target(target, logits.shape[2:])
            loss = loss + w / sum(weights) * self.dc_ce(logits.float(), t)
        if "logits" in outputs:
            loss = loss + self.dc_ce(outputs["logits"].float(), target)
        return loss


class FocalDiceLoss(nn.Module):
    """PanSAM's loss: sigmoid focal loss (gamma 2, mean over voxels) + ``beta`` * soft Dice loss (per volume).

    ``forward(outputs, target)``: outputs["logits"] (B, 1, D, P, P) target logits; target (B, 1, D, P, P) nnU-Net
    label map, compared as ``target == target_label`` (the reference, never the network's own output).
    """

    def __init__(self, target_label: int = 1, beta: float = 0.05, gamma: float = 2.0) -> None:
        super().__init__()
        self.target_label = target_label
        self.beta = beta
        self.gamma = gamma

    def forward(self, outputs: dict, target: torch.Tensor) -> torch.Tensor:
        logits = outputs["logits"].float()
        assert logits.shape == target.shape, f"logits {tuple(logits.shape)} != target {tuple(target.shape)}"
        y = (target == self.target_label).float()
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        p_true = torch.exp(-bce)  # probability given to the true class
        focal = ((1 - p_true) ** self.gamma * bce).mean()
        dice = dice_loss(logits.flatten(1), y.flatten(1)).mean()
        return focal + self.beta * dice


def dice_bce_per_mask(logits: Tensor, reference: Tensor) -> Tensor:
    """Dice + BCE of every mask: logits (..., N) against the reference (..., N) (broadcast). Returns (...) float32."""
    reference = reference.float().expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits.float(), reference, reduction="none").mean(-1)
    shape = logits.shape[:-1]
    dice = dice_loss(logits.reshape(-1, logits.shape[-1]), reference.reshape(-1, logits.shape[-1]))
    return dice.view(shape) + bce


def oracle_multimask_loss(per_mask: Tensor) -> Tensor:
    """RadSAM's multi-mask loss: the loss of the primary mask (index 0 of the last axis, SAM's single-mask output)
    plus the smallest loss of the other masks (SAM's three multi-mask outputs; the "oracle" choice). per_mask
    (..., M) with M >= 2 -> (...). The gradient reaches the primary mask and the best other mask only."""
    assert per_mask.shape[-1] >= 2, f"need the primary and at least one other mask, got {per_mask.shape[-1]}"
    return per_mask[..., 0] + per_mask[..., 1:].min(dim=-1).values


class RadSAMLoss(nn.Module):
    """Dice + BCE of mask logits (S, B, K, P, P) (S rounds; or (B, K, P, P)) against the target (B, 1, P, P).

    Row k of a slice is label k + 1 of the target (K = 1: a binary target); a (slice, label) pair with fewer than
    ``min_pixels`` label pixels is no sample and is left out. Averaged over rounds and samples; 0 (with gradient)
    when a batch has none. Logits with SAM's four masks (S, B, K, 4, P, P): per sample, the primary mask's loss
    plus the best of the other three (:func:`oracle_multimask_loss`).
    """

    def __init__(self, min_pixels: int = MIN_LABEL_PIXELS) -> None:
        super().__init__()
        self.min_pixels = min_pixels

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        multimask = logits.dim() == 6
        logits = logits if logits.dim() - multimask == 5 else logits[None]
        reference = structure_masks(target, logits.shape[2] + 1)  # (B, K, P, P)
        spatial = logits.shape[:3] + logits.shape[-2:]
        assert spatial[1:] == reference.shape, f"logits {tuple(logits.shape)} vs target {tuple(target.shape)}"
        valid = reference.flatten(2).sum(2) >= self.min_pixels  # (B, K)
        if not valid.any():
            return logits.sum() * 0
        chosen = logits[:, valid].float().flatten(-2)  # (S, V, [4,] P * P)
        ref = reference[valid].flatten(1)  # (V, P * P)
        ref = ref[:, None] if multimask else ref
        per_mask = dice_bce_per_mask(chosen, ref)  # (S, V[, 4])
        return (oracle_multimask_loss(per_mask) if multimask else per_mask).mean()

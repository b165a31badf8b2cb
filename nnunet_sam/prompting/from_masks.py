"""Prompts derived from (auxiliary) masks."""

from __future__ import annotations

from typing import Literal

import torch

from nnunet_sam.mask_classification import boxes_from_masks

BoxSource = Literal["mask", "learned", "mean"]


def box_prompts(learned: torch.Tensor | None, mask_logits: torch.Tensor, source: BoxSource = "mean") -> torch.Tensor:
    """Normalised box prompts (..., 4) from learned boxes (..., 4) and mask logits (..., H, W).

    ``mask``: bounding box of ``sigmoid(mask) > 0.5``; ``learned``: the learned box; ``mean``: the average of
    both (MaskSAM's MaskAvgBBoxPG). Where a mask is empty its box is unknown: ``mean`` then falls back to the
    learned box, and ``mask`` to the whole image. Gradients flow through the learned box only.
    """
    if source == "learned":
        assert learned is not None, "box source 'learned' needs learned boxes"
        return learned
    with torch.no_grad():
        from_mask, nonempty = boxes_from_masks(mask_logits.detach().float(), threshold=0.0)
    if source == "mask":
        whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=from_mask.device)
        return torch.where(nonempty[..., None], from_mask, whole)
    assert source == "mean" and learned is not None, f"unknown box source '{source}' or missing learned boxes"
    return torch.where(nonempty[..., None], (learned + from_mask) / 2, learned)

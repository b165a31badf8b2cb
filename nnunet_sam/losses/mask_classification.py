"""Mask classification: label maps <-> sets of class-labelled binary masks.

MaskSAM (and MaskFormer before it) predicts, for every 2D slice, a set of N (class distribution, binary
mask) pairs instead of per-pixel class scores. This module holds the conversions around that formulation:

- ``segments_from_labels``: the "dataset mapping" that turns a multi-class label map into one binary mask,
  class id and bounding box per class present in the slice (background, label 0, counts as a class).
- ``boxes_from_masks`` (defined in :mod:`nnunet_sam.mask_geometry`, re-exported here): the box of each mask.
- ``semantic_log_probs``: the inverse direction for inference; combines the N query predictions into
  per-class log-probabilities that nnU-Net's predictor can argmax / softmax like any other network output.

Boxes are normalised ``(x1, y1, x2, y2)``, as :mod:`nnunet_sam.mask_geometry` states.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from nnunet_sam.mask_geometry import boxes_from_masks

__all__ = ["boxes_from_masks", "no_autocast", "segments_from_labels", "semantic_log_probs"]


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Context manager that disables autocast on ``device`` (used to keep numerics in float32)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # device types without autocast support (e.g. "meta")
        return contextlib.nullcontext()


def _labels_to_long(labels: Tensor, num_classes: int) -> Tensor:
    """Validate a label map with values in 0..num_classes-1 and return it as int64."""
    if labels.is_floating_point():
        if not bool(torch.all(labels == labels.round())):
            raise ValueError("labels must hold integer class ids, found non-integer values")
        labels = labels.round()
    labels = labels.long()
    if labels.numel() > 0:
        lo, hi = torch.aminmax(labels)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in 0..{num_classes - 1} (num_classes={num_classes}), found values in "
                f"{lo}..{hi}; nnU-Net ignore labels and region-based training are not supported"
            )
    return labels


def segments_from_labels(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dataset mapping: multi-class label maps -> per-class binary masks, presence flags and boxes.

    Every slice is an independent set of ground-truth segments: one per class present in it (background,
    label 0, is a class like any other).

    Arguments:
      labels (Tensor): (S, H, W) integer (or integer-valued float) label maps with values 0..C-1.
      num_classes (int): C, the number of classes including background.

    Returns:
      masks (Tensor): (S, C, H, W) bool, ``masks[s, c] = labels[s] == c`` (all False if c is absent); bool
        keeps the C-fold expansion small, callers convert the pixels they use.
      present (Tensor): (S, C) bool, whether class c occurs in slice s.
      boxes (Tensor): (S, C, 4) float32 normalised boxes ``(x1, y1, x2, y2)``; zeros for absent classes.

    Raises:
      ValueError: if labels contain values outside 0..C-1 or non-integer values.
    """
    assert labels.dim() == 3, f"labels must have shape (S, H, W), got {tuple(labels.shape)}"
    assert num_classes >= 1, f"num_classes must be >= 1, got {num_classes}"
    labels = _labels_to_long(labels, num_classes)
    classes = torch.arange(num_classes, device=labels.device)
    masks = labels.unsqueeze(1) == classes.view(1, num_classes, 1, 1)  # (S, C, H, W)
    boxes, present = boxes_from_masks(masks)
    return masks, present, boxes


def semantic_log_probs(class_logits: Tensor, mask_logits: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-class log-probabilities from N (class, mask) query predictions.

    The semantic score of class c is ``s_c = sum_n softmax(class_logits)_n[c] * sigmoid(mask_logits_n)``
    for the C real classes (the "no object" column is dropped). ``p_c = (s_c + eps) / sum_c' (s_c' + eps)``,
    so a pixel no query covers gets uniform probabilities, ``argmax`` gives the label map and
    ``softmax(output) == p``. Always computed in float32 (autocast is disabled inside).

    Arguments:
      class_logits (Tensor): (B, D, N, C + 1) class logits, index C = "no object".
      mask_logits (Tensor): (B, D, N, H, W) mask logits.
      eps (float): added to every class score before normalising.

    Returns:
      (Tensor): (B, C, D, H, W) float32 log-probabilities.
    """
    assert class_logits.dim() == 4, f"class_logits must have shape (B, D, N, C + 1), got {tuple(class_logits.shape)}"
    assert mask_logits.dim() == 5, f"mask_logits must have shape (B, D, N, H, W), got {tuple(mask_logits.shape)}"
    assert class_logits.shape[:3] == mask_logits.shape[:3], (
        f"class_logits {tuple(class_logits.shape)} and mask_logits {tuple(mask_logits.shape)} disagree on (B, D, N)"
    )
    assert class_logits.shape[-1] >= 2, "class_logits need at least one class plus the no-object class"
    with no_autocast(mask_logits.device):
        class_probs = class_logits.float().softmax(dim=-1)[..., :-1]  # (B, D, N, C)
        mask_probs = mask_logits.float().sigmoid()  # (B, D, N, H, W)
        scores = torch.einsum("bdnc,bdnhw->bcdhw", class_probs, mask_probs) + eps
        return scores.log() - scores.sum(dim=1, keepdim=True).log()

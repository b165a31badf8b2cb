"""Prompts derived from (auxiliary) masks."""

from __future__ import annotations

from typing import Literal

import torch

from nnunet_sam.mask_geometry import boxes_from_masks

BoxSource = Literal["mask", "learned", "mean"]
MaskPromptResize = Literal["area", "bilinear"]


def prompt_mask(logits: torch.Tensor, size: int, resize: MaskPromptResize = "area") -> torch.Tensor:
    """Mask logits (..., H, W) -> SAM's mask-prompt logits (..., size, size).

    ``area`` (default): when shrinking, each output cell is the mean logit of the pixels it covers (an antialiased
    reduction), except that a cell containing a foreground pixel (logit > 0) whose mean is not positive takes its
    largest logit: every structure present at full resolution, down to one pixel, stays foreground in the prompt and
    so also yields a box and a point. Enlarging (or an equal size) is bilinear. ``bilinear``: bilinear at every size
    without antialiasing (models saved before this option; shrinking by 4 samples 2 of every 4 pixels, so a 1- or
    2-pixel line can vanish). Differentiable in both modes.
    """
    assert logits.dim() >= 2, f"logits must be (..., H, W), got shape {tuple(logits.shape)}"
    assert resize in ("area", "bilinear"), f"unknown mask prompt resize '{resize}' (area or bilinear)"
    lead, (h, w) = logits.shape[:-2], logits.shape[-2:]
    flat = logits.reshape(1, -1, h, w)  # maps as channels: one memory layout whatever their number
    if resize == "bilinear" or (h <= size and w <= size):
        # a 4D input is resized as it is: the CPU kernel's rounding depends on the layout, and models saved before
        # the "area" option were computed this way
        source = logits if logits.dim() == 4 else flat
        out = torch.nn.functional.interpolate(source, size=(size, size), mode="bilinear", align_corners=False)
    else:
        mean = torch.nn.functional.adaptive_avg_pool2d(flat, size)
        peak = torch.nn.functional.adaptive_max_pool2d(flat, size)
        out = torch.where((peak > 0) & (mean <= 0), peak, mean)
    return out.reshape(*lead, size, size)


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


def _distance_1d(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Distance (in pixels) from each pixel of ``mask`` (..., H, W) bool to the nearest False pixel along ``dim``.

    Every line along ``dim`` must contain a False pixel (the caller pads with False).
    """
    n = mask.shape[dim]
    shape = [1] * mask.dim()
    shape[dim] = n
    idx = torch.arange(n, device=mask.device).view(shape).expand_as(mask)
    never = torch.full_like(idx, -2 * n)
    last_false = torch.where(~mask, idx, never).cummax(dim).values
    next_false = -torch.where(~mask, -idx, never).flip(dim).cummax(dim).values.flip(dim)
    return torch.minimum(idx - last_false, next_false - idx)


def distance_transform_2d(mask: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance transform of every 2D mask (..., H, W) bool -> (..., H, W) float32.

    At a True pixel: the distance (in pixels) to the nearest False pixel, pixels outside the image counting as
    False (a True border pixel has distance 1); 0 at False pixels. Matches
    ``scipy.ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]``. Separable algorithm: the 1D distance
    along H, then ``min_k g[i, k]^2 + (j - k)^2`` along W by broadcasting (memory O(K * H * W^2)).
    """
    assert mask.dtype == torch.bool, f"distance_transform_2d expects a bool mask, got {mask.dtype}"
    assert mask.dim() >= 2, f"mask must be (..., H, W), got shape {tuple(mask.shape)}"
    h, w = mask.shape[-2:]
    assert h <= 256 and w <= 256, f"mask of {h}x{w} is too large for the O(H*W*W) transform: downsample it first"
    padded = torch.nn.functional.pad(mask, (1, 1, 1, 1), value=False)  # (..., H + 2, W + 2)
    g = _distance_1d(padded, dim=-2)[..., 1:-1, :].float()  # (..., H, W + 2): vertical distance
    cols = torch.arange(w + 2, device=mask.device, dtype=torch.float32)
    offsets = (cols[1:-1, None] - cols[None, :]) ** 2  # (W, W + 2): (j - k)^2
    squared = (g[..., :, None, :] ** 2 + offsets).amin(dim=-1)  # (..., H, W), integers: exact in float32
    return squared.sqrt()


def point_prompts(
    mask_logits: torch.Tensor, image_size: int, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point prompts at the most interior pixel of each mask ``mask_logits > threshold`` (..., H, W).

    Returns points (..., 2) float32 and labels (...) int64. The chosen pixel (row, col) is the argmax of
    :func:`distance_transform_2d` (ties: first in row-major order). Points follow SAM's convention, (x, y) =
    (column, row) in the ``image_size`` x ``image_size`` input frame, as integer-pixel coordinates to which SAM's
    ``PromptEncoder`` adds 0.5: with ``s = image_size / W`` we return ``x = col * s + (s - 1) / 2`` (likewise y
    with ``image_size / H``), so that after SAM's shift ``x + 0.5 = (col + 0.5) * s``, the centre of the mask
    pixel, and ``col = floor((x + 0.5) / s)``. Labels are 1 for non-empty masks; empty masks get label -1 (SAM's
    not-a-point) and the image centre ``(image_size - 1) / 2`` as a finite placeholder point. No gradients.
    """
    assert mask_logits.dim() >= 2, f"mask_logits must be (..., H, W), got shape {tuple(mask_logits.shape)}"
    assert image_size >= 1, f"image_size must be positive, got {image_size}"
    h, w = mask_logits.shape[-2:]
    with torch.no_grad():
        mask = mask_logits.detach().float() > threshold
        dist = distance_transform_2d(mask).flatten(-2)  # (..., H * W)
        best = dist.amax(dim=-1, keepdim=True)
        idx = torch.arange(h * w, device=mask.device)
        first = torch.where(dist == best, idx, h * w).amin(dim=-1)  # (...)
        rc = torch.stack([first % w, first // w], dim=-1).float()  # (..., 2): (col, row)
        scale = torch.tensor([image_size / w, image_size / h], device=mask.device)
        points = rc * scale + (scale - 1) / 2
        nonempty = best[..., 0] > 0
        centre = torch.full_like(points, (image_size - 1) / 2)
        points = torch.where(nonempty[..., None], points, centre)
        labels = torch.where(nonempty, 1, -1).long()
    return points, labels

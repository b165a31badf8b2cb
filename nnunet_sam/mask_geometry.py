"""Box and mask geometry, shared by the prompt code, the losses and the evaluation: boxes of masks, square-window
dilation and erosion.

Two box forms:

* pixel boxes (:func:`pixel_boxes`): ``(x0, y0, x1, y1)`` long, first and last column and row, inclusive;
* normalised boxes (:func:`boxes_from_masks`): ``(x1, y1, x2, y2)`` float in [0, 1] with x along W and y along H,
  ``x1 = min column / W``, ``x2 = (max column + 1) / W`` and likewise for y with rows, so a mask covering the whole
  slice has the box ``(0, 0, 1, 1)``. MaskSAM's segments and box prompts use this form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_mask(mask: torch.Tensor) -> None:
    assert mask.dtype == torch.bool and mask.dim() == 3, (
        f"expected a bool (N, H, W) mask, got {mask.dtype} {mask.shape}"
    )


def window_max(mask: torch.Tensor, size: int | tuple[int, int], outside: float) -> torch.Tensor:
    """Max over a window of size (rows, columns) (an int: square; offsets -(k // 2) .. k - 1 - k // 2 per axis) of
    mask (N, H, W) float, with ``outside`` beyond the image."""
    kh, kw = (size, size) if isinstance(size, int) else size
    padded = F.pad(mask[:, None], (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2), value=outside)
    return F.max_pool2d(padded, (kh, kw), stride=1)[:, 0]


def dilate(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Binary dilation of mask (N, H, W) bool with a size x size (or rows x columns) window; outside the image is
    background."""
    _check_mask(mask)
    return window_max(mask.float(), size, 0.0) > 0.5


def erode(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Binary erosion of mask (N, H, W) bool with a size x size (or rows x columns) window; outside the image is
    foreground (a structure touching the border is not eroded from that side)."""
    _check_mask(mask)
    return window_max((~mask).float(), size, 0.0) < 0.5


def pixel_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes (..., 4) long (x0, y0, x1, y1), first and last column and row (inclusive), of masks
    (..., H, W) bool, and nonempty (...) bool. An empty mask gives (W, H, -1, -1)."""
    assert masks.dim() >= 2 and masks.dtype == torch.bool, f"expected bool (..., H, W) masks, got {masks.dtype}"
    h, w = masks.shape[-2:]
    rows, cols = masks.any(-1), masks.any(-2)  # (..., H), (..., W)
    r = torch.arange(h, device=masks.device)
    c = torch.arange(w, device=masks.device)
    boxes = torch.stack(
        [
            torch.where(cols, c, w).amin(-1),
            torch.where(rows, r, h).amin(-1),
            torch.where(cols, c, -1).amax(-1),
            torch.where(rows, r, -1).amax(-1),
        ],
        -1,
    )
    return boxes, rows.any(-1)


def boxes_from_masks(masks: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Normalised bounding boxes of the foreground ``masks > threshold``.

    Arguments:
      masks (Tensor): (..., H, W) masks of any dtype (bool, integer, float, half) on any device. A bool
        tensor is used as the foreground directly; pass ``threshold=0`` for mask logits.
      threshold (float): foreground threshold for non-bool inputs.

    Returns:
      boxes (Tensor): (..., 4) float32 boxes ``(x1, y1, x2, y2)`` in [0, 1] (see the module docstring for
        the convention). Empty masks give the box ``(0, 0, 0, 0)``.
      nonempty (Tensor): (...) bool, False where the mask has no foreground pixel.
    """
    assert masks.dim() >= 2, f"masks must have shape (..., H, W), got {tuple(masks.shape)}"
    height, width = masks.shape[-2:]
    assert height > 0 and width > 0, f"masks must have non-zero spatial size, got {tuple(masks.shape)}"
    foreground = masks if masks.dtype == torch.bool else masks > threshold
    boxes, nonempty = pixel_boxes(foreground)
    x1, y1, x2, y2 = boxes.unbind(-1)
    x2, y2 = x2 + 1, y2 + 1  # exclusive ends

    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=masks.device)
    boxes = torch.stack([x1, y1, x2, y2], dim=-1).to(torch.float32) / scale
    boxes = torch.where(nonempty.unsqueeze(-1), boxes, torch.zeros((), device=masks.device))
    return boxes, nonempty

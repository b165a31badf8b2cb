"""Binary mask operations shared by the prompt code: square-window dilation and erosion, tight pixel boxes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

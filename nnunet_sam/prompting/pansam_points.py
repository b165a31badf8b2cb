"""PanSAM's point prompt generator: foreground and background points sampled from a probability map.

From a probability map O (the prompt-free segmentor's output, one map per slice):

* foreground mask ``M_f = dilate(erode(O > 0.5, erosion x erosion), dilation x dilation)``: the confident core of
  the predicted structure; ``num_foreground`` points are drawn uniformly from it, plus ``num_border`` points drawn
  uniformly from the border of ``O > 0.5`` (its pixels with a 4-neighbour outside it);
* background mask ``M_b = (1 - dilate(O > 0.5, dilation x dilation)) AND (O <= 0.4)``: confidently outside, but
  not next to, the prediction; ``num_background`` points are drawn with probability proportional to O inside it
  (hard but confident background), plus ``num_trivial_background`` points drawn uniformly from ``O <= 0.5``.

Window sizes are counted in "window pixels" of ``window_unit_mm`` millimetres (:meth:`PointPromptConfig.in_pixels`
turns them into pixels of the map at its spacing, a rectangle when the pixels are not square); ``None`` counts
them in pixels of the map itself. A window of even size k covers the offsets ``-(k // 2) .. k - 1 - k // 2``
(OpenCV's default anchor). Pixels outside the image count as foreground for the erosion and as background for the
dilation, so a structure touching the image border is not eroded from that side.

Fallbacks (never an error, never a NaN): when M_f is empty but ``O > 0.5`` is not (a structure thinner than the
erosion window), foreground points come from ``O > 0.5``; when ``O * M_b`` sums to 0 (e.g. a binary reference
mask), background points are uniform in M_b; any point whose source mask is empty (an empty O has no
foreground and no border) is a padding point with label -1, SAM's "not a point", at the image centre.

Output points follow SAM's prompt encoder: (x, y) = (column, row), in the SAM input frame of ``image_size``
pixels, with the same pixel-centre convention as :func:`nnunet_sam.prompting.from_masks.point_prompts`
(``x = col * s + (s - 1) / 2`` with ``s = image_size / W``; SAM adds 0.5). Labels: 1 foreground, 0 background,
-1 padding. Points are ordered [foreground, border, background, trivial background]. Sampling is reproducible: the
same map, configuration and ``torch.Generator`` seed give the same points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from nnunet_sam.mask_geometry import dilate, erode

# One pixel of SAM's 256-px low-res mask when a 512-px slice of about 0.8 mm pixels (NIH Pancreas-CT) is resized to
# SAM's 1024 px, where the public code runs the paper's morphology: 2 slice pixels of 0.8 mm.
LOW_RES_PIXEL_MM = 1.6


@dataclass(frozen=True)
class PointPromptConfig:
    """Thresholds, window sizes and point counts of the generator (the paper's values by default).

    Counts: the paper's Table 3 uses 4 points; its generator has four sources (core, border, hard background,
    trivial background), so the default draws one point from each. Models saved before this default get the
    ``legacy`` values (2 + 2 + 2 + 2, windows in map pixels). The public code's variant is 2 core + 2 background
    (``num_border=0, num_trivial_background=0``).

    Windows: ``erosion`` x ``erosion`` and ``dilation`` x ``dilation`` window pixels of ``window_unit_mm`` mm
    (default :data:`LOW_RES_PIXEL_MM`: the physical size the public code's 10 and 5 px windows have); ``None``:
    pixels of the probability map itself.
    """

    threshold: float = 0.5
    background_threshold: float = 0.4
    erosion: int | tuple[int, int] = 10
    dilation: int | tuple[int, int] = 5
    num_foreground: int = field(default=1, metadata={"legacy": 2})
    num_border: int = field(default=1, metadata={"legacy": 2})
    num_background: int = field(default=1, metadata={"legacy": 2})
    num_trivial_background: int = field(default=1, metadata={"legacy": 2})
    window_unit_mm: float | None = field(default=LOW_RES_PIXEL_MM, metadata={"legacy": None})

    @property
    def num_points(self) -> int:
        return self.num_foreground + self.num_border + self.num_background + self.num_trivial_background

    def in_pixels(self, spacing: Sequence[float] | None) -> PointPromptConfig:
        """This configuration with windows in pixels (rows, columns) of a map of in-plane ``spacing`` (mm per
        row, per column); unchanged when ``window_unit_mm`` or ``spacing`` is None (windows already in pixels)."""
        if self.window_unit_mm is None or spacing is None:
            return self

        def pixels(size: int | tuple[int, int]) -> tuple[int, int]:
            sizes = (size, size) if isinstance(size, int) else size
            return tuple(max(1, round(k * self.window_unit_mm / float(s))) for k, s in zip(sizes, spacing[-2:]))

        return replace(self, erosion=pixels(self.erosion), dilation=pixels(self.dilation), window_unit_mm=None)


LEGACY_POINTS = PointPromptConfig(
    num_foreground=2, num_border=2, num_background=2, num_trivial_background=2, window_unit_mm=None
)


def border(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of mask (N, H, W) bool with a 4-neighbour outside it (image edges do not count as outside)."""
    eroded = ~_window4(~mask)
    return mask & ~eroded


def _window4(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of mask (N, H, W) bool or with a 4-neighbour in it (cross-shaped dilation, nothing outside)."""
    padded = F.pad(mask[:, None].float(), (1, 1, 1, 1), value=0.0)[:, 0]
    centre = padded[:, 1:-1, 1:-1]
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return (centre + neighbours) > 0


def foreground_mask(prob: torch.Tensor, config: PointPromptConfig = PointPromptConfig()) -> torch.Tensor:
    """M_f = dilate(erode(prob > threshold)) for prob (N, H, W) -> bool (N, H, W)."""
    return dilate(erode(prob > config.threshold, config.erosion), config.dilation)


def background_mask(prob: torch.Tensor, config: PointPromptConfig = PointPromptConfig()) -> torch.Tensor:
    """M_b = not dilate(prob > threshold) and prob <= background_threshold, for prob (N, H, W) -> bool."""
    return ~dilate(prob > config.threshold, config.dilation) & (prob <= config.background_threshold)


def _sample(weights: torch.Tensor, k: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """k pixel indices per row of weights (N, H * W) >= 0, with replacement; rows summing to 0 are invalid.

    Returns indices (N, k) int64 and valid (N,) bool.
    """
    valid = weights.sum(-1) > 0
    if k == 0:
        return torch.zeros(weights.shape[0], 0, dtype=torch.long, device=weights.device), valid
    safe = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(safe, k, replacement=True, generator=generator), valid


def generate_points(
    prob: torch.Tensor,
    image_size: int,
    config: PointPromptConfig = PointPromptConfig(),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point prompts from probability maps prob (N, H, W) in [0, 1] (see the module docstring).

    Returns points (N, K, 2) float32 as (x, y) in the ``image_size`` frame and labels (N, K) int64 with
    K = ``config.num_points``. No gradients. Windows are taken as pixels of ``prob``: convert a configuration in
    millimetres with :meth:`PointPromptConfig.in_pixels` first.
    """
    assert prob.dim() == 3, f"prob must be (N, H, W), got shape {tuple(prob.shape)}"
    n, h, w = prob.shape
    with torch.no_grad():
        prob = prob.detach().float()
        inside = prob > config.threshold
        core = foreground_mask(prob, config)
        core = torch.where(core.flatten(1).any(-1)[:, None, None], core, inside)  # thin structure: use O > 0.5
        background = background_mask(prob, config)
        weighted = (prob * background).flatten(1)
        weighted = torch.where(weighted.sum(-1, keepdim=True) > 0, weighted, background.flatten(1).float())
        sources = (
            (core.flatten(1).float(), config.num_foreground, 1),
            (border(inside).flatten(1).float(), config.num_border, 1),
            (weighted, config.num_background, 0),
            ((~inside).flatten(1).float(), config.num_trivial_background, 0),
        )
        indices, labels = [], []
        for weights, k, label in sources:
            idx, valid = _sample(weights, k, generator)
            indices.append(idx)
            labels.append(torch.where(valid[:, None], label, -1).expand(n, k))
        idx, label = torch.cat(indices, 1), torch.cat(labels, 1).long()
        scale = torch.tensor([image_size / w, image_size / h], device=prob.device)
        cols_rows = torch.stack([idx % w, idx // w], dim=-1).float()  # (N, K, 2): (x, y) = (col, row)
        points = cols_rows * scale + (scale - 1) / 2
        centre = torch.full_like(points, (image_size - 1) / 2)
        points = torch.where(label[..., None] >= 0, points, centre)
    return points, label


def to_pixels(points: torch.Tensor, image_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of the point convention: points (..., 2) (x, y) in the ``image_size`` frame -> (row, col) pixel
    indices (..., 2) int64 of a map of ``shape`` (H, W)."""
    h, w = shape
    scale = torch.tensor([image_size / w, image_size / h], device=points.device)
    cols_rows = torch.floor((points + 0.5) / scale).long()
    return cols_rows.flip(-1)

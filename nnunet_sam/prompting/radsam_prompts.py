"""RadSAM's 2D prompts and the prompt generators that simulate a user from a reference mask.

Coordinates are pixel indices of the slice: a point is (x, y) = (column, row), a box (x0, y0, x1, y1) holds the
columns and rows of its first and last pixel (inclusive). Prompt rows R are independent (one structure each).

Generators (all take an optional ``torch.Generator``; the same generator state gives the same prompts):

* :func:`interior_points`: a pixel drawn uniformly among those more than ``margin`` (2) pixels inside the mask;
* :func:`perturbed_boxes`: the mask's bounding box with each side moved outward by a whole number of pixels drawn
  uniformly from [-5, 20] (negative: inward);
* :func:`noisy_masks`: the mask rotated, scaled and translated about its centroid, then eroded or dilated;
* :func:`correction_points`: a pixel drawn uniformly from the error region of a prediction, positive (label 1) in a
  false negative, negative (label 0) in a false positive.

:class:`SimulatedInteraction` combines them for one training step: a random initial prompt kind per row, then
correction rounds that add one correction point each and pass the previous prediction as the mask prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from nnunet_sam.mask_geometry import dilate, erode, pixel_boxes
from nnunet_sam.prompting.from_masks import distance_transform_2d

#: structures with fewer label pixels on a slice are no training sample (the paper's data curation)
MIN_LABEL_PIXELS = 15
PROMPT_KINDS = ("point", "box", "mask")


@dataclass(frozen=True)
class Prompts:
    """Prompts of R rows on slices of H x W pixels.

    points (R, N, 2) float (x, y) with labels (R, N) long: 1 positive, 0 negative, -1 no point (padding);
    boxes (R, 4) float (x0, y0, x1, y1), used where has_box (R,) bool; masks (R, H, W) bool, used where
    has_mask (R,) bool. N >= 1 (a row without points has one padding point).
    """

    points: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    has_box: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor

    @staticmethod
    def empty(rows: int, height: int, width: int, device: torch.device | str = "cpu") -> Prompts:
        """R rows without any prompt."""
        return Prompts(
            points=torch.zeros(rows, 1, 2, device=device),
            labels=torch.full((rows, 1), -1, dtype=torch.long, device=device),
            boxes=torch.zeros(rows, 4, device=device),
            has_box=torch.zeros(rows, dtype=torch.bool, device=device),
            masks=torch.zeros(rows, height, width, dtype=torch.bool, device=device),
            has_mask=torch.zeros(rows, dtype=torch.bool, device=device),
        )

    @property
    def rows(self) -> int:
        return self.labels.shape[0]

    def with_points(self, points: torch.Tensor, labels: torch.Tensor) -> Prompts:
        """Append one point per row: points (R, 2), labels (R,) (label -1 appends a padding point)."""
        assert points.shape == (self.rows, 2) and labels.shape == (self.rows,), (
            f"expected points ({self.rows}, 2) and labels ({self.rows},), got {tuple(points.shape)}, "
            f"{tuple(labels.shape)}"
        )
        return replace(
            self,
            points=torch.cat([self.points, points[:, None].to(self.points)], 1),
            labels=torch.cat([self.labels, labels[:, None].to(self.labels)], 1),
        )

    def with_masks(self, masks: torch.Tensor) -> Prompts:
        """Replace the mask prompts by ``masks`` (R, H, W) bool; an empty mask counts as no mask prompt."""
        assert masks.shape == self.masks.shape, f"expected masks {tuple(self.masks.shape)}, got {tuple(masks.shape)}"
        return replace(self, masks=masks.bool(), has_mask=masks.flatten(1).any(1))


def _uniform_pick(candidates: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Index (R,) into H * W of a pixel drawn uniformly among the True pixels of candidates (R, H, W)."""
    flat = candidates.flatten(1)
    scores = torch.rand(flat.shape, generator=generator).to(flat.device)
    return torch.where(flat, scores, -1.0).argmax(1)


def _as_points(index: torch.Tensor, width: int) -> torch.Tensor:
    """Flat pixel index (R,) -> (R, 2) float (x, y)."""
    return torch.stack([index % width, index // width], -1).float()


def distance_inside(masks: torch.Tensor) -> torch.Tensor:
    """Euclidean distance (pixels) of every mask pixel to the nearest pixel outside (R, H, W) bool -> float.

    Outside the image counts as outside the mask (a mask pixel on the border has distance 1).
    """
    if max(masks.shape[-2:]) <= 256:
        return distance_transform_2d(masks)
    return _distance_edt(masks)


@torch.library.custom_op("nnunet_sam::distance_inside", mutates_args=())
def _distance_edt(masks: torch.Tensor) -> torch.Tensor:
    """SciPy's exact transform of :func:`distance_inside`, as a PyTorch operator so that tensors without values
    (fake or meta: the benchmark's memory and FLOP traces) pass through it with their shape."""
    padded = np.pad(masks.cpu().numpy(), ((0, 0), (1, 1), (1, 1)))
    dist = np.stack([distance_transform_edt(m)[1:-1, 1:-1] for m in padded]).astype(np.float32)
    return torch.from_numpy(dist).to(masks.device)


@_distance_edt.register_fake
def _(masks: torch.Tensor) -> torch.Tensor:
    return torch.empty(masks.shape, dtype=torch.float32, device=masks.device)


def interior_points(
    masks: torch.Tensor, margin: float = 2.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A positive click per mask (R, H, W) bool: uniform among the pixels more than ``margin`` pixels from the
    contour (distance to the nearest outside pixel > margin); a mask too thin for that gives its most interior
    pixel. Returns points (R, 2) float (x, y) and labels (R,) long (1; -1 for an empty mask)."""
    assert masks.dim() == 3 and masks.dtype == torch.bool, f"masks must be (R, H, W) bool, got {masks.shape}"
    dist = distance_inside(masks)
    deepest = dist.flatten(1).amax(1)[:, None, None]
    candidates = torch.where(deepest > margin, dist > margin, (dist == deepest) & masks)
    points = _as_points(_uniform_pick(candidates, generator), masks.shape[-1])
    labels = torch.where(masks.flatten(1).any(1), 1, -1).long()
    return points, labels


def perturbed_boxes(
    masks: torch.Tensor, low: int = -5, high: int = 20, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box prompts (R, 4) from masks (R, H, W) bool: each side of the tight box moves outward by a whole number of
    pixels drawn uniformly from [low, high], then the box is clipped to the image. A side moved inward past the
    box centre stops at the centre pixel. Returns boxes and whether each mask is non-empty (empty: whole image)."""
    h, w = masks.shape[-2:]
    tight, nonempty = pixel_boxes(masks)
    tight = tight.float()
    shift = torch.randint(low, high + 1, tight.shape, generator=generator).to(tight)
    centre = ((tight[:, :2] + tight[:, 2:]) / 2).floor()
    start = torch.minimum(tight[:, :2] - shift[:, :2], centre)
    end = torch.maximum(tight[:, 2:] + shift[:, 2:], centre)
    limit = torch.tensor([w - 1.0, h - 1.0], device=tight.device)
    boxes = torch.cat([start.clamp(min=0), torch.minimum(end, limit)], -1)
    whole = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0], device=tight.device)
    return torch.where(nonempty[:, None], boxes, whole), nonempty


def noisy_masks(
    masks: torch.Tensor,
    generator: torch.Generator | None = None,
    max_rotation_deg: float = 15.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    max_shift: float = 4.0,
    max_morph_radius: int = 2,
) -> torch.Tensor:
    """Degraded copies of masks (R, H, W) bool, as a user's rough drawing or a neighbouring slice's mask.

    Each mask is rotated by up to ``max_rotation_deg`` degrees and scaled by a factor in ``scale_range`` about its
    centroid, translated by up to ``max_shift`` pixels per axis, then eroded (or dilated) with a square of radius
    1..``max_morph_radius`` (or left as is), each drawn uniformly. A mask that the noise would empty is returned
    unchanged; an empty mask stays empty.
    """
    assert masks.dim() == 3 and masks.dtype == torch.bool, f"masks must be (R, H, W) bool, got {masks.shape}"
    r, h, w = masks.shape
    device = masks.device

    def uniform(lo: float, hi: float, n: int = r) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=generator)).to(device)

    angle = uniform(-max_rotation_deg, max_rotation_deg) * math.pi / 180
    scale = uniform(*scale_range)
    shift = torch.stack([uniform(-max_shift, max_shift), uniform(-max_shift, max_shift)], -1)
    morph = torch.randint(-max_morph_radius, max_morph_radius + 1, (r,), generator=generator).to(device)

    # centroid in normalised coordinates (align_corners=False): pixel i -> (2 i + 1) / n - 1
    m = masks.float()
    area = m.flatten(1).sum(1).clamp(min=1)
    ys = (torch.arange(h, device=device) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device) * 2 + 1) / w - 1
    centre = torch.stack([(m.sum(1) * xs).sum(1) / area, (m.sum(2) * ys).sum(1) / area], -1)  # (R, 2) (x, y)
    # output pixel p samples the input at centre + A (p - centre - shift), A = rotation(-angle) / scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    a = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], 1)  # (R, 2, 2) in (x, y)
    a_pix = a * torch.tensor([[1.0, h / w], [w / h, 1.0]], device=device)  # anisotropic normalisation of x and y
    t = shift * 2 / torch.tensor([w, h], device=device)
    offset = centre - (a_pix @ (centre + t)[..., None])[..., 0]
    theta = torch.cat([a_pix, offset[..., None]], -1)
    grid = F.affine_grid(theta, [r, 1, h, w], align_corners=False)
    moved = F.grid_sample(m[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0] > 0.5

    out = moved
    for radius in range(1, max_morph_radius + 1):
        dilated = dilate(moved, 2 * radius + 1)
        eroded = erode(moved, 2 * radius + 1)
        out = torch.where((morph == radius)[:, None, None], dilated, out)
        out = torch.where((morph == -radius)[:, None, None], eroded, out)
    keep = out.flatten(1).any(1)
    return torch.where(keep[:, None, None], out, masks)


def correction_points(
    prediction: torch.Tensor, reference: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One correction click per row, uniform over the error region of prediction vs reference (R, H, W) bool.

    Label 1 (positive) in a false negative (reference only), 0 (negative) in a false positive (prediction only);
    a row without error gets a padding point (label -1). Returns points (R, 2) float (x, y) and labels (R,) long.
    """
    assert prediction.shape == reference.shape and prediction.dim() == 3, (
        f"prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} must be the same (R, H, W)"
    )
    error = prediction.bool() ^ reference.bool()
    index = _uniform_pick(error, generator)
    positive = reference.flatten(1).gather(1, index[:, None])[:, 0]
    labels = torch.where(error.flatten(1).any(1), positive.long(), -1)
    return _as_points(index, reference.shape[-1]), labels


def structure_masks(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """nnU-Net 2d target (B, 1, H, W) -> one binary mask per foreground class (B, C - 1, H, W) bool."""
    assert target.dim() == 4 and target.shape[1] == 1, f"expected a (B, 1, H, W) target, got {tuple(target.shape)}"
    classes = torch.arange(1, num_classes, device=target.device).view(1, -1, 1, 1)
    return target.long() == classes


def pick_structures(target: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One structure per slice: target (B, 1, H, W) -> binary target (B, 1, H, W) of a foreground class drawn
    uniformly among those with at least ``MIN_LABEL_PIXELS`` pixels on the slice (all zero if there is none)."""
    structures = structure_masks(target, num_classes)  # (B, K, H, W)
    valid = structures.flatten(2).sum(2) >= MIN_LABEL_PIXELS
    scores = torch.rand(valid.shape, generator=generator).to(valid.device)
    pick = torch.where(valid, scores, -1.0).argmax(1)
    chosen = structures[torch.arange(len(pick), device=pick.device), pick] & valid.any(1)[:, None, None]
    return chosen[:, None].to(target.dtype)


class SimulatedInteraction:
    """The prompts of one training step for reference masks (R, H, W) bool.

    :meth:`initial`: per row a prompt kind drawn uniformly from ``kinds`` (point inside the mask, perturbed box or
    noisy mask). :meth:`correct`: after a prediction, one correction click per row is added to the row's points
    and the binarised prediction becomes its mask prompt. ``rounds`` correction rounds follow the initial prompt.
    ``mask_prompts=False`` (the paper's Table 9 ablation): no noisy-mask initial prompt and no mask prompt in the
    correction rounds (clicks only).
    """

    def __init__(
        self,
        reference: torch.Tensor,
        rounds: int,
        generator: torch.Generator | None = None,
        kinds: tuple[str, ...] = PROMPT_KINDS,
        mask_prompts: bool = True,
    ) -> None:
        assert reference.dim() == 3 and reference.dtype == torch.bool, "reference must be (R, H, W) bool"
        if not mask_prompts:
            kinds = tuple(k for k in kinds if k != "mask")
        assert set(kinds) <= set(PROMPT_KINDS) and kinds, f"unknown prompt kinds {kinds}"
        self.reference = reference
        self.rounds = rounds
        self.generator = generator
        self.kinds = kinds
        self.mask_prompts = mask_prompts
        self._prompts: Prompts | None = None

    def initial(self) -> Prompts:
        ref, g = self.reference, self.generator
        kind = torch.randint(len(self.kinds), (ref.shape[0],), generator=g).to(ref.device)
        prompts = Prompts.empty(ref.shape[0], *ref.shape[-2:], device=ref.device)
        if "point" in self.kinds:
            points, labels = interior_points(ref, generator=g)
            use = kind == self.kinds.index("point")
            prompts = prompts.with_points(points, torch.where(use, labels, -1))
        if "box" in self.kinds:
            boxes, nonempty = perturbed_boxes(ref, generator=g)
            prompts = replace(prompts, boxes=boxes, has_box=(kind == self.kinds.index("box")) & nonempty)
        if "mask" in self.kinds:
            use = kind == self.kinds.index("mask")
            prompts = prompts.with_masks(noisy_masks(ref, generator=g) & use[:, None, None])
        self._prompts = prompts
        return prompts

    def correct(self, logits: torch.Tensor) -> Prompts:
        """Prompts of the next round after the prediction ``logits`` (R, H, W) of the previous one."""
        assert self._prompts is not None, "call initial() first"
        prediction = logits.detach() > 0
        points, labels = correction_points(prediction, self.reference, self.generator)
        self._prompts = self._prompts.with_points(points, labels)
        if self.mask_prompts:
            self._prompts = self._prompts.with_masks(prediction)
        return self._prompts

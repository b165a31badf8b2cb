"""MaskSAM's set-prediction loss: Hungarian matching + class / mask / auxiliary-mask / box terms.

Every 2D slice of a (B, 1, D, H, W) target is its own set-prediction problem. Its ground-truth segments
are the classes present in the slice (see ``segments_from_labels``). The N queries of the slice are
matched one-to-one to those segments by minimum cost (mask costs on uniformly sampled pixels); every matched
pair contributes mask (BCE + Dice on final and auxiliary masks, at importance-sampled pixels as in Mask2Former) and
box (L1 + GIoU) losses, and every query contributes a cross-entropy term whose target is the matched class or
"no object" for unmatched queries.

All losses and costs are computed in float32 with autocast disabled, whatever the input dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_sam.losses.mask_classification import no_autocast, segments_from_labels
from nnunet_sam.losses.matching import match_slices

# Loss and matching-cost weights of the public MaskSAM code.
CLASS_WEIGHT = 0.2
NO_OBJECT_WEIGHT = 0.1  # cross-entropy class weight of "no object" (real classes weigh 1)
MASK_BCE_WEIGHT = 1.2  # the public code's AMOS trainer; its ACDC and Synapse trainers use 1.5 (PUBLIC_MASK_WEIGHTS)
MASK_DICE_WEIGHT = 1.2
AUX_MASK_WEIGHT = 0.5  # applied to the auxiliary mask's BCE and to its Dice
BOX_L1_WEIGHT = 0.5
BOX_GIOU_WEIGHT = 0.2
# (final mask BCE, final mask Dice) weights of the public code's per-dataset trainers; presets set them through
# MaskSAMTrainer.mask_bce_weight / mask_dice_weight.
PUBLIC_MASK_WEIGHTS = {"ACDC": (1.5, 1.5), "Synapse": (1.5, 1.5), "AMOS": (1.2, 1.2)}
# Mask2Former's point sampling as the public code configures it.
OVERSAMPLE_RATIO = 2.0
IMPORTANCE_SAMPLE_RATIO = 0.75

_EPS = 1e-7


def uncertain_pixels(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = OVERSAMPLE_RATIO,
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
) -> Tensor:
    """Mask2Former's (PointRend's) importance sampling of loss points, on the pixel grid, for K predicted masks.

    Draws ``oversample_ratio * num_points`` uniform candidate pixels per mask (with replacement), keeps the
    ``importance_sample_ratio * num_points`` whose logit is closest to 0 (uncertainty ``-|logit|``) and adds uniform
    pixels for the rest, so the loss concentrates on the uncertain boundary while still seeing the whole slice.
    Mask2Former samples continuous positions and interpolates bilinearly; here masks and labels share the full
    patch resolution, so points are pixels (interpolating the label map would only invent fractional targets).

    Arguments:
      logits (Tensor): (K, H * W) mask logits (no gradient is needed).
      num_points (int): P, points per mask.

    Returns:
      (Tensor): (K, P) int64 flat pixel indices, the uncertain ones first.
    """
    assert oversample_ratio >= 1, f"oversample_ratio must be >= 1, got {oversample_ratio}"
    assert 0 <= importance_sample_ratio <= 1, f"importance_sample_ratio {importance_sample_ratio} is not in [0, 1]"
    assert logits.dim() == 2, f"logits must have shape (K, H * W), got {tuple(logits.shape)}"
    k, num_pixels = logits.shape
    num_candidates = max(int(num_points * oversample_ratio), 1)
    num_uncertain = min(int(importance_sample_ratio * num_points), num_candidates)
    with torch.no_grad():
        candidates = torch.randint(num_pixels, (k, num_candidates), device=logits.device)
        uncertainty = -logits.detach().gather(1, candidates).abs()
        chosen = candidates.gather(1, uncertainty.topk(num_uncertain, dim=1).indices)
        rest = torch.randint(num_pixels, (k, num_points - num_uncertain), device=logits.device)
        return torch.cat([chosen, rest], dim=1)


def pairwise_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy between every predicted mask and every target mask of a slice.

    Arguments:
      logits (Tensor): (S, N, P) mask logits at P pixels.
      targets (Tensor): (S, C, P) target masks in [0, 1] at the same pixels.

    Returns:
      (Tensor): (S, N, C) float32, ``out[s, n, c] = mean_p BCE(logits[s, n, p], targets[s, c, p])``.
    """
    assert logits.dim() == 3 and targets.dim() == 3, (
        f"expected logits (S, N, P) and targets (S, C, P), got {tuple(logits.shape)}, {tuple(targets.shape)}"
    )
    assert logits.shape[0] == targets.shape[0] and logits.shape[2] == targets.shape[2], (
        f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on S or P"
    )
    with no_autocast(logits.device):
        logits, targets = logits.float(), targets.float()
        num_points = max(logits.shape[-1], 1)
        # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), summed over p as two matmuls.
        loss_pos = torch.einsum("snp,scp->snc", F.softplus(-logits), targets)
        loss_neg = torch.einsum("snp,scp->snc", F.softplus(logits), 1.0 - targets)
        return (loss_pos + loss_neg) / num_points


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss ``1 - (2 * sum(sig * t) + 1) / (sum(sig) + sum(t) + 1)`` for every (prediction, target).

    Arguments:
      logits (Tensor): (S, N, P) mask logits.
      targets (Tensor): (S, C, P) target masks in [0, 1].

    Returns:
      (Tensor): (S, N, C) float32.
    """
    assert logits.dim() == 3 and targets.dim() == 3, (
        f"expected logits (S, N, P) and targets (S, C, P), got {tuple(logits.shape)}, {tuple(targets.shape)}"
    )
    assert logits.shape[0] == targets.shape[0] and logits.shape[2] == targets.shape[2], (
        f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on S or P"
    )
    with no_autocast(logits.device):
        probs, targets = logits.float().sigmoid(), targets.float()
        numerator = 2.0 * torch.einsum("snp,scp->snc", probs, targets)
        denominator = probs.sum(dim=-1).unsqueeze(-1) + targets.sum(dim=-1).unsqueeze(-2)
        return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Elementwise-pair Dice loss. logits, targets: (K, P). Returns (K,) float32."""
    assert logits.shape == targets.shape, f"shape mismatch {tuple(logits.shape)} vs {tuple(targets.shape)}"
    probs = logits.float().sigmoid()
    targets = targets.float()
    numerator = 2.0 * (probs * targets).sum(dim=-1)
    denominator = probs.sum(dim=-1) + targets.sum(dim=-1)
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def pairwise_l1(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """L1 distance (summed over the 4 coordinates) between every pair of boxes of a slice.

    Arguments:
      boxes1 (Tensor): (S, N, 4).
      boxes2 (Tensor): (S, C, 4).

    Returns:
      (Tensor): (S, N, C) float32.
    """
    assert boxes1.dim() == 3 and boxes2.dim() == 3 and boxes1.shape[-1] == 4 and boxes2.shape[-1] == 4, (
        f"expected boxes (S, N, 4) and (S, C, 4), got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
    )
    assert boxes1.shape[0] == boxes2.shape[0], f"S differs: {tuple(boxes1.shape)} vs {tuple(boxes2.shape)}"
    with no_autocast(boxes1.device):
        return (boxes1.float().unsqueeze(2) - boxes2.float().unsqueeze(1)).abs().sum(dim=-1)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of corresponding boxes, broadcasting.

    Boxes are ``(x1, y1, x2, y2)``; a box with x2 < x1 or y2 < y1 is treated as having zero area.

    Arguments:
      boxes1 (Tensor): (..., 4).
      boxes2 (Tensor): (..., 4), broadcastable against boxes1.

    Returns:
      (Tensor): (...) float32 GIoU in [-1, 1].
    """
    assert boxes1.shape[-1] == 4 and boxes2.shape[-1] == 4, (
        f"boxes must have shape (..., 4), got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
    )
    with no_autocast(boxes1.device):
        boxes1, boxes2 = boxes1.float(), boxes2.float()
        area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (boxes1[..., 3] - boxes1[..., 1]).clamp(min=0)
        area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (boxes2[..., 3] - boxes2[..., 1]).clamp(min=0)

        inner_lo = torch.maximum(boxes1[..., :2], boxes2[..., :2])
        inner_hi = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
        inner_wh = (inner_hi - inner_lo).clamp(min=0)
        intersection = inner_wh[..., 0] * inner_wh[..., 1]
        union = area1 + area2 - intersection
        iou = intersection / union.clamp(min=_EPS)

        outer_lo = torch.minimum(boxes1[..., :2], boxes2[..., :2])
        outer_hi = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
        outer_wh = (outer_hi - outer_lo).clamp(min=0)
        enclosing = (outer_wh[..., 0] * outer_wh[..., 1]).clamp(min=_EPS)
        return iou - (enclosing - union) / enclosing


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU between two sets of boxes with shared leading dimensions.

    Arguments:
      boxes1 (Tensor): (..., N, 4).
      boxes2 (Tensor): (..., M, 4).

    Returns:
      (Tensor): (..., N, M) float32.
    """
    assert boxes1.dim() >= 2 and boxes2.dim() >= 2, (
        f"boxes must have shape (..., N, 4) and (..., M, 4), got {tuple(boxes1.shape)}, {tuple(boxes2.shape)}"
    )
    return elementwise_generalized_box_iou(boxes1.unsqueeze(-2), boxes2.unsqueeze(-3))


class MaskSetCriterion(nn.Module):
    """MaskSAM's matched set loss over all 2D slices of a patch.

    Arguments:
      num_classes (int): C, nnU-Net's number of segmentation classes including background. The class head
        has C + 1 outputs, the last one being "no object".
      num_points (int | None): points per mask for the mask costs and losses; None: half the pixels of a slice,
        the public code's rule (128 * 128 * 2 points at 256 x 256, 256 * 256 * 2 at 512 x 512).
      point_sampling (str): where the mask *loss* is evaluated. "importance" (default, the public code's
        Mask2Former recipe): per matched mask (final and auxiliary separately), :func:`uncertain_pixels` with
        ``oversample_ratio`` and ``importance_sample_ratio``. "pixels": one random
        subset of ``num_points`` pixels shared by all slices (all pixels if there are fewer), exact pixel values.
        Matching costs always use one uniform random pixel subset of ``num_points`` (the public matcher samples
        uniform points too).
      class_weight, no_object_weight, mask_bce_weight, mask_dice_weight, aux_mask_weight, box_l1_weight,
      box_giou_weight (float): term weights, used identically for the matching cost and the loss.
      ddp (bool): training with DistributedDataParallel. The class and matched-pair means then divide by the
        counts over all ranks (divided by the world size), so that DDP's gradient averaging gives the gradient
        of the loss over the global batch, as on one GPU (like Mask2Former's all-reduced number of masks).

    After every call ``last_components`` holds the unweighted loss terms (floats) for logging.
    """

    def __init__(
        self,
        num_classes: int,
        num_points: int | None = None,
        point_sampling: Literal["importance", "pixels"] = "importance",
        oversample_ratio: float = OVERSAMPLE_RATIO,
        importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
        class_weight: float = CLASS_WEIGHT,
        no_object_weight: float = NO_OBJECT_WEIGHT,
        mask_bce_weight: float = MASK_BCE_WEIGHT,
        mask_dice_weight: float = MASK_DICE_WEIGHT,
        aux_mask_weight: float = AUX_MASK_WEIGHT,
        box_l1_weight: float = BOX_L1_WEIGHT,
        box_giou_weight: float = BOX_GIOU_WEIGHT,
        ddp: bool = False,
    ) -> None:
        super().__init__()
        assert num_classes >= 1, f"num_classes must be >= 1, got {num_classes}"
        assert num_points is None or num_points >= 1, f"num_points must be >= 1 or None, got {num_points}"
        assert point_sampling in ("importance", "pixels"), f"point_sampling '{point_sampling}': importance or pixels"
        self.num_classes = num_classes
        self.num_points = num_points
        self.point_sampling = point_sampling
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.class_weight = class_weight
        self.no_object_weight = no_object_weight
        self.mask_bce_weight = mask_bce_weight
        self.mask_dice_weight = mask_dice_weight
        self.aux_mask_weight = aux_mask_weight
        self.box_l1_weight = box_l1_weight
        self.box_giou_weight = box_giou_weight
        self.ddp = ddp
        self.last_components: dict[str, float] = {}

    def _check_shapes(self, outputs: dict[str, Tensor], target: Tensor) -> Tensor:
        """Validate shapes; return the target as (B, 1, D, H, W)."""
        for key in ("pred_logits", "pred_masks", "aux_masks", "pred_boxes"):
            assert key in outputs, f"outputs must contain '{key}', got keys {sorted(outputs)}"
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        aux_masks, boxes = outputs["aux_masks"], outputs["pred_boxes"]
        assert logits.dim() == 4, f"pred_logits must have shape (B, D, N, C + 1), got {tuple(logits.shape)}"
        batch, depth, queries, channels = logits.shape
        assert channels == self.num_classes + 1, (
            f"pred_logits has {channels} class outputs, expected num_classes + 1 = {self.num_classes + 1}"
        )
        assert masks.dim() == 5 and masks.shape[:3] == (batch, depth, queries), (
            f"pred_masks must have shape (B, D, N, H, W) = ({batch}, {depth}, {queries}, H, W), "
            f"got {tuple(masks.shape)}"
        )
        assert aux_masks.shape == masks.shape, (
            f"aux_masks {tuple(aux_masks.shape)} must have the shape of pred_masks {tuple(masks.shape)}"
        )
        assert boxes.shape == (batch, depth, queries, 4), (
            f"pred_boxes must have shape (B, D, N, 4) = ({batch}, {depth}, {queries}, 4), got {tuple(boxes.shape)}"
        )
        assert isinstance(target, Tensor), (
            f"target must be a tensor, got {type(target).__name__} (with deep supervision pass target[0])"
        )
        if target.dim() == 4:  # 2d configuration: (B, 1, H, W) -> (B, 1, 1, H, W)
            target = target.unsqueeze(2)
        expected = (batch, 1, depth, *masks.shape[-2:])
        assert tuple(target.shape) == expected, (
            f"target must have shape (B, 1, D, H, W) = {expected} (or (B, 1, H, W) when D = 1) to match the "
            f"outputs, got {tuple(target.shape)}"
        )
        return target

    def forward(self, outputs: dict[str, Tensor], target: Tensor) -> Tensor:
        """Matched set loss.

        Arguments:
          outputs (dict): "pred_logits" (B, D, N, C + 1), "pred_masks" (B, D, N, H, W),
            "aux_masks" (B, D, N, H, W), "pred_boxes" (B, D, N, 4) normalised (x1, y1, x2, y2).
          target (Tensor): (B, 1, D, H, W) or, for D = 1, (B, 1, H, W) label map with values 0..C-1.

        Returns:
          (Tensor): scalar float32 loss.
        """
        target = self._check_shapes(outputs, target)
        device = outputs["pred_logits"].device
        with no_autocast(device):
            return self._loss(outputs, target.to(device))

    def _loss(self, outputs: dict[str, Tensor], target: Tensor) -> Tensor:
        batch, depth, queries, channels = outputs["pred_logits"].shape
        height, width = outputs["pred_masks"].shape[-2:]
        num_slices, num_pixels, num_classes = batch * depth, height * width, self.num_classes
        device = outputs["pred_logits"].device

        logits = outputs["pred_logits"].reshape(num_slices, queries, channels).float()
        pred_boxes = outputs["pred_boxes"].reshape(num_slices, queries, 4).float()
        masks = full_masks = outputs["pred_masks"].reshape(num_slices, queries, height, width)
        aux_masks = full_aux = outputs["aux_masks"].reshape(num_slices, queries, height, width)

        labels = target.reshape(num_slices, height, width)
        label_masks, present, gt_boxes = segments_from_labels(labels, num_classes)  # masks (S, C, H, W) bool
        num_points = self.num_points or max(num_pixels // 2, 1)
        points = torch.randperm(num_pixels, device=device)[:num_points] if num_points < num_pixels else None

        def at_points(t: Tensor) -> Tensor:  # (S, N|C, H, W) -> (S, N|C, P) float32 at the uniform pixel subset
            t = t.reshape(*t.shape[:2], num_pixels)
            return (t if points is None else t[..., points]).float()

        masks, aux_masks, gt_masks = at_points(masks), at_points(aux_masks), at_points(label_masks)

        with torch.no_grad():
            cost = self.class_weight * -logits.softmax(dim=-1)[..., :num_classes]
            cost = cost + self.mask_bce_weight * pairwise_bce(masks, gt_masks)
            cost = cost + self.mask_dice_weight * pairwise_dice(masks, gt_masks)
            cost = cost + self.aux_mask_weight * (
                pairwise_bce(aux_masks, gt_masks) + pairwise_dice(aux_masks, gt_masks)
            )
            cost = cost + self.box_l1_weight * pairwise_l1(pred_boxes, gt_boxes)
            cost = cost + self.box_giou_weight * (1.0 - generalized_box_iou(pred_boxes, gt_boxes))
            slice_idx, query_idx, class_idx = match_slices(cost, present)

        # Classification over all queries; unmatched queries target "no object" (index C).
        target_classes = torch.full((num_slices, queries), num_classes, dtype=torch.long, device=device)
        target_classes[slice_idx, query_idx] = class_idx
        class_weights = torch.ones(channels, dtype=torch.float32, device=device)
        class_weights[num_classes] = self.no_object_weight
        loss_class = F.cross_entropy(
            logits.reshape(-1, channels), target_classes.reshape(-1), weight=class_weights, reduction="sum"
        ) / self._mean_denominator(class_weights[target_classes].sum())

        # Mask and box terms, averaged over matched pairs.
        num_matched = self._mean_denominator(torch.tensor(float(slice_idx.numel()), device=device), minimum=1.0)
        if self.point_sampling == "importance":
            matched_gt_full = label_masks[slice_idx, class_idx]  # (K, H, W) bool
            matched_masks, matched_gt = self._importance_sampled(full_masks[slice_idx, query_idx], matched_gt_full)
            matched_aux, matched_aux_gt = self._importance_sampled(full_aux[slice_idx, query_idx], matched_gt_full)
        else:
            matched_gt = matched_aux_gt = gt_masks[slice_idx, class_idx]  # (K, P)
            matched_masks = masks[slice_idx, query_idx]
            matched_aux = aux_masks[slice_idx, query_idx]
        loss_bce = F.binary_cross_entropy_with_logits(matched_masks, matched_gt, reduction="none").mean(-1)
        loss_aux_bce = F.binary_cross_entropy_with_logits(matched_aux, matched_aux_gt, reduction="none").mean(-1)
        loss_bce, loss_aux_bce = loss_bce.sum() / num_matched, loss_aux_bce.sum() / num_matched
        loss_dice = dice_loss(matched_masks, matched_gt).sum() / num_matched
        loss_aux_dice = dice_loss(matched_aux, matched_aux_gt).sum() / num_matched

        matched_pred_boxes = pred_boxes[slice_idx, query_idx]  # (K, 4)
        matched_gt_boxes = gt_boxes[slice_idx, class_idx]
        loss_l1 = (matched_pred_boxes - matched_gt_boxes).abs().sum(-1).sum() / num_matched
        giou = elementwise_generalized_box_iou(matched_pred_boxes, matched_gt_boxes)
        loss_giou = (1.0 - giou).sum() / num_matched

        total = (
            self.class_weight * loss_class
            + self.mask_bce_weight * loss_bce
            + self.mask_dice_weight * loss_dice
            + self.aux_mask_weight * (loss_aux_bce + loss_aux_dice)
            + self.box_l1_weight * loss_l1
            + self.box_giou_weight * loss_giou
        )
        names = ("class", "mask_bce", "mask_dice", "aux_bce", "aux_dice", "box_l1", "box_giou", "total")
        values = torch.stack(
            [loss_class, loss_bce, loss_dice, loss_aux_bce, loss_aux_dice, loss_l1, loss_giou, total]
        ).detach()
        self.last_components = dict(zip(names, values.cpu().tolist()))
        return total

    def _importance_sampled(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Matched mask logits and targets (K, H, W) -> their values (K, P) at importance-sampled pixels."""
        logits, targets = logits.flatten(1), targets.flatten(1)
        num_points = self.num_points or max(logits.shape[1] // 2, 1)
        idx = uncertain_pixels(logits, num_points, self.oversample_ratio, self.importance_sample_ratio)
        return logits.gather(1, idx).float(), targets.gather(1, idx).float()

    def _mean_denominator(self, count: Tensor, minimum: float = 0.0) -> Tensor:
        """max(count, minimum) for a mean over this call; under DDP max(sum of count over ranks, minimum) / ranks."""
        world = 1
        if self.ddp and dist.is_initialized():
            count = count.detach().clone()
            dist.all_reduce(count)
            world = dist.get_world_size()
        return count.clamp(min=minimum) / world

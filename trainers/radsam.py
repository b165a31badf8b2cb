"""RadSAM trainers: ``nnUNetv2_train DATASET 2d FOLD -tr RadSAMTrainer`` (and variants).

A 2D promptable SAM trained on nnU-Net's 2d batches with prompts simulated from the labels on the fly
(:class:`~nnunet_sam.prompting.radsam_prompts.SimulatedInteraction`): every foreground class of a slice is one
structure with its own prompt (a point inside it, a perturbed box or a noisy mask, drawn at random), followed by
``correction_rounds`` rounds of one correction click each with the previous prediction as the mask prompt. Loss:
Dice + BCE over all rounds; structures with fewer than 15 pixels on a slice are left out. The 3D product (one prompt
-> a 3D mask, editing) is :mod:`nnunet_sam.radsam`; ``nnUNetv2_predict`` cannot run a promptable model.
"""

from __future__ import annotations

import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_sam.network_architectures.radsam import RadSAMLoss, RadSAMNetwork, intensity_windows
from nnunet_sam.planning import record_attention
from nnunet_sam.prompting.radsam_prompts import (
    MIN_LABEL_PIXELS,
    SimulatedInteraction,
    pick_structures,
    structure_masks,
)
from nnunet_sam.trainers.base import CPUDemo, LiteMedSAM, MedSAM, SAMTrainer, Tiny, ViTH, ViTL


class RadSAMTrainer(SAMTrainer):
    """RadSAM on SAM ViT-B (``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``); 2d configuration only.

    Unlike the other SAM trainers, SAM itself trains (the paper fine-tunes the whole model). The patch covers the
    planned 2d patch with up to ``max_tiles`` attention windows (4: 896 px for SAM's ViTs), so a slice is seen
    whole at nnU-Net's spacing, as at inference.
    """

    max_depth = 1
    max_tiles = 4
    correction_rounds: int = 2
    ct_window_hu: tuple[float, float] = (-500.0, 1000.0)  # CT intensities clipped to this window, scaled to [0, 1]

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        planned = PlansManager(plans).get_configuration(configuration).patch_size
        if len(planned) != 2:
            raise ValueError(
                f"{type(self).__name__} is a 2D promptable model: train nnU-Net's 2d configuration "
                f"(nnUNetv2_train DATASET 2d FOLD -tr {type(self).__name__}), not '{configuration}'."
            )
        super().__init__(plans, configuration, fold, dataset_json, device)

    @classmethod
    def build_network(cls, record: dict, num_input_channels: int, num_output_channels: int) -> nn.Module:
        return RadSAMNetwork(
            record["backbone"],
            num_input_channels,
            record["patch_size"],
            record["sam_input_size"],
            attention=record_attention(record),
        )

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = False,
    ) -> nn.Module:
        """The network of the plans' ``nnunet_sam`` block with the intensity windows of the plans' normalisation."""
        network = super().build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision
        )
        windows = intensity_windows(
            configuration_manager.normalization_schemes,
            plans_manager.plans.get("foreground_intensity_properties_per_channel", {}),
            cls.ct_window_hu,
        )
        network.set_intensity_windows(windows)
        return network

    def _build_loss(self) -> nn.Module:
        return RadSAMLoss()

    def configure_optimizers(self):
        self._plain_network().sam.requires_grad_(True)  # RadSAM fine-tunes SAM itself
        return super().configure_optimizers()

    def train_step(self, batch: dict) -> dict:
        """One structure per slice (:func:`pick_structures`) with simulated prompts and correction rounds."""
        target = pick_structures(batch["target"].to(self.device), self.label_manager.num_segmentation_heads)
        reference = target[:, 0].bool()
        self._plain_network().queue_interaction(SimulatedInteraction(reference, self.correction_rounds))
        return super().train_step({**batch, "target": target})

    def validation_step(self, batch: dict) -> dict:
        """Loss and pseudo-Dice per class of the prediction from one simulated initial prompt per structure."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        reference = structure_masks(target, self.label_manager.num_segmentation_heads)  # (B, K, P, P)
        self._plain_network().queue_interaction(SimulatedInteraction(reference.flatten(0, 1), rounds=0))
        logits = self.network(data)  # (1, B, K, P, P)
        loss = self.loss(logits, target)
        valid = (reference.flatten(2).sum(2) >= MIN_LABEL_PIXELS)[..., None, None]  # as in the loss
        prediction = ((logits[0] > 0) & valid).half()
        tp, fp, fn, _ = get_tp_fp_fn_tn(prediction, (reference & valid).half(), axes=[0, 2, 3])
        return {
            "loss": loss.detach().cpu().numpy(),
            "tp_hard": tp.detach().cpu().numpy(),
            "fp_hard": fp.detach().cpu().numpy(),
            "fn_hard": fn.detach().cpu().numpy(),
        }

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation predicts without prompts, which a promptable model cannot do."""
        self.print_to_log_file(
            "RadSAM: nnU-Net's prompt-free validation is skipped; evaluate with nnunet_sam_radsam_benchmark "
            "(volume- and slice-level prompting, simulated edits)."
        )


class RadSAMTrainer_vitl(ViTL, RadSAMTrainer):
    pass


class RadSAMTrainer_vith(ViTH, RadSAMTrainer):
    pass


class RadSAMTrainer_MedSAM(MedSAM, RadSAMTrainer):
    pass


class RadSAMTrainer_LiteMedSAM(LiteMedSAM, RadSAMTrainer):
    pass


class RadSAMTrainer_tiny(Tiny, RadSAMTrainer):
    """Tiny backbone (pipeline check); up to 128 px slices (4 windows of 32 px)."""

    max_depth = 1
    max_tiles = 4


class RadSAMTrainer_tiny_demo(CPUDemo, RadSAMTrainer_tiny):
    """A few minutes of CPU training of the tiny RadSAM (``epochs`` x ``iterations_per_epoch`` steps).

    CT window [-200, 400] HU instead of the paper's [-500, 1000]: the phantom's organs (40 to 250 HU) then span a
    third of the [0, 1] range rather than a tenth. Training SAM from random weights first collapses to empty masks
    (pseudo-Dice 0 for 2 to 6 epochs here, an epoch of 25 steps taking about 5 s); with the paper's window one of
    four 8-epoch runs never left that state, so the demo trains 20 epochs (500 steps) for a margin.
    """

    ct_window_hu = (-200.0, 400.0)

    epochs = 20
    iterations_per_epoch = 25
    val_iterations_per_epoch = 2

"""RadSAM trainers: ``nnUNetv2_train DATASET 2d FOLD -tr RadSAMTrainer`` (and variants).

A 2D promptable SAM trained on nnU-Net's 2d batches with prompts simulated from the labels on the fly
(:class:`~nnunet_sam.prompting.radsam_prompts.SimulatedInteraction`): every foreground class of a slice is one
structure with its own prompt (a point inside it, a perturbed box or a noisy mask, drawn at random), followed by
``correction_rounds`` rounds of one correction click each with the previous prediction as the mask prompt. Loss:
Dice + BCE over all rounds, on SAM's primary mask plus the best of its three other masks (the paper's oracle loss,
``options.multimask_training``); structures with fewer than 15 pixels on a slice are left out. CT windows are
varied at random per training slice (``hu_window_jitter``). Every training slice is drawn at a labelled voxel
(``foreground_slices``), so it holds a structure. The 3D product (one prompt -> a 3D mask, editing) is
:mod:`nnunet_sam.inference.radsam`; ``nnUNetv2_predict`` cannot run a promptable model.
"""

from __future__ import annotations

import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_sam.backbones.contract import SOFT_TISSUE_WINDOW_HU, input_contract
from nnunet_sam.losses.segmentation import RadSAMLoss
from nnunet_sam.network_architectures.radsam import (
    CT_SCHEMES,
    RadSAMNetwork,
    RadSAMOptions,
    apply_windows,
    intensity_windows,
    random_ct_windows,
)
from nnunet_sam.prompting.radsam_prompts import (
    MIN_LABEL_PIXELS,
    SimulatedInteraction,
    pick_structures,
    structure_masks,
)
from nnunet_sam.trainers.backbone_variants import LiteMedSAM, MedSAM, Tiny, ViTH, ViTL
from nnunet_sam.trainers.base import SAMTrainer, UnsupportedDatasetError
from nnunet_sam.trainers.cpu_demo import CPUDemo
from nnunet_sam.trainers.presets import with_sources


class RadSAMTrainer(SAMTrainer):
    """RadSAM on SAM ViT-B (``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``); 2d configuration only.

    Unlike the other SAM trainers, SAM itself trains (the paper fine-tunes the whole model). The patch covers the
    planned 2d patch with up to ``max_tiles`` attention windows (4: 896 px for SAM's ViTs), so a slice is seen
    whole at nnU-Net's spacing, as at inference. The backbone is fed by its input contract
    (:mod:`nnunet_sam.backbones.contract`): value range and normalisation as in pretraining, padding after
    normalisation, prompt coordinates as SAM's. CT channels are windowed in HU: exactly where the plans keep HU
    (nnU-Net's ``NoNormalization``), else recovered from nnU-Net's CT z-scores (clipped by nnU-Net to the training
    labels' 0.5-99.5 percentiles). Departures, on purpose:

    * input size: SAM's ViTs and MedSAM see the patch at its own size (up to 896 px) instead of 1024 px, because all
      of SAM fine-tuned at 1024 px with nnU-Net's 2d batch would not fit one GPU (``RadSAMTrainer_AMOS`` is the
      paper's 1024-px regime). LiteMedSAM is fed at its 256 px (``contract_input_size``), which costs little;
    * prompt tokens: training batches mix point, box and mask prompts, so prompt rows are padded to one token count
      (``options.prompt_tokens`` "padded"); prediction uses the same tokens.
    """

    network_class = RadSAMNetwork
    options: RadSAMOptions = RadSAMOptions()  # CT window (the paper's [-500, 1000] HU), multi-mask loss
    # AdamW at 1e-5 over all of SAM: nnU-Net's SGD (1e-2, momentum 0.99) erased LiteMedSAM's zero-shot Dice on
    # structures it was not trained on (stomach, aorta, IVC of a real CT: 0.89-0.92 with AdamW, 0.00 with SGD after
    # 20 CPU steps; docs/real_images.md). RadSAMTrainer_SGD keeps nnU-Net's SGD.
    optimizer_name = "adamw"
    learning_rate = 1e-5
    contract_input_size: bool = False  # True: SAM input = the backbone's pretraining size (see the docstring)
    max_depth = 1
    max_tiles = 4
    correction_rounds: int = 2
    # Training only: each bound of the CT window moves by up to this fraction of its width, at random per slice
    # (the paper varies the window as augmentation; it gives no range). 0 turns it off.
    hu_window_jitter: float = 0.1
    # Share of training slices drawn at a labelled voxel (nnU-Net's oversample_foreground_percent, 0.33 there): a slice
    # without a structure of >= 15 px gives no loss, so RadSAM draws every training slice at a labelled voxel.
    foreground_slices: float = 1.0
    training_mask_prompts: bool = True  # noisy-mask prompts and the previous mask in correction rounds (Table 9)

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.oversample_foreground_percent = self.foreground_slices

    @classmethod
    def check_dataset(cls, plans_manager: PlansManager, configuration: str, label_manager: LabelManager) -> None:
        """A 2D configuration."""
        super().check_dataset(plans_manager, configuration, label_manager)
        if len(plans_manager.get_configuration(configuration).patch_size) != 2:
            raise UnsupportedDatasetError(
                f"{cls.__name__} is a 2D promptable model: train nnU-Net's 2d configuration "
                f"(nnUNetv2_train DATASET 2d FOLD -tr {cls.__name__}), not '{configuration}'."
            )

    @classmethod
    def default_sam_input_size(cls) -> int | None:
        """The backbone's pretraining size (its input contract) where ``contract_input_size`` says so and the trainer
        fixes no size; otherwise the patch size."""
        if cls.sam_input_size is None and cls.contract_input_size and cls.options.input_contract:
            return input_contract(cls.backbone).input_size
        return cls.sam_input_size

    @classmethod
    def configure_from_plans(
        cls, network: nn.Module, plans_manager: PlansManager, configuration_manager: ConfigurationManager
    ) -> None:
        """The intensity windows of the plans' normalisation and the record's CT window (with the input contract,
        channels that are not CT take each slice's own percentile window)."""
        schemes = configuration_manager.normalization_schemes
        windows = intensity_windows(
            schemes,
            plans_manager.plans.get("foreground_intensity_properties_per_channel", {}),
            network.options.ct_window_hu,
        )
        if network.contract is not None:
            windows = [w if scheme in CT_SCHEMES else None for w, scheme in zip(windows, schemes)]
        network.set_intensity_windows(windows)

    @classmethod
    def build_loss(cls, num_classes: int, ddp: bool = False) -> nn.Module:
        return RadSAMLoss()

    def configure_optimizers(self):
        self._plain_network().sam.requires_grad_(True)  # RadSAM fine-tunes SAM itself
        return super().configure_optimizers()

    def train_step(self, batch: dict) -> dict:
        """One structure per slice (:func:`pick_structures`) with simulated prompts and correction rounds."""
        target = pick_structures(batch["target"].to(self.device), self.label_manager.num_segmentation_heads)
        return super().train_step({**batch, "data": self.random_hu_windows(batch["data"]), "target": target})

    def random_hu_windows(self, data: torch.Tensor) -> torch.Tensor:
        """HU-window augmentation: CT channels of data (B, M, P, P) remapped so that the network's fixed window
        acts as a random one per slice (:func:`random_ct_windows`); other channels unchanged."""
        config = self.configuration_manager
        properties = self.plans_manager.plans.get("foreground_intensity_properties_per_channel", {})
        windows = intensity_windows(config.normalization_schemes, properties, self.options.ct_window_hu)
        affine = random_ct_windows(
            windows,
            config.normalization_schemes,
            properties,
            self.options.ct_window_hu,
            self.hu_window_jitter,
            len(data),
        )
        return apply_windows(data, affine)

    def forward_batch(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training: logits (1 + rounds, B, 1, P, P) of simulated prompts and correction rounds for the structures
        :meth:`train_step` picked (``target`` (B, 1, P, P)). Validation: logits (1, B, K, P, P) (or
        (1, B, K, 4, P, P) with SAM's four masks) from one simulated initial prompt per structure of the label map."""
        if self.network.training:
            interaction = SimulatedInteraction(
                target[:, 0].bool(), self.correction_rounds, mask_prompts=self.training_mask_prompts
            )
            return self.network(data, interaction=interaction)
        reference = structure_masks(target, self.label_manager.num_segmentation_heads)  # (B, K, P, P)
        return self.network(data, interaction=SimulatedInteraction(reference.flatten(0, 1), rounds=0))

    def pseudo_dice_counts(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Counts per structure class of the primary masks (validation's :meth:`forward_batch`)."""
        reference = structure_masks(target, self.label_manager.num_segmentation_heads)  # (B, K, P, P)
        logits = logits[:, :, :, 0] if logits.dim() == 6 else logits  # the primary mask, as at prediction
        valid = (reference.flatten(2).sum(2) >= MIN_LABEL_PIXELS)[..., None, None]  # as in the loss
        prediction = ((logits[0] > 0) & valid).half()
        tp, fp, fn, _ = get_tp_fp_fn_tn(prediction, (reference & valid).half(), axes=[0, 2, 3])
        return tp, fp, fn

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation predicts without prompts, which a promptable model cannot do."""
        self.print_to_log_file(
            "RadSAM: nnU-Net's prompt-free validation is skipped; evaluate with nnunet_sam_benchmark_radsam "
            "(volume- and slice-level prompting, simulated edits)."
        )


class RadSAMTrainer_AdamW(RadSAMTrainer):
    """RadSAM with AdamW at 1e-5: the default since this optimiser was chosen from evidence (the name is kept for
    models and scripts that use it)."""


class RadSAMTrainer_SGD(RadSAMTrainer):
    """RadSAM with nnU-Net's SGD (LR 1e-2, momentum 0.99, Nesterov), the default before: over all of SAM it moves the
    pretrained weights so far that zero-shot Dice on untrained structures collapsed in 20 CPU steps."""

    optimizer_name = "sgd"
    learning_rate = None


class RadSAMTrainer_vitl(ViTL, RadSAMTrainer):
    pass


class RadSAMTrainer_vith(ViTH, RadSAMTrainer):
    pass


class RadSAMTrainer_MedSAM(MedSAM, RadSAMTrainer):
    """MedSAM's weights, its soft-tissue CT window (its training data's rendering) instead of the paper's."""

    options = RadSAMOptions(ct_window_hu=SOFT_TISSUE_WINDOW_HU)


class RadSAMTrainer_LiteMedSAM(LiteMedSAM, RadSAMTrainer):
    """LiteMedSAM's weights, its soft-tissue CT window and its 256 px input (the input contract)."""

    options = RadSAMOptions(ct_window_hu=SOFT_TISSUE_WINDOW_HU)
    contract_input_size = True


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

    options = RadSAMOptions(ct_window_hu=(-200.0, 400.0))

    epochs = 20
    iterations_per_epoch = 25
    val_iterations_per_epoch = 2


# ---- paper presets (README "Paper presets", docs/presets.md: every field with its source) -------------------------
class RadSAMTrainer_AMOS(RadSAMTrainer):
    """RadSAM as trained on AMOS CT (2d configuration): SAM ViT-B, CT window [-500, 1000] HU, 512-px slices at 1024
    px (paper sections 3.1-3.2). No public code exists; the paper states no batch size, optimiser or LR (section
    3.4: 32 V100s, about 4 passes over all slice / prompt pairs), so those are stated choices."""

    backbone = "vit_b"
    fixed_patch = (512, 512)
    input_scale = 2
    optimizer_name = "adamw"
    learning_rate = 1e-5
    fixed_batch_size = 2
    epochs = 1000
    preset_sources = {
        "backbone": "paper: sections 3.1-3.2 (SAM ViT-B; ViT-L is an ablation)",
        "fixed_patch": "paper: section 3.2 (AMOS slices of 512 px)",
        "input_scale": "paper: section 3.2 (resized / padded to 1024 px)",
        "options": "paper: section 3.1 (CT window [-500, 1000] HU)",
        "epochs": "chosen: nnU-Net's 1000 x 250 iterations (paper: about 4 passes over all slices)",
        "fixed_batch_size": "chosen: not stated (32 GPUs); the batch of the other 1024-px presets",
        "optimizer_name": "chosen: not stated; AdamW (nnU-Net's SGD erased pretrained knowledge: docs/real_images.md)",
        "learning_rate": "chosen: not stated; 1e-5, small steps on pretrained weights",
        "optimizer_weight_decay": "chosen: not stated; nnU-Net's 3e-5",
        "lr_schedule": "chosen: not stated; nnU-Net's poly 0.9",
        "grad_clip": "chosen: not stated; nnU-Net's 12",
    }


# The paper's Table 9 (AMOS, slice-level prompting): training without mask prompts and / or without edit rounds.
class RadSAMTrainer_AMOS_noMask(RadSAMTrainer_AMOS):
    """``RadSAMTrainer_AMOS`` trained without mask prompts (no noisy-mask prompt, no mask in correction rounds)."""

    training_mask_prompts = False
    preset_sources = with_sources(RadSAMTrainer_AMOS.preset_sources, training_mask_prompts="paper: Table 9, no mask")


class RadSAMTrainer_AMOS_noEdit(RadSAMTrainer_AMOS):
    """``RadSAMTrainer_AMOS`` trained without correction (edit) rounds."""

    correction_rounds = 0
    preset_sources = with_sources(RadSAMTrainer_AMOS.preset_sources, correction_rounds="paper: Table 9, no edition")


class RadSAMTrainer_AMOS_noMaskNoEdit(RadSAMTrainer_AMOS):
    """``RadSAMTrainer_AMOS`` trained without mask prompts and without correction rounds."""

    training_mask_prompts = False
    correction_rounds = 0
    preset_sources = with_sources(
        RadSAMTrainer_AMOS.preset_sources,
        training_mask_prompts="paper: Table 9, no mask",
        correction_rounds="paper: Table 9, no edition",
    )

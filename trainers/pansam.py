"""PanSAM trainers: ``nnUNetv2_train DATASET 3d_fullres FOLD -tr PanSAMTrainer`` (and variants).

PanSAM segments one structure. The three stages train one after the other within one nnU-Net training, over
consecutive epoch ranges (``stage_fractions`` of the epochs); the stage follows from the epoch, so ``--c``
resumes in the right one. PanSAM uses nnU-Net's 3d_fullres configuration: each patch holds D neighbouring
slices that SAM processes one by one (folded into the batch) and that the 3D aggregator then sees together; a 2d
configuration would give the aggregator a single slice, so it is refused.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_sam.losses.segmentation import FocalDiceLoss
from nnunet_sam.network_architectures.pansam import STAGE_OUTPUT, PanSAMNetwork, PanSAMOptions
from nnunet_sam.network_architectures.radsam import CT_SCHEMES, intensity_windows
from nnunet_sam.prompting.pansam_points import PointPromptConfig
from nnunet_sam.trainers.backbone_variants import LiteMedSAM, MedSAM, Tiny, ViTH, ViTL
from nnunet_sam.trainers.base import SAMTrainer, UnsupportedDatasetError
from nnunet_sam.trainers.cpu_demo import CPUDemo
from nnunet_sam.trainers.presets import with_sources
from nnunet_sam.training.lr_schedules import StagePolyLRScheduler


def stage_starts(fractions: tuple[float, float, float], num_epochs: int) -> tuple[int, int, int]:
    """First epoch of stages 1, 2, 3 for the given shares of ``num_epochs`` (a stage may get no epoch)."""
    assert len(fractions) == 3 and abs(sum(fractions) - 1) < 1e-6, f"stage fractions must sum to 1, got {fractions}"
    first = round(fractions[0] * num_epochs)
    return 0, first, round((fractions[0] + fractions[1]) * num_epochs)


class PanSAMTrainer(SAMTrainer):
    """PanSAM on SAM ViT-B (the paper's experiments); needs ``sam_vit_b_01ec64.pth`` in ``$nnUNet_SAM_checkpoints``.

    Stage 1 trains SAM's mask decoder without prompts, stage 2 the prompt-based segmentor (prompt encoder + its
    mask decoder) on points from stage 1's probability map, stage 3 the 3D aggregator; earlier stages are frozen.
    Loss: focal + 0.05 * Dice, each stage's output against the reference.
    """

    network_class = PanSAMNetwork
    options: PanSAMOptions = PanSAMOptions()
    # The label of the structure to segment. None: the dataset must have exactly one foreground label.
    # Multi-class datasets: one model per structure, each a subclass with its own target_label.
    target_label: int | None = None
    stage_fractions: tuple[float, float, float] = (0.4, 0.4, 0.2)
    dice_weight: float = 0.05

    @classmethod
    def check_dataset(cls, plans_manager: PlansManager, configuration: str, label_manager: LabelManager) -> None:
        """A 3D configuration, and one structure (or ``target_label`` naming one)."""
        super().check_dataset(plans_manager, configuration, label_manager)
        if len(plans_manager.get_configuration(configuration).patch_size) != 3:
            raise UnsupportedDatasetError(
                f"{cls.__name__} needs a 3D configuration (3d_fullres): its 3D aggregator combines the "
                f"scores of neighbouring slices, which a '{configuration}' patch does not contain. SAM still sees "
                "every slice on its own. Train with: nnUNetv2_train DATASET 3d_fullres FOLD -tr " + cls.__name__
            )
        foreground = list(label_manager.foreground_labels)
        if cls.target_label is None and len(foreground) != 1:
            raise UnsupportedDatasetError(
                f"{cls.__name__} segments one structure, but dataset.json has {len(foreground)} foreground "
                f"labels {foreground}. Subclass the trainer with `target_label = <label>` (one model per "
                "structure); the other labels then count as background."
            )
        if cls.target_label is not None and cls.target_label not in foreground:
            raise UnsupportedDatasetError(
                f"target_label {cls.target_label} is not a foreground label of this dataset ({foreground})."
            )

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._stage: int | None = None
        self.print_to_log_file(
            f"PanSAM: target label {self.label()}, stages start at epochs "
            f"{stage_starts(self.stage_fractions, self.num_epochs)} of {self.num_epochs}, CLAHE "
            f"{'on' if self.options.clahe else 'off'}"
        )

    @classmethod
    def label(cls) -> int:
        return cls.target_label or 1

    @classmethod
    def record_options(cls) -> PanSAMOptions:
        return replace(cls.options, target_label=cls.label())

    @classmethod
    def configure_from_plans(
        cls, network: nn.Module, plans_manager: PlansManager, configuration_manager: ConfigurationManager
    ) -> None:
        """The point generator's windows (millimetres) follow the configuration's in-plane spacing; CT channels get
        the record's HU window through the plans' normalisation (as RadSAM's)."""
        spacing = configuration_manager.configuration.get("spacing")  # nnU-Net's plans always have it
        if spacing is not None:
            network.set_pixel_spacing(spacing[-2:])
        # plans without normalisation schemes (hand-made ones) give no CT channel to window: min-max as before
        try:
            schemes = configuration_manager.normalization_schemes
        except KeyError:
            schemes = None
        if network.options.ct_window_hu is not None and schemes:
            properties = plans_manager.plans.get("foreground_intensity_properties_per_channel", {})
            windows = intensity_windows(schemes, properties, network.options.ct_window_hu)
            network.set_intensity_windows([w if s in CT_SCHEMES else None for w, s in zip(windows, schemes)])

    @classmethod
    def build_loss(cls, num_classes: int, ddp: bool = False) -> nn.Module:
        return FocalDiceLoss(cls.label(), beta=cls.dice_weight)

    # ---- stages ---------------------------------------------------------------------------------------------
    def stage(self, epoch: int) -> int:
        starts = stage_starts(self.stage_fractions, self.num_epochs)
        return max(i + 1 for i, s in enumerate(starts) if s <= epoch)

    def _train_encoder(self) -> bool:
        return self._sam_checkpoint_path is None  # random SAM weights (tiny without checkpoint), see base

    def initialize(self) -> None:
        super().initialize()
        if not self._weights_from_nnunet_checkpoint:
            self._plain_network().init_prompt_stage_from_sam()

    def configure_optimizers(self):
        """One optimiser over every module any stage trains; each stage unfreezes only its own (the others get no
        gradient, so the optimiser leaves them alone). The poly LR schedule restarts at each stage."""
        net = self._plain_network()
        net.requires_grad_(False)
        for stage in (1, 2, 3):
            for module in net.stage_modules(stage, self._train_encoder()):
                module.requires_grad_(True)
        optimizer, _ = super().configure_optimizers()
        starts = stage_starts(self.stage_fractions, self.num_epochs)
        return optimizer, StagePolyLRScheduler(optimizer, self.initial_lr, starts, self.num_epochs)

    def on_train_epoch_start(self) -> None:
        stage, net = self.stage(self.current_epoch), self._plain_network()
        if stage != self._stage:  # a new stage, or the first epoch of this run (also after --c)
            self.print_to_log_file(f"PanSAM stage {stage} from epoch {self.current_epoch}")
            self._stage = stage
        net.set_stage(stage, self._train_encoder() and stage == 1)
        # checkpoint_best only ever holds a model of the current stage: best EMA pseudo-Dice within this stage
        start = stage_starts(self.stage_fractions, self.num_epochs)[stage - 1]
        emas = self.logger.get_value("ema_fg_dice", step=None)[start : self.current_epoch]
        finite = [e for e in emas if np.isfinite(e)]
        self._best_ema = max(finite) if finite else None
        super().on_train_epoch_start()

    def forward_batch(self, data: torch.Tensor, target: torch.Tensor) -> dict:
        """The output of the current stage (nnU-Net's final validation and prediction run the whole pipeline)."""
        return self.network(data, return_all=True, output=STAGE_OUTPUT[self.stage(self.current_epoch)])


class PanSAMTrainer_vitl(ViTL, PanSAMTrainer):
    pass


class PanSAMTrainer_vith(ViTH, PanSAMTrainer):
    """SAM ViT-H, the encoder of the paper's cost figures."""


class PanSAMTrainer_MedSAM(MedSAM, PanSAMTrainer):
    pass


class PanSAMTrainer_LiteMedSAM(LiteMedSAM, PanSAMTrainer):
    pass


class PanSAMTrainer_tiny(Tiny, PanSAMTrainer):
    pass


class PanSAMTrainer_tiny_demo(CPUDemo, PanSAMTrainer_tiny):
    """A few minutes of CPU training: 20 epochs of 30 steps, stages 8 / 8 / 4 epochs."""


# ---- paper presets (README "Paper presets", docs/presets.md: every field with its source) -------------------------
_PSDDSAM = "public PSDDSAM code (older commits; scripts with several LRs, none marked as the paper's run)"


class PanSAMTrainer_NIH(PanSAMTrainer):
    """PanSAM as trained on NIH Pancreas-CT (3d_fullres, one structure): SAM ViT-H (every script of its public code;
    the paper's section 4 says ViT-B: variant ``PanSAMTrainer_NIH_vitb``), whole 512-px slices at 1024 px, AdamW 5e-4
    (weight decay 5e-5), Dice weight 0.05, 8 slices per step as 2 patches of 4 (the 3D aggregator needs neighbours).
    The public scripts differ in their LRs and none is marked as the run behind the paper, so the optimiser follows
    the paper's appendix; OneCycle is replaced by the per-stage poly schedule."""

    backbone = "vit_h"
    fixed_patch = (4, 512, 512)
    input_scale = 2
    # The paper's 14 K aggregator parameters (appendix, cost): 3 layers of 16 channels give 14.3 K (2 layers: 7.4 K).
    options = PanSAMOptions(aggregator_layers=3)
    optimizer_name = "adamw"
    learning_rate = 5e-4
    optimizer_weight_decay = 5e-5
    dice_weight = 0.05
    fixed_batch_size = 2
    epochs = 1000
    preset_sources = {
        "options": "paper: appendix (aggregator of 14 K parameters: 3 layers, 14.3 K); points: Table 3 (4 points: "
        "one per source; the text's 2 border + 2 trivial background: variant _textpoints)",
        "backbone": f"code: {_PSDDSAM}: every script loads sam_vit_h_4b8939.pth (paper 4: ViT-B, variant _vitb)",
        "fixed_patch": "paper: section 4 (whole 512-px slices); 4 slices chosen for the 3x3x3 aggregator",
        "input_scale": "paper: section 4 (slices resized to 1024 px)",
        "epochs": "chosen: not stated (public scripts: 40 or 80 passes); nnU-Net's 1000 x 250 iterations",
        "fixed_batch_size": "paper: appendix (8 slices per step) = 2 patches of 4 slices",
        "optimizer_name": "paper: appendix (Adam; AdamW here for decoupled weight decay)",
        "learning_rate": "paper: appendix (5e-4; no public script uses it)",
        "optimizer_weight_decay": "paper: appendix (5e-5)",
        "lr_schedule": "chosen: per-stage poly (paper and code: OneCycle)",
        "grad_clip": "chosen: not stated; nnU-Net's 12",
        "dice_weight": "paper: appendix (0.05)",
    }


class PanSAMTrainer_NIH_vitb(PanSAMTrainer_NIH):
    """``PanSAMTrainer_NIH`` on SAM ViT-B, the backbone the paper's section 4 names (its code loads ViT-H)."""

    backbone = "vit_b"
    preset_sources = with_sources(PanSAMTrainer_NIH.preset_sources, backbone="paper: section 4 (ViT-B)")


class PanSAMTrainer_NIH_textpoints(PanSAMTrainer_NIH):
    """``PanSAMTrainer_NIH`` with the point counts of the paper's section 3.4 text: two border and two trivial
    background points (plus one core and one hard background point, counts the text does not give), 6 in all,
    where its Table 3 labels the reported result with 4 points (the preset: one per source)."""

    options = PanSAMOptions(aggregator_layers=3, points=PointPromptConfig(num_border=2, num_trivial_background=2))
    preset_sources = with_sources(
        PanSAMTrainer_NIH.preset_sources,
        options="paper: section 3.4 (two border, two trivial background points); appendix (14 K aggregator)",
    )

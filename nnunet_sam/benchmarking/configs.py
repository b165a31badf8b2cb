"""The configurations the benchmark measures, built the way the trainers build them.

SAM networks come from a trainer class and the record (the plans' ``nnunet_sam`` block) its own patch rule
derives; nnU-Net's default U-Net from nnU-Net's own plans and builder. :data:`PRESETS` lists the trainer
configurations of the preset table (every method's plain trainer and every paper preset trainer); adding a preset is
adding a row.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_sam.backbones.sam_vit import get_backbone
from nnunet_sam.trainers.masksam import MaskSAMTrainer, MaskSAMTrainer_ACDC, MaskSAMTrainer_AMOS, MaskSAMTrainer_Synapse
from nnunet_sam.trainers.pansam import PanSAMTrainer, PanSAMTrainer_NIH
from nnunet_sam.trainers.radsam import RadSAMTrainer, RadSAMTrainer_AMOS
from nnunet_sam.trainers.sam3d_adapter import SAM3DAdapterTrainer, SAM3DAdapterTrainer_prompted_paper
from nnunet_sam.trainers.self_prompt_sam import SelfPromptSAMTrainer, SelfPromptSAMTrainer_paper

# defined with the memory estimate (a training needs them); the benchmark and its tests import them from here too
from nnunet_sam.training.memory_estimate import Forward, on_meta, stand_in_trainer, training_forwards  # noqa: F401
from nnunet_sam.training.planning import PLANS_KEY
from nnunet_sam.training.synthetic_plans import configuration_name, nnunet_preprocessing, plans_for_patch


@dataclass(frozen=True)
class Preset:
    """One row of the preset table: a trainer class at a planned nnU-Net patch and batch size.

    ``block`` overrides fields of the derived record, as an ``nnunet_sam`` block in a plans file does. The batch
    size is the trainer's ``fixed_batch_size`` (a paper preset's), else 2, unless given.
    """

    name: str
    trainer: type
    planned_patch: tuple[int, ...] = (64, 192, 160)
    batch_size: int | None = None
    num_classes: int = 14
    block: dict = field(default_factory=dict)
    target_gib: float | None = None  # memory target of the issue, if any

    def __post_init__(self) -> None:
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", int(getattr(self.trainer, "fixed_batch_size", None) or 2))

    def record(self, attention: str | None = None) -> dict:
        block = dict(self.block) | ({"attention": attention} if attention else {})
        return sam_record(self.trainer, self.planned_patch, self.num_classes, block=block)


PRESETS: tuple[Preset, ...] = (
    Preset("MaskSAMTrainer", MaskSAMTrainer, target_gib=24),
    Preset("SelfPromptSAMTrainer", SelfPromptSAMTrainer, target_gib=24),
    Preset("SAM3DAdapterTrainer", SAM3DAdapterTrainer, target_gib=24),
    Preset("PanSAMTrainer", PanSAMTrainer, num_classes=2, target_gib=24),
    Preset("RadSAMTrainer", RadSAMTrainer, planned_patch=(192, 160), num_classes=2, target_gib=24),
    # The paper presets (trainer names; their fixed patch, input scale, queries and batch size come from the
    # trainer), with the memory targets where it states one.
    Preset("MaskSAM ACDC (ViT-B 1024 px)", MaskSAMTrainer_ACDC, num_classes=4, target_gib=24),
    Preset("MaskSAM AMOS (ViT-H 512 px)", MaskSAMTrainer_AMOS, num_classes=16, target_gib=80),
    Preset("MaskSAM AMOS (ViT-H 512 px, batch 1)", MaskSAMTrainer_AMOS, batch_size=1, num_classes=16, target_gib=48),
    Preset("MaskSAMTrainer_Synapse", MaskSAMTrainer_Synapse, num_classes=9),
    Preset("SelfPromptSAMTrainer_paper", SelfPromptSAMTrainer_paper, num_classes=4),
    Preset("SAM3DAdapterTrainer_prompted_paper", SAM3DAdapterTrainer_prompted_paper, num_classes=2),
    Preset("PanSAMTrainer_NIH", PanSAMTrainer_NIH, num_classes=2),
    Preset("RadSAMTrainer_AMOS", RadSAMTrainer_AMOS, planned_patch=(512, 512), num_classes=16),
)


METHODS: dict[str, type] = {"MaskSAMTrainer": MaskSAMTrainer, "SelfPromptSAMTrainer": SelfPromptSAMTrainer}
BACKBONES = ("tiny", "lite_medsam", "vit_b", "vit_l", "vit_h")
CPU_BACKBONES = ("tiny", "lite_medsam")


def available_backbones(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The backbones of ``names`` that are registered, and the reason for each one that is not."""
    found, missing = [], {}
    for name in names:
        try:
            get_backbone(name)
            found.append(name)
        except ValueError as e:
            missing[name] = str(e)
    return found, missing


def trainer_class(method: type, backbone: str) -> type:
    """The trainer users pick for ``method`` on ``backbone`` (shortest such class name), or a plain variant."""
    module = sys.modules[method.__module__]
    candidates = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, method) and c.backbone == backbone and "demo" not in c.__name__
    ]
    if candidates:
        return min(candidates, key=lambda c: len(c.__name__))
    return type(f"{method.__name__}_{backbone}", (method,), {"backbone": backbone})


def sam_record(
    trainer: type,
    planned_patch: Sequence[int],
    num_classes: int,
    sam_input_size: int | None = None,
    block: dict | None = None,
) -> dict:
    """The record block a training of ``trainer`` saves for an nnU-Net patch (``trainer.sam_block``: its patch rule
    or fixed patch, input size, queries and options); ``block`` holds fields that override the rule, as an
    ``nnunet_sam`` block in a plans file does (e.g. ``{"attention": "sam"}`` for segment-anything's attention)."""
    if sam_input_size is not None:
        trainer = type(trainer.__name__, (trainer,), {"sam_input_size": sam_input_size, "input_scale": None})
    configuration = {"patch_size": list(planned_patch), PLANS_KEY: dict(block or {})}
    return trainer.sam_block(configuration, num_classes)


def build_sam_network(trainer: type, record: dict, in_channels: int, num_classes: int) -> nn.Module:
    """The trainer's network from a record, through the trainer's own ``build_network`` (as nnUNetv2_predict)."""
    return trainer.build_network(record, in_channels, num_classes)


def training_network(trainer: type, record: dict, in_channels: int, num_classes: int) -> nn.Module:
    """The trainer's network from a record with the parameters its ``configure_optimizers`` trains (e.g. all of SAM
    for RadSAM, every stage's modules for PanSAM), as in a training from SAM's pretrained weights."""
    net = build_sam_network(trainer, record, in_channels, num_classes)
    stand_in_trainer(trainer, net, num_classes).configure_optimizers()
    return net


def unet_plans(patch: Sequence[int], num_classes: int) -> dict:
    """A plans dict whose configuration holds nnU-Net's default PlainConvUNet for ``patch`` (isotropic spacing)."""
    dim = len(patch)
    _, strides, kernels, planned, _ = get_pool_and_conv_props([1.0] * dim, list(patch), 4, 999999)
    assert list(planned) == list(patch), f"nnU-Net would change the patch {list(patch)} to {list(planned)}"
    stages = len(strides)
    conv, norm = ("Conv3d", "InstanceNorm3d") if dim == 3 else ("Conv2d", "InstanceNorm2d")
    arch = {
        "n_stages": stages,
        "features_per_stage": [min(32 * 2**i, 320 if dim == 3 else 512) for i in range(stages)],
        "conv_op": f"torch.nn.modules.conv.{conv}",
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage": [2] * stages,
        "n_conv_per_stage_decoder": [2] * (stages - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.{norm}",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": arch,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return plans_for_patch(
        patch,
        dataset_name="Dataset999_Benchmark",
        data_identifier="benchmark",
        architecture=architecture,
        batch_dice=False,
        **nnunet_preprocessing([1.0] * dim),
    )


def build_unet(patch: Sequence[int], in_channels: int, num_classes: int) -> nn.Module:
    """nnUNetTrainer's network for ``patch`` through nnU-Net's own build path (deep supervision off)."""
    plans = PlansManager(unet_plans(patch, num_classes))
    config = plans.get_configuration(configuration_name(patch))
    return nnUNetTrainer.build_network_architecture(plans, config, in_channels, num_classes, False)

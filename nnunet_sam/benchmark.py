"""``nnunet_sam_benchmark``: what the SAM trainers cost next to nnU-Net's default U-Net, on any machine.

Figures and how each is obtained:

* **Parameters**: total / trainable / frozen; trainable = ``requires_grad``, exactly what
  ``SAMTrainer.configure_optimizers`` gives the optimiser when a pretrained SAM checkpoint is used (SAM frozen).
* **FLOPs** (``torch.utils.flop_counter.FlopCounterMode``) on networks built on the ``meta`` device with meta
  inputs: nothing is computed, full-size ViTs are counted in seconds. A training step is forward (train mode) +
  loss + backward; on meta tensors the loss is a surrogate (the mean of every output the real loss reads), because
  the real set loss needs Hungarian matching on real values; its own FLOPs are negligible and the backward graph
  through the network is the same. Inference is one eval-mode forward under ``no_grad``. Per sample (batch 1).
* **Frozen-backbone floor**: forward+backward / forward of the network's encoder path (stem, SAM image encoder,
  adapters) with every weight frozen and only the input needing a gradient; full fine-tuning is about 3. The
  all-frozen ratio of the whole network is reported too: the real step minus it is the weight-gradient work of the
  trainable parameters.
* **Peak training memory** = fp32 parameters + fp32 gradients and optimiser state of the trainable parameters +
  activations. Activations = bytes of the tensors saved for backward at the end of the forward pass, summed
  through ``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by storage (parameters excluded): fp32 on
  meta tensors; "autocast" = 16-bit autocast, which nnU-Net already uses on CUDA (fp16 + GradScaler), traced as
  bf16 autocast on fake CPU tensors (same bytes; CPU autocast rules stand in for CUDA's). Activation
  checkpointing of the encoder blocks is estimated from the same trace: tensors saved outside the encoder blocks +
  the input of every block (kept for the recomputation) + the largest single block (recomputed in backward).
  Not included: the CUDA context and allocator fragmentation (about 0.5-1 GiB) and transient backward buffers.
* **CPU wall time** per training step (forward + real loss + backward + optimiser step) and per inference patch:
  median of ``--runs`` after ``--warmup`` runs, for the backbones that run here, with nnU-Net's U-Net at the same
  patch measured in the same run.
* **Inference against volume size**: nnU-Net's own sliding-window predictor (``nnUNetPredictor``, tile step 0.5,
  Gaussian weighting, no mirroring) on volumes of 1x, 2x, 4x voxels with the tiny backbone.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.fx.experimental._config as fx_config
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.inference.bound_forward import BoundForward
from nnunet_sam.losses import DeepSupervisedSegLoss, MaskSetCriterion
from nnunet_sam.planning import PLANS_KEY, PatchRule, sam_settings
from nnunet_sam.trainers.masksam import MaskSAMTrainer
from nnunet_sam.trainers.self_prompt_sam import SelfPromptSAMTrainer

GIB = 2**30
METHODS: dict[str, type] = {"MaskSAMTrainer": MaskSAMTrainer, "SelfPromptSAMTrainer": SelfPromptSAMTrainer}
BACKBONES = ("tiny", "lite_medsam", "vit_b", "vit_l", "vit_h")
CPU_BACKBONES = ("tiny", "lite_medsam")
MEMORY_OPTIONS = ("none", "checkpointing", "autocast", "checkpointing+autocast")
OPTIMIZER_STATE = {"sgd": 1, "adamw": 2}  # fp32 buffers per trainable parameter (momentum; Adam's two moments)


# ---- configurations ----------------------------------------------------------------------------------------------
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


def sam_record(trainer: type, planned_patch: Sequence[int], num_classes: int, sam_input_size: int | None = None):
    """The ``nnunet_sam`` plans block the trainer derives from an nnU-Net patch (see nnunet_sam.planning)."""
    spec = get_backbone(trainer.backbone)
    rule = PatchRule(trainer.max_depth, trainer.max_tiles)
    size = sam_input_size or trainer.sam_input_size
    return sam_settings({"patch_size": list(planned_patch)}, spec, rule, num_classes, trainer.num_queries, size)


def build_sam_network(
    trainer: type, record: dict, in_channels: int, num_classes: int, checkpointing: bool = False
) -> nn.Module:
    """The trainer's network (its own ``build_network``), optionally with encoder activation checkpointing."""
    options = dataclasses.replace(trainer.options, gradient_checkpointing=checkpointing)
    variant = type(trainer.__name__, (trainer,), {"options": options})
    return variant.build_network(variant.new_record(record), in_channels, num_classes)


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
    configuration = {
        "data_identifier": "benchmark",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch),
        "spacing": [1.0] * dim,
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {},
        "resampling_fn_seg_kwargs": {},
        "resampling_fn_probabilities_kwargs": {},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": arch,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset999_Benchmark",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * dim,
        "original_median_shape_after_transp": [256] * dim,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(range(dim)),
        "transpose_backward": list(range(dim)),
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres" if dim == 3 else "2d": configuration},
    }


def build_unet(patch: Sequence[int], in_channels: int, num_classes: int) -> nn.Module:
    """nnUNetTrainer's network for ``patch`` through nnU-Net's own build path (deep supervision off)."""
    plans = PlansManager(unet_plans(patch, num_classes))
    config = plans.get_configuration("3d_fullres" if len(patch) == 3 else "2d")
    return nnUNetTrainer.build_network_architecture(plans, config, in_channels, num_classes, False)


# ---- counting without computing -----------------------------------------------------------------------------------
def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module on the meta device (no memory, no init cost); tensors a builder pins to the CPU move too."""
    with torch.device("meta"):
        return build().to("meta")


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(storage identity, storage bytes); bytes 0 where the size is symbolic (a few prompt tokens on fake tensors)."""
    try:
        storage = t.untyped_storage()
        return storage._cdata, int(storage.nbytes())
    except Exception:  # noqa: BLE001  (unbacked symbolic sizes cannot be turned into an int)
        return id(t), 0


class SavedTensorTrace:
    """Sums the tensors saved for backward during a forward pass, attributed to encoder blocks or "outside".

    Attribution wraps ``encoder_additions._block`` of this (throw-away, meta or fake) network instance: the unit
    that activation checkpointing recomputes, for every backbone.
    """

    def __init__(self, net: nn.Module) -> None:
        self.params = {_storage(p)[0] for p in net.parameters()} | {_storage(b)[0] for b in net.buffers()}
        self.where: int | None = None
        self.seen: dict[int, tuple[int | None, int]] = {}  # storage -> (block or None, bytes)
        self.block_inputs: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps storages alive so that their identities stay unique
        self.additions = getattr(net, "encoder_additions", None)
        if self.additions is not None:
            self.additions._block = self._traced(self.additions._block)  # instance attribute shadows the method

    def _traced(self, run_block: Callable) -> Callable:
        def block(i: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            key, size = _storage(x)
            self.block_inputs[key] = size
            self.keep.append(x)
            self.where = i
            try:
                return run_block(i, module, x)
            finally:
                self.where = None

        return block

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, size = _storage(t)
        if key not in self.params and key not in self.seen:
            self.seen[key] = (self.where, size)
            self.keep.append(t)
        return t

    def run(self, fn: Callable[[], object]) -> dict:
        """Run ``fn`` (a forward pass) and return the byte counts."""
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                fn()
        finally:
            if self.additions is not None:
                del self.additions._block
        per_block: dict[int, int] = {}
        outside = 0
        for where, size in self.seen.values():
            if where is None:
                outside += size
            else:
                per_block[where] = per_block.get(where, 0) + size
        total = outside + sum(per_block.values())
        inputs_not_outside = sum(s for k, s in self.block_inputs.items() if self.seen.get(k, (0,))[0] is not None)
        checkpointed = outside + inputs_not_outside + max(per_block.values()) if per_block else None
        return {"total": total, "checkpointed": checkpointed}


def surrogate_loss(outputs) -> torch.Tensor:
    """Mean of every output tensor the training losses read ("semantic" is derived for nnU-Net only)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().mean()
    if isinstance(outputs, dict):
        outputs = [v for k, v in outputs.items() if k != "semantic"]
    return sum(surrogate_loss(o) for o in outputs)


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    bias,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    output_mask,
    out_shape,
    **kwargs,
) -> int:
    """PyTorch's conv backward formula with the weight-gradient term divided by ``groups``.

    ``torch.utils.flop_counter`` (2.14) ignores ``groups`` in that term and so counts a depth-wise conv's weight
    gradient ``channels`` times over (e.g. 3.1 GFLOP instead of 0.02 for a ViT-B DConv adapter on 8 slices).
    """
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    total = conv_backward_flop(*args, output_mask, out_val=out_shape)  # shape-wrapped: takes out_val
    if groups == 1 or not output_mask[1]:
        return total
    weight = conv_backward_flop(*args, [False, True, False], out_val=out_shape)
    return total - weight + weight // groups


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn`` by ``FlopCounterMode`` (with grouped-conv backward counted correctly)."""
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def _allow_meta_masks():
    # SAM's prompt encoder indexes with boolean masks; on meta tensors assume every element selected (token counts)
    return fx_config.patch(meta_nonzero_assume_all_nonzero=True)


def train_step_flops(net: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FLOPs of forward + surrogate loss + backward, and how many frozen parameters got a ``.grad`` from it."""
    net.zero_grad(set_to_none=True)

    def step():
        net.train()
        surrogate_loss(net(x)).backward()

    with _allow_meta_masks():
        flops = count_flops(step)
    frozen_with_grad = sum(1 for p in net.parameters() if not p.requires_grad and p.grad is not None)
    net.zero_grad(set_to_none=True)
    return flops, frozen_with_grad


def inference_flops(net: nn.Module, x: torch.Tensor) -> int:
    net.eval()
    with _allow_meta_masks(), torch.no_grad():
        return count_flops(lambda: net(x))


def encoder_floor(net: nn.Module, x: torch.Tensor) -> float:
    """Training / forward FLOP ratio of the network's encoder path (stem, SAM encoder, adapters) with every weight
    frozen and only the input needing a gradient: the floor that no trainable addition can go below."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    net.requires_grad_(False)
    x = x.detach().requires_grad_(True)

    def backward():
        embedding, features = net.encode(x)
        surrogate_loss([embedding, *features]).backward()

    try:
        net.train()
        return count_flops(backward) / count_flops(lambda: net.encode(x))
    finally:
        for p in trainable:
            p.requires_grad_(True)


def all_frozen_floor(net: nn.Module, x: torch.Tensor) -> int:
    """Training-step FLOPs of ``net`` with every weight frozen and only its input needing a gradient.

    The difference to the real training step is the weight-gradient work of the trainable parameters.
    """
    trainable = [p for p in net.parameters() if p.requires_grad]
    net.requires_grad_(False)
    try:
        return train_step_flops(net, x.detach().requires_grad_(True))[0]
    finally:
        for p in trainable:
            p.requires_grad_(True)


def activation_bytes(build: Callable[[], nn.Module], batch: int, bf16: bool, in_channels: int, patch) -> dict:
    """Saved-for-backward bytes of one training forward: fp32 on meta, or bf16 autocast on fake CPU tensors."""
    if not bf16:
        net, x = on_meta(build), torch.zeros(batch, in_channels, *patch, device="meta")
        net.train()
        trace = SavedTensorTrace(net)
        with _allow_meta_masks():
            return trace.run(lambda: net(x))
    net = on_meta(build)  # built on meta, then given fake CPU storage: builders may call .item() at init
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
        net.to_empty(device="cpu")
        x = torch.zeros(batch, in_channels, *patch)
        net.train()
        trace = SavedTensorTrace(net)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return trace.run(lambda: net(x))


def parameter_counts(net: nn.Module) -> dict:
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def checkpoint_bytes(net: nn.Module, optimizer_buffers: int) -> dict:
    """Bytes of an nnU-Net checkpoint's weights: the full state dict, its optimiser state, and the weights of a slim
    checkpoint (nnunet_sam.slim_checkpoints: all but the frozen ``sam.*`` tensors, which the base file holds)."""
    state = net.state_dict(keep_vars=True)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    trainable_bytes = sum(
        t.numel() * t.element_size() for n, t in state.items() if n in trainable or not n.startswith("sam.")
    )
    trainable_params = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return {
        "full_state_dict": sum(t.numel() * t.element_size() for t in state.values()),
        "optimizer_state": optimizer_buffers * trainable_params,
        "trainable_only": trainable_bytes,
    }


def memory_estimate(params: dict, optimizer_buffers: int, activations: int) -> int:
    """fp32 weights + fp32 gradients and optimiser buffers of the trainable weights + activations (bytes)."""
    return 4 * params["total"] + 4 * (1 + optimizer_buffers) * params["trainable"] + activations


# ---- measuring on this CPU -----------------------------------------------------------------------------------------
def median_time(fn: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def blob_target(batch: int, patch: Sequence[int], num_classes: int, seed: int = 0) -> torch.Tensor:
    """A label map (B, 1, *patch) of 4x4 in-plane blocks of random classes (every class has whole segments)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (batch, 1, *patch[:-2], 4, 4), generator=generator).float()
    return nn.functional.interpolate(coarse, size=tuple(patch), mode="nearest")


def time_network(net: nn.Module, loss: nn.Module, optimizer_name: str, x, target, runs: int, warmup: int) -> dict:
    """Median seconds of a training step (forward, loss, backward, optimiser step) and of an inference forward."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.AdamW(params, 1e-4)
        if optimizer_name == "adamw"
        else torch.optim.SGD(params, 1e-3, momentum=0.99, nesterov=True)
    )

    def train_step():
        net.train()
        optimizer.zero_grad(set_to_none=True)
        loss(net(x), target).backward()
        optimizer.step()

    def infer():
        net.eval()
        with torch.no_grad():
            net(x)

    return {
        "train_step_s": median_time(train_step, runs, warmup),
        "inference_patch_s": median_time(infer, runs, warmup),
    }


def unet_loss() -> nn.Module:
    """nnUNetTrainer's Dice + CE (deep supervision off: its 1x1 heads and coarse losses cost under 1%)."""
    dice = {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}
    ce_dice = DC_and_CE_loss(dice, {}, weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    return ce_dice


def sliding_window_times(
    trainer: type, record: dict, in_channels: int, num_classes: int, scales: Sequence[int], repeats: int = 1
) -> list[dict]:
    """nnU-Net's sliding-window prediction (tile step 0.5, Gaussian, no mirroring) on growing volumes (seconds)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    patch = list(record["patch_size"])
    plans = unet_plans([16, 64, 64], num_classes)  # any valid plans: only the configuration's patch is read here
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"], config[PLANS_KEY] = patch, record
    plans_manager = PlansManager(plans)
    torch.manual_seed(0)
    net = trainer.build_network(trainer.new_record(record), in_channels, num_classes)
    labels = {"background": 0, **{f"c{i}": i for i in range(1, num_classes)}}
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        net,
        plans_manager,
        plans_manager.get_configuration("3d_fullres"),
        None,
        {"labels": labels, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"},
        trainer.__name__,
        None,
    )
    base = [patch[0], 2 * patch[1], 2 * patch[2]]  # 1x volume: 1 x 2 x 2 patches
    growth = {1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2)}
    results = []
    for scale in scales:
        shape = [s * g for s, g in zip(base, growth[scale])]
        volume = torch.randn(in_channels, *shape)
        tiles = math.prod(len(s) for s in compute_steps_for_sliding_window(shape, patch, 0.5))
        seconds = median_time(lambda v=volume: predictor.predict_sliding_window_return_logits(v), repeats, 0)
        results.append({"scale": scale, "shape": shape, "tiles": tiles, "seconds": seconds})
    return results


# ---- the benchmark ------------------------------------------------------------------------------------------------
def benchmark_config(
    name: str, trainer: type, backbone: str, planned: Sequence[int], num_classes: int, in_channels: int, bf16: bool
) -> dict:
    """Everything counted (not run) for one trainer x backbone at its derived patch."""
    record = sam_record(trainer, planned, num_classes)
    patch = record["patch_size"]

    def build(checkpointing: bool = False) -> nn.Module:
        return build_sam_network(trainer, record, in_channels, num_classes, checkpointing)

    net, net_ckpt = on_meta(build), on_meta(lambda: build(True))
    x = torch.zeros(1, in_channels, *patch, device="meta")
    params = parameter_counts(net)
    train, frozen_with_grad = train_step_flops(net, x)
    infer = inference_flops(net, x)
    result = {
        "trainer": name,
        "trainer_class": trainer.__name__,
        "backbone": backbone,
        "patch_size": patch,
        "sam_input_size": record["sam_input_size"],
        "token_grid": record["sam_input_size"] // get_backbone(backbone).patch_size,
        "num_queries": record["num_queries"],
        "optimizer": trainer.optimizer_name,
        "params": params,
        "frozen_params_with_grad": frozen_with_grad,
        "flops": {
            "train_step": train,
            "train_step_checkpointed": train_step_flops(net_ckpt, x)[0],
            "inference": infer,
            "train_over_forward": train / infer,
            "frozen_encoder_floor": encoder_floor(net, x),
            "all_frozen_floor": all_frozen_floor(net, x) / infer,
        },
    }
    if "run_decoder" in inspect.signature(net.forward).parameters:  # Self-Prompt-SAM's stage 1: generator path only
        stage1_net = BoundForward(net, run_decoder=False)
        stage1, stage1_frozen_with_grad = train_step_flops(stage1_net, x)
        result["frozen_params_with_grad"] += stage1_frozen_with_grad
        result["flops"]["train_step_stage1"] = stage1
        result["flops"]["train_over_forward_stage1"] = stage1 / inference_flops(stage1_net, x)
    result["flops"]["ratio_over_floor"] = (
        result["flops"]["train_over_forward"] / result["flops"]["frozen_encoder_floor"]
    )
    buffers = OPTIMIZER_STATE[trainer.optimizer_name]
    result["checkpoint_bytes"] = checkpoint_bytes(net, buffers)
    result["memory_bytes"] = memory_table(build, params, buffers, in_channels, patch, bf16)
    return result


def memory_table(build, params: dict, buffers: int, in_channels: int, patch, bf16: bool) -> dict:
    """Estimated peak training bytes for batch 1 and 2: none / checkpointing / 16-bit autocast / both."""
    table = {}
    for batch in (1, 2):
        fp32 = activation_bytes(build, batch, False, in_channels, patch)
        row = {"activations_fp32": fp32["total"]}
        row["none"] = memory_estimate(params, buffers, fp32["total"])
        if fp32["checkpointed"] is not None:
            row["checkpointing"] = memory_estimate(params, buffers, fp32["checkpointed"])
        if bf16:
            half = activation_bytes(build, batch, True, in_channels, patch)
            row["activations_autocast"] = half["total"]
            row["autocast"] = memory_estimate(params, buffers, half["total"])
            if half["checkpointed"] is not None:
                row["checkpointing+autocast"] = memory_estimate(params, buffers, half["checkpointed"])
        table[f"batch{batch}"] = row
    return table


def unet_counts(patch: Sequence[int], in_channels: int, num_classes: int) -> dict:
    with torch.device("meta"):
        net = build_unet(patch, in_channels, num_classes)
        x = torch.zeros(1, in_channels, *patch)
    params = parameter_counts(net)
    train, infer = train_step_flops(net, x)[0], inference_flops(net, x)
    memory = {}
    for batch in (1, 2):
        with torch.device("meta"):
            xb = torch.zeros(batch, in_channels, *patch)
        net.train()
        acts = SavedTensorTrace(net).run(lambda xb=xb: net(xb))["total"]
        memory[f"batch{batch}"] = {"activations_fp32": acts, "none": memory_estimate(params, 1, acts)}
    return {
        "trainer": "nnUNetTrainer",
        "backbone": "PlainConvUNet",
        "patch_size": list(patch),
        "params": params,
        "flops": {"train_step": train, "inference": infer, "train_over_forward": train / infer},
        "checkpoint_bytes": checkpoint_bytes(net, 1),
        "memory_bytes": memory,
    }


def input_size_table(trainer: type, planned, num_classes: int, in_channels: int, sizes: Sequence[int]) -> list[dict]:
    """SAM input size options: token grid, window padding, encoder FLOPs per slice, whole-network FLOPs."""
    spec = get_backbone(trainer.backbone)
    rows = []
    for size in sizes:
        record = sam_record(trainer, planned, num_classes, sam_input_size=size)
        grid = size // spec.patch_size
        padded = math.ceil(grid / spec.window_size) * spec.window_size
        net = on_meta(lambda r=record: build_sam_network(trainer, r, in_channels, num_classes))
        encoder = on_meta(lambda s=size: build_sam(spec, s).image_encoder)
        x = torch.zeros(1, in_channels, *record["patch_size"], device="meta")
        one = torch.zeros(1, 3, size, size, device="meta")
        encoder.eval()
        with torch.no_grad():
            encoder_flops = count_flops(lambda e=encoder, i=one: e(i))
        train, infer = train_step_flops(net, x)[0], inference_flops(net, x)
        rows.append(
            {
                "backbone": spec.name,
                "sam_input_size": size,
                "token_grid": grid,
                "window_padded_grid": padded,
                "window_padding_waste": 1 - grid**2 / padded**2,
                "encoder_flops_per_slice": encoder_flops,
                "train_step": train,
                "inference": infer,
                "train_over_forward": train / infer,
                "activations_fp32_batch2": activation_bytes(
                    lambda r=record: build_sam_network(trainer, r, in_channels, num_classes),
                    2,
                    False,
                    in_channels,
                    record["patch_size"],
                )["total"],
            }
        )
    return rows


_UNET_TIMES: dict[tuple, dict] = {}  # the U-Net is timed once per patch and shared by the trainers of one run


def cpu_timings(trainer: type, record: dict, in_channels: int, num_classes: int, runs: int, warmup: int) -> dict:
    patch = record["patch_size"]
    torch.manual_seed(0)
    net = trainer.build_network(trainer.new_record(record), in_channels, num_classes)
    x = torch.randn(2, in_channels, *patch)
    target = blob_target(2, patch, num_classes)
    loss = MaskSetCriterion(num_classes) if issubclass(trainer, MaskSAMTrainer) else DeepSupervisedSegLoss()
    sam = time_network(net, loss, trainer.optimizer_name, x, target, runs, warmup)
    key = (tuple(patch), in_channels, num_classes, runs, warmup)
    if key not in _UNET_TIMES:
        unet = build_unet(patch, in_channels, num_classes)
        _UNET_TIMES[key] = time_network(unet, unet_loss(), "sgd", x, target, runs, warmup)
    base = _UNET_TIMES[key]
    return {
        "batch_size": 2,
        "patch_size": list(patch),
        "sam": sam,
        "unet": base,
        "train_ratio_to_unet": sam["train_step_s"] / base["train_step_s"],
        "inference_ratio_to_unet": sam["inference_patch_s"] / base["inference_patch_s"],
    }


# ---- report -----------------------------------------------------------------------------------------------------
def _patch(patch: Sequence[int]) -> str:
    return "x".join(map(str, patch))


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.1f}"


def _gib(size: float | None) -> str:
    return "-" if size is None else f"{size / GIB:.2f}"


def format_report(report: dict) -> str:
    lines = []
    setup = report["setup"]
    lines.append(
        f"nnunet_sam_benchmark: planned nnU-Net patch {setup['planned_patch']}, {setup['num_classes']} classes, "
        f"{setup['in_channels']} input channel(s); FLOPs in GFLOP per sample (batch 1), memory in GiB."
    )
    head = (
        f"{'trainer':<22}{'backbone':<15}{'patch':<13}{'in':>5}{'params M':>10}{'train M':>9}{'frozen M':>9}"
        f"{'train GF':>11}{'infer GF':>10}{'ratio':>7}{'floor':>7}"
    )
    lines += ["", head, "-" * len(head)]
    for r in report["configs"] + [report["unet"][k] for k in sorted(report["unet"])]:
        p, f = r["params"], r["flops"]
        floor = f.get("frozen_encoder_floor")
        lines.append(
            f"{r['trainer']:<22}{r['backbone']:<15}{_patch(r['patch_size']):<13}"
            f"{r.get('sam_input_size', ''):>5}{p['total'] / 1e6:>10.2f}{p['trainable'] / 1e6:>9.2f}"
            f"{p['frozen'] / 1e6:>9.2f}{_g(f['train_step']):>11}{_g(f['inference']):>10}"
            f"{f['train_over_forward']:>7.2f}{'' if floor is None else f'{floor:.2f}':>7}"
        )
    lines.append(
        "ratio = training step / inference forward FLOPs; floor = same for the encoder path with every weight frozen "
        "(full fine-tuning: about 3)."
    )
    for r in report["configs"]:
        f = r["flops"]
        lines.append(
            f"  {r['trainer']} {r['backbone']}: ratio {f['train_over_forward']:.2f} = {f['ratio_over_floor']:.2f}x "
            f"the encoder floor; with every weight of this network frozen it would be {f['all_frozen_floor']:.2f} "
            f"(the rest is weight-gradient work of the trainable parameters); frozen parameters with .grad after "
            f"a step: {r['frozen_params_with_grad']}"
        )
    for r in report["configs"]:
        if "train_step_stage1" in r["flops"]:
            lines.append(
                f"  {r['trainer']} {r['backbone']}: stage 1 training step {_g(r['flops']['train_step_stage1'])} GF, "
                f"ratio {r['flops']['train_over_forward_stage1']:.2f}; "
                f"checkpointed step {_g(r['flops']['train_step_checkpointed'])} GF"
            )

    head = f"{'trainer':<22}{'backbone':<15}{'patch':<13}{'batch':>6}" + "".join(f"{o:>24}" for o in MEMORY_OPTIONS)
    lines += ["", "Estimated peak training memory (GiB): weights + grads + optimiser state + saved activations", head]
    lines.append("-" * len(head))
    for r in report["configs"] + [report["unet"][k] for k in sorted(report["unet"])]:
        for batch in (1, 2):
            row = r["memory_bytes"][f"batch{batch}"]
            lines.append(
                f"{r['trainer']:<22}{r['backbone']:<15}{_patch(r['patch_size']):<13}{batch:>6}"
                + "".join(f"{_gib(row.get(o)):>24}" for o in MEMORY_OPTIONS)
            )

    lines += ["", "Checkpoint size (MiB): full state dict / + SGD-or-AdamW state (nnU-Net saves it) / trainable-only"]
    for r in report["configs"]:
        c = r["checkpoint_bytes"]
        lines.append(
            f"  {r['trainer']:<22}{r['backbone']:<15}{c['full_state_dict'] / 2**20:>10.1f}"
            f"{c['optimizer_state'] / 2**20:>10.1f}{c['trainable_only'] / 2**20:>10.1f}"
        )

    if report["input_sizes"]:
        lines += ["", "SAM input size options (MaskSAMTrainer, patch stays as planned; GFLOP per sample):"]
        lines.append(
            f"  {'input':>6}{'grid':>6}{'padded':>8}{'pad waste':>11}{'enc GF/slice':>14}{'train GF':>11}"
            f"{'infer GF':>10}{'ratio':>7}{'act GiB b2':>12}"
        )
        for r in report["input_sizes"]:
            lines.append(
                f"  {r['sam_input_size']:>6}{r['token_grid']:>6}{r['window_padded_grid']:>8}"
                f"{r['window_padding_waste']:>11.0%}{_g(r['encoder_flops_per_slice']):>14}{_g(r['train_step']):>11}"
                f"{_g(r['inference']):>10}{r['train_over_forward']:>7.2f}{_gib(r['activations_fp32_batch2']):>12}"
            )

    if report["cpu"]:
        lines += [
            "",
            f"CPU wall time, batch 2, median of {setup['runs']} after {setup['warmup']} warm-up runs (patch derived "
            f"from the planned CPU patch {setup['cpu_planned_patch']}; U-Net at the same patch):",
        ]
        for r in report["cpu"]:
            lines.append(
                f"  {r['trainer']:<22}{r['backbone']:<15}{_patch(r['patch_size']):<10} "
                f"train step {r['sam']['train_step_s']:.3f} s "
                f"({r['train_ratio_to_unet']:.2f}x U-Net {r['unet']['train_step_s']:.3f} s), inference patch "
                f"{r['sam']['inference_patch_s']:.3f} s ({r['inference_ratio_to_unet']:.2f}x U-Net "
                f"{r['unet']['inference_patch_s']:.3f} s)"
            )
    if report["volume_scaling"]:
        lines += ["", "Sliding-window inference (nnUNetPredictor, step 0.5, no mirroring), tiny MaskSAM:"]
        base = report["volume_scaling"][0]
        for r in report["volume_scaling"]:
            lines.append(
                f"  {r['scale']}x voxels {r['shape']}: {r['tiles']} tiles, {r['seconds']:.2f} s "
                f"({r['seconds'] / base['seconds']:.2f}x)"
            )
    target = report.get("target")
    if target:
        lines += ["", target["summary"]]
    for name, reason in report["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    for name, reason in report["failed"].items():
        lines.append(f"FAILED {name}: {reason[:300]}")
    run = report["run"]
    lines.append(
        f"\nwall time {run['wall_s']:.0f} s on {run['cpu_count']} CPU(s), torch threads {run['torch_threads']}, "
        f"load average {run['load_start']:.1f} at start / {run['load_end']:.1f} at end"
    )
    return "\n".join(lines)


def gpu_target(configs: list[dict], gib: float) -> dict | None:
    """Cheapest option set for MaskSAMTrainer (vit_b) at batch 2 that fits ``gib`` GiB by the estimate."""
    for r in configs:
        if r["trainer"] == "MaskSAMTrainer" and r["backbone"] == "vit_b":
            row = r["memory_bytes"]["batch2"]
            options = [o for o in MEMORY_OPTIONS if o in row]
            fits = [o for o in options if row[o] <= gib * GIB]
            best = fits[0] if fits else min(options, key=row.get)
            verdict = "fits" if fits else "does not fit"
            summary = (
                f"Target: MaskSAMTrainer (vit_b), batch 2, patch {r['patch_size']} at {r['sam_input_size']} px "
                f"{verdict} {gib:g} GiB with option set '{best}': {row[best] / GIB:.2f} GiB "
                f"(estimate; plus CUDA context)."
            )
            return {"gib": gib, "option_set": best, "bytes": row[best], "fits": bool(fits), "summary": summary}
    return None


def _progress(start: float, message: str) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)


def run_benchmark(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    backbones, skipped = available_backbones(args.backbones)
    report: dict = {
        "setup": {
            "planned_patch": args.planned_patch,
            "num_classes": args.num_classes,
            "in_channels": args.in_channels,
            "cpu_planned_patch": args.cpu_planned_patch,
            "runs": args.runs,
            "warmup": args.warmup,
            "method": __doc__,
        },
        "configs": [],
        "unet": {},
        "cpu": [],
        "input_sizes": [],
        "volume_scaling": [],
        "skipped": skipped,
        "failed": {},
    }
    for name in args.trainers:
        for backbone in backbones:
            trainer = trainer_class(METHODS[name], backbone)
            _progress(start, f"counting {name} {backbone}")
            try:
                r = benchmark_config(
                    name,
                    trainer,
                    backbone,
                    args.planned_patch,
                    args.num_classes,
                    args.in_channels,
                    not args.no_autocast,
                )
            except Exception as e:  # noqa: BLE001  (a new backbone that cannot be counted must not stop the rest)
                report["failed"][f"{name} {backbone}"] = f"{type(e).__name__}: {e}"
                continue
            report["configs"].append(r)
            key = "x".join(map(str, r["patch_size"]))
            if key not in report["unet"]:
                report["unet"][key] = unet_counts(r["patch_size"], args.in_channels, args.num_classes)
            if backbone in args.cpu_backbones:
                record = sam_record(trainer, args.cpu_planned_patch, args.num_classes)
                _progress(start, f"timing {name} {backbone} at {record['patch_size']} and the U-Net on this CPU")
                timing = cpu_timings(trainer, record, args.in_channels, args.num_classes, args.runs, args.warmup)
                report["cpu"].append({"trainer": name, "backbone": backbone, **timing})
    if args.input_sizes and "vit_b" in backbones:
        _progress(start, "SAM input size options")
        trainer = trainer_class(MaskSAMTrainer, "vit_b")
        report["input_sizes"] = input_size_table(
            trainer, args.planned_patch, args.num_classes, args.in_channels, args.input_sizes
        )
    if args.volume_scales and "tiny" in backbones:
        _progress(start, "sliding-window inference against volume size")
        trainer = trainer_class(MaskSAMTrainer, "tiny")
        record = sam_record(trainer, args.planned_patch, args.num_classes)
        report["volume_scaling"] = sliding_window_times(
            trainer, record, args.in_channels, args.num_classes, args.volume_scales
        )
    report["target"] = gpu_target(report["configs"], args.gpu_gib)
    report["run"] = {
        "wall_s": time.perf_counter() - start,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "torch": torch.__version__,
    }
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nnunet_sam_benchmark",
        description="Parameters, FLOPs, estimated GPU memory, checkpoint size and CPU time of the SAM trainers "
        "next to nnU-Net's default U-Net. FLOPs and memory are counted on meta/fake tensors (no GPU needed).",
    )
    parser.add_argument("--trainers", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), help="unregistered ones are skipped")
    parser.add_argument(
        "--planned-patch",
        nargs="+",
        type=int,
        default=[64, 192, 160],
        help="nnU-Net's planned patch; each trainer derives its SAM patch from it (nnunet_sam.planning)",
    )
    parser.add_argument("--num-classes", type=int, default=14, help="classes including background (Synapse: 14)")
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--cpu-backbones", nargs="*", default=list(CPU_BACKBONES), help="backbones timed on CPU")
    parser.add_argument(
        "--cpu-planned-patch",
        nargs="+",
        type=int,
        default=[8, 64, 64],
        help="planned patch for the CPU timings (small, so that they finish here); trainers derive their patch from it",
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per CPU measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--input-sizes", nargs="*", type=int, default=[224, 256, 512, 1024], help="vit_b options")
    parser.add_argument("--volume-scales", nargs="*", type=int, default=[1, 2, 4], choices=[1, 2, 4, 8])
    parser.add_argument("--no-autocast", action="store_true", help="skip the 16-bit autocast memory trace (slower)")
    parser.add_argument("--gpu-gib", type=float, default=24.0, help="GPU memory target for MaskSAMTrainer (vit_b)")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark for command-line arguments ``argv``, print the table, write the JSON; return the report."""
    args = parse_args(argv)
    report = run_benchmark(args)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()

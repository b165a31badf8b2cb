"""GPU mode of the benchmark (``nnunet_sam_benchmark --device cuda``): measured, not estimated.

Three parts, each with a wall-clock budget so that the whole run stays within about 8 minutes on one GPU
(:data:`BUDGET_S`; a part that runs out reports what it skipped instead of running on):

1. **Presets** (5 min): for every preset at its batch size, the network its trainer trains (random weights; the
   parameters its ``configure_optimizers`` trains, SAM frozen where the method freezes it), the trainer's own
   training forward (``forward_batch`` of each stage, prompts simulated from an all-background target) + surrogate
   loss (the mean of every output the losses read) + backward + optimiser step, with the memory setting the trainer
   would choose from the estimate (:func:`~nnunet_sam.training.memory_estimate.choose_memory_options` against this
   GPU): median step time after a warm-up and ``torch.cuda.max_memory_allocated``. The same for nnU-Net's
   residual-encoder U-Net (the ResEnc M/L architecture) at the preset's patch with nnU-Net's Dice + CE under fp16
   autocast. The slowest presets (ViT-H, 1024 px) take about half a minute each.
2. **One short real training** (3 min) through nnU-Net's own commands: a phantom dataset
   (:mod:`nnunet_sam.demo.phantoms`), ``nnUNetv2_plan_and_preprocess``, then ``nnUNetv2_train`` of a copy of the preset
   (:class:`ShortRun`: one epoch of a few dozen steps, each step timed, no final validation), with SAM weights from a
   random checkpoint in the official layout when no real one is installed (time and memory do not depend on the
   values). Reports the time per step, the peak CUDA memory and the checkpoint nnU-Net wrote.

On a CPU (``device="cpu"``: the tests, with the tiny backbone) the same code runs; the CUDA-only figures are None.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from nnunet_sam.backbones.checkpoints import CHECKPOINT_DIR_ENV, find_checkpoint
from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.benchmarking.configs import Forward, Preset, on_meta, training_forwards, training_network
from nnunet_sam.benchmarking.counting import parameter_counts, surrogate_loss
from nnunet_sam.benchmarking.timing import unet_loss
from nnunet_sam.blocks.checkpointing import block_checkpointing
from nnunet_sam.training.memory_estimate import GIB, OPTIMIZER_STATE, choose_memory_options, memory_row

BUDGET_S = {"presets": 300.0, "short_training": 180.0}  # about 8 minutes with start-up
SHORT_TRAINING = "MaskSAMTrainer_ACDC"  # the headline preset: ViT-B at 1024 px, batch 2, <= 24 GiB
SHORT_STEPS = 30
SHORT_DATASET_ID = 991
RESULT_FILE = "short_run.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure_steps(
    net: nn.Module,
    x: torch.Tensor,
    loss: Callable[[object], torch.Tensor],
    autocast_dtype: torch.dtype | None,
    checkpointing: bool,
    steps: int = 5,
    warmup: int = 2,
    forward: Forward | None = None,
) -> dict:
    """Median seconds of a training step (``forward(net, x)``, default ``net(x)``; loss; backward; AdamW step) on
    ``x``'s device and the peak allocated memory over all steps (None off CUDA)."""
    device = x.device
    forward = forward or (lambda n, inputs: n(inputs))
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, 1e-4)
    net.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            with block_checkpointing(checkpointing):
                value = loss(forward(net, x))
        value.backward()
        optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "max_memory_allocated": _peak(device)}


def resenc_unet(patch: Sequence[int], in_channels: int, num_classes: int) -> nn.Module:
    """nnU-Net's ResidualEncoderUNet as its ResEnc presets configure it, for ``patch``."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    dim = len(patch)
    _, strides, kernels, _, _ = get_pool_and_conv_props([1.0] * dim, list(patch), 4, 999999)
    stages = len(strides)
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    return ResidualEncoderUNet(
        in_channels,
        stages,
        [min(32 * 2**i, 320) for i in range(stages)],
        conv,
        kernels,
        strides,
        [1, 3, 4, 6, 6, 6, 6, 6, 6, 6][:stages],
        num_classes,
        [1] * (stages - 1),
        conv_bias=True,
        norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )


def measure_preset(preset: Preset, in_channels: int, device: torch.device, steps: int, warmup: int) -> dict:
    """Estimate, choice and measured step of one preset (every training phase) and the ResEnc U-Net at its patch."""
    record = preset.record()
    patch, trainer = record["patch_size"], preset.trainer
    forwards = training_forwards(trainer, preset.num_classes)

    def build() -> nn.Module:
        return training_network(trainer, record, in_channels, preset.num_classes)

    cuda = device.type == "cuda"
    params = parameter_counts(on_meta(build))
    buffers = OPTIMIZER_STATE[trainer.optimizer_name]
    estimate = memory_row(
        build, params, buffers, in_channels, patch, preset.batch_size, cuda, forwards=list(forwards.values())
    )
    budget = 0.9 * torch.cuda.get_device_properties(device).total_memory - GIB if cuda else float("inf")
    choice, fits = choose_memory_options(estimate, budget)
    half = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    dtype = half if "autocast" in choice else None
    torch.manual_seed(0)
    with torch.device(device):
        net = build()
    x = torch.randn(preset.batch_size, in_channels, *patch, device=device)
    phases = {
        phase: measure_steps(net, x, surrogate_loss, dtype, "checkpointing" in choice, steps, warmup, forward)
        for phase, forward in forwards.items()
    }
    del net
    unet = resenc_unet(patch, in_channels, preset.num_classes).to(device)
    target = torch.randint(0, preset.num_classes, (preset.batch_size, 1, *patch), device=device)
    dice_ce = unet_loss()
    resenc = measure_steps(
        unet, x, lambda out: dice_ce(out, target), torch.float16 if cuda else None, False, steps, warmup
    )
    peak_phase = max(phases, key=lambda k: phases[k]["max_memory_allocated"] or phases[k]["step_s"])
    return {
        "preset": preset.name,
        "trainer_class": trainer.__name__,
        "batch_size": preset.batch_size,
        "patch_size": patch,
        "option_set": choice,
        "estimate_bytes": estimate[choice],
        "estimate_fits": fits,
        "phases": phases,
        "sam": phases[peak_phase],
        "peak_phase": peak_phase,
        "resenc": resenc,
    }


class ShortRun:
    """Mixin of the short real training (``nnUNetv2_train`` of ``class X(ShortRun, Preset)``): one epoch of
    ``iterations_per_epoch`` steps, each timed with the device synchronised, and nnU-Net's final validation skipped;
    at the end the output folder gets ``short_run.json`` (step seconds, peak CUDA memory, the memory setting)."""

    epochs = 1
    iterations_per_epoch = SHORT_STEPS
    val_iterations_per_epoch = 1

    def on_train_start(self) -> None:
        super().on_train_start()
        self._short_run_steps: list[float] = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def train_step(self, batch: dict) -> dict:
        _sync(self.device)
        start = time.perf_counter()
        result = super().train_step(batch)
        _sync(self.device)
        self._short_run_steps.append(time.perf_counter() - start)
        return result

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.local_rank == 0:
            result = {
                "step_s": self._short_run_steps,
                "max_memory_allocated": _peak(self.device),
                "block_checkpointing": bool(getattr(self, "_checkpointing", False)),
                "autocast": str(getattr(self, "_autocast_dtype", None)),
                "batch_size": self.batch_size,
                "patch_size": list(self.configuration_manager.patch_size),
            }
            Path(self.output_folder, RESULT_FILE).write_text(json.dumps(result, indent=1))

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file("Short run: nnU-Net's final validation is skipped (a timing run)")


def _trainer_class(name: str) -> type:
    from nnunet_sam.demo.pipeline import _trainer_class

    cls = _trainer_class(name)
    if cls is None:
        raise ValueError(f"{name!r} is not an nnunet-sam trainer class (see nnunet_sam.trainers)")
    return cls


def short_training(
    workdir: str | Path,
    trainer: str = SHORT_TRAINING,
    device: str = "cuda",
    iterations: int = SHORT_STEPS,
    timeout_s: float = BUDGET_S["short_training"],
    phantom_shape: Sequence[int] | None = None,
    num_train: int = 6,
) -> dict:
    """A few dozen real training steps of ``trainer`` on a phantom dataset through nnU-Net's commands.

    ``workdir`` gets nnU-Net's three folders, the trainer copy (``trainers/``, on ``nnUNet_extTrainer`` for the
    child processes only) and, if no real SAM checkpoint is installed, a random one in the official layout. The
    phantom's shape is ``phantom_shape`` or at least the preset's fixed patch. Steps: ``iterations``; the first
    two are warm-up (cuDNN autotuning, allocator). Returns the figures and the wall time of each command.
    """
    from nnunet_sam.demo.phantoms import make_phantom_dataset
    from nnunet_sam.demo.pipeline import _child_env, find_nnunet_command

    start = time.perf_counter()
    workdir = Path(workdir).resolve()
    cls = _trainer_class(trainer)
    fixed = list(cls.fixed_patch or [])
    configuration = "2d" if len(fixed) == 2 or getattr(cls, "max_depth", None) == 1 else "3d_fullres"
    if phantom_shape is None:  # at least the preset's patch (a 2d patch: in-plane)
        least = fixed if len(fixed) == 3 else [1, *fixed] if fixed else [1, 1, 1]
        phantom_shape = [max(a, b) for a, b in zip((16, 96, 96), least)]
    env = _child_env(workdir, device)
    make_phantom_dataset(
        env["nnUNet_raw"], SHORT_DATASET_ID, "ShortRun", num_train, 1, tuple(phantom_shape), overwrite=True
    )
    spec = get_backbone(cls.backbone)
    checkpoint = find_checkpoint(spec, required=False)
    if checkpoint is None and spec.requires_checkpoint:
        folder = workdir / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(build_sam(spec).state_dict(), folder / spec.checkpoint_file)
        env[CHECKPOINT_DIR_ENV] = str(folder)
        checkpoint = "random weights in the official layout"
    name = f"{cls.__name__}_short{iterations}"
    trainers = workdir / "trainers"
    trainers.mkdir(parents=True, exist_ok=True)
    (trainers / "nnunet_sam_short_run.py").write_text(
        f"from nnunet_sam.benchmarking.gpu import ShortRun\nfrom {cls.__module__} import {cls.__name__}\n\n\n"
        f"class {name}(ShortRun, {cls.__name__}):\n    iterations_per_epoch = {int(iterations)}\n"
    )
    env["nnUNet_extTrainer"] = os.pathsep.join(p for p in (str(trainers), env.get("nnUNet_extTrainer", "")) if p)
    log = workdir / "short_run.log"
    wall = {}
    commands = {
        "preprocess": [
            find_nnunet_command("nnUNetv2_plan_and_preprocess"),
            *("-d", str(SHORT_DATASET_ID), "-c", configuration, "-np", "2", "-npfp", "2"),
        ],
        "train": [
            find_nnunet_command("nnUNetv2_train"),
            *(str(SHORT_DATASET_ID), configuration, "0", "-tr", name, "-device", device),
        ],
    }
    with open(log, "w", encoding="utf-8") as out:
        for step, command in commands.items():
            t0 = time.perf_counter()
            left = timeout_s - (t0 - start)
            try:
                proc = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=max(1, left))
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"short training: {step} ran past the {timeout_s:.0f} s budget (log: {log})") from e
            wall[step] = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"short training: {step} failed with exit code {proc.returncode} (log: {log})")
    folder = (
        Path(env["nnUNet_results"]) / f"Dataset{SHORT_DATASET_ID}_ShortRun" / f"{name}__nnUNetPlans__{configuration}"
    )
    result = json.loads((folder / "fold_0" / RESULT_FILE).read_text())
    steps = result.pop("step_s")
    timed = steps[2:] or steps
    return {
        "trainer": cls.__name__,
        "configuration": configuration,
        "device": device,
        "iterations": len(steps),
        "step_s": statistics.median(timed),
        "first_step_s": steps[0],
        **result,
        "sam_checkpoint": str(checkpoint) if checkpoint is not None else None,
        "checkpoint": str(folder / "fold_0" / "checkpoint_final.pth"),
        "wall_s": wall,
        "log": str(log),
    }


def run_gpu_benchmark(
    presets: Sequence[Preset],
    in_channels: int = 1,
    device: str = "cuda",
    steps: int = 5,
    warmup: int = 2,
    short: str | None = SHORT_TRAINING,
    workdir: str | Path | None = None,
    short_kwargs: dict | None = None,
    budget_s: dict[str, float] | None = None,
) -> dict:
    """Measure every preset and the ResEnc U-Net at its patch on ``device``, then the short real training of
    ``short`` (None: skipped) in ``workdir`` (default ``./nnunet_sam_gpu_check``). Failures and parts skipped for
    the time budget are reported, not raised."""
    budget = {**BUDGET_S, **(budget_s or {})}
    dev = torch.device(device)
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "--device cuda needs a CUDA GPU (torch.cuda.is_available() is False)"
        name, total = torch.cuda.get_device_name(dev), torch.cuda.get_device_properties(dev).total_memory
    else:
        name, total = str(dev), None
    report: dict = {"device": name, "total_memory": total, "budget_s": budget, "rows": [], "failed": {}, "skipped": {}}
    start = time.perf_counter()
    for preset in presets:
        key = f"{preset.name} b{preset.batch_size}"
        if time.perf_counter() - start > budget["presets"]:
            report["skipped"][key] = f"the presets' time budget of {budget['presets']:.0f} s was spent"
            continue
        try:
            report["rows"].append(measure_preset(preset, in_channels, dev, steps, warmup))
        except Exception as e:  # noqa: BLE001  (one preset that fails must not stop the others)
            report["failed"][key] = f"{type(e).__name__}: {str(e)[:300]}"
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report["presets_s"] = time.perf_counter() - start
    if short is not None:
        folder = Path(workdir or Path.cwd() / "nnunet_sam_gpu_check")
        try:
            kwargs = {"timeout_s": budget["short_training"], **(short_kwargs or {})}
            report["short_training"] = short_training(folder, short, device, **kwargs)
        except Exception as e:  # noqa: BLE001
            report["failed"][f"short training {short}"] = f"{type(e).__name__}: {str(e)[:300]}"
    report["wall_s"] = time.perf_counter() - start
    return report


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / GIB:.2f} GiB"


def format_gpu_report(report: dict) -> str:
    total = "" if report["total_memory"] is None else f", {report['total_memory'] / GIB:.1f} GiB"
    lines = [f"GPU mode on {report['device']}{total} (measured; wall {report['wall_s']:.0f} s)"]
    for r in report["rows"]:
        s, u = r["sam"], r["resenc"]
        lines.append(
            f"  {r['preset']:<30} b{r['batch_size']} {'x'.join(map(str, r['patch_size'])):<11} {r['option_set']:<24}"
            f"step {s['step_s']:.3f} s, max allocated {_mib(s['max_memory_allocated'])} (estimate "
            f"{r['estimate_bytes'] / GIB:.2f} GiB{', ' + r['peak_phase'] if len(r['phases']) > 1 else ''}); "
            f"ResEnc U-Net {u['step_s']:.3f} s, {_mib(u['max_memory_allocated'])}"
        )
    short = report.get("short_training")
    if short:
        lines.append(
            f"  short training (nnUNetv2_train {short['trainer']}, {short['configuration']}, {short['iterations']} "
            f"steps at batch {short['batch_size']}, patch {short['patch_size']}): {short['step_s']:.3f} s per step "
            f"(first {short['first_step_s']:.1f} s), max allocated {_mib(short['max_memory_allocated'])}, "
            f"checkpointing {short['block_checkpointing']}, autocast {short['autocast']}; preprocess "
            f"{short['wall_s']['preprocess']:.0f} s, train {short['wall_s']['train']:.0f} s"
        )
    for key, reason in report["skipped"].items():
        lines.append(f"  SKIPPED {key}: {reason}")
    for key, reason in report["failed"].items():
        lines.append(f"  FAILED {key}: {reason}")
    return "\n".join(lines)

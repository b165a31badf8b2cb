"""GPU mode of the benchmark (``nnunet_sam_benchmark --device cuda``): measured, not estimated.

For every preset at its batch size: the network its trainer builds (random weights, SAM frozen as with a
checkpoint), trained for a few steps with the memory setting the trainer would choose from the estimate
(:func:`~nnunet_sam.benchmarking.memory.choose_memory_options` against this GPU), forward + surrogate loss (the mean
of every output the losses read) + backward + optimiser step; median step time after a warm-up and
``torch.cuda.max_memory_allocated``. The same for nnU-Net's residual-encoder U-Net (the ResEnc M/L architecture)
at the preset's patch with nnU-Net's Dice + CE under fp16 autocast. About a minute per preset on an H100-class
GPU; the whole default set stays well under 8 minutes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nnunet_sam.benchmarking.configs import Preset, build_sam_network, on_meta
from nnunet_sam.benchmarking.counting import parameter_counts, surrogate_loss
from nnunet_sam.benchmarking.memory import GIB, OPTIMIZER_STATE, choose_memory_options, memory_row
from nnunet_sam.benchmarking.timing import unet_loss
from nnunet_sam.blocks.checkpointing import block_checkpointing


def measure_steps(
    net: nn.Module,
    x: torch.Tensor,
    loss: Callable[[object], torch.Tensor],
    autocast_dtype: torch.dtype | None,
    checkpointing: bool,
    steps: int = 5,
    warmup: int = 2,
) -> dict:
    """Median seconds of a training step on CUDA and the peak allocated memory over all steps."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, 1e-4)
    net.train()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            with block_checkpointing(checkpointing):
                value = loss(net(x))
        value.backward()
        optimizer.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "max_memory_allocated": torch.cuda.max_memory_allocated()}


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


def run_gpu_benchmark(presets: Sequence[Preset], in_channels: int = 1, device: str = "cuda") -> dict:
    """Measure every preset and the ResEnc U-Net at its patch on ``device``; failures are reported, not raised."""
    assert torch.cuda.is_available(), "--device cuda needs a CUDA GPU (torch.cuda.is_available() is False)"
    total = torch.cuda.get_device_properties(device).total_memory
    bf16 = torch.cuda.is_bf16_supported()
    report: dict = {"device": torch.cuda.get_device_name(device), "total_memory": total, "rows": [], "failed": {}}
    for preset in presets:
        key = f"{preset.name} b{preset.batch_size}"
        try:
            record = preset.record()
            patch = record["patch_size"]
            trainer = preset.trainer

            def build(r=record, t=trainer, p=preset) -> nn.Module:
                return build_sam_network(t, r, in_channels, p.num_classes)

            params = parameter_counts(on_meta(build))
            estimate = memory_row(
                build, params, OPTIMIZER_STATE[trainer.optimizer_name], in_channels, patch, preset.batch_size
            )
            choice, fits = choose_memory_options(estimate, 0.9 * total - GIB)
            torch.manual_seed(0)
            net = build().to(device)
            x = torch.randn(preset.batch_size, in_channels, *patch, device=device)
            dtype = (torch.bfloat16 if bf16 else torch.float16) if "autocast" in choice else None
            measured = measure_steps(net, x, surrogate_loss, dtype, "checkpointing" in choice)
            del net
            unet = resenc_unet(patch, in_channels, preset.num_classes).to(device)
            target = torch.randint(0, preset.num_classes, (preset.batch_size, 1, *patch), device=device)
            dice_ce = unet_loss()
            resenc = measure_steps(unet, x, lambda out, f=dice_ce, t=target: f(out, t), torch.float16, False)
            del unet
            report["rows"].append(
                {
                    "preset": preset.name,
                    "batch_size": preset.batch_size,
                    "patch_size": patch,
                    "option_set": choice,
                    "estimate_bytes": estimate[choice],
                    "estimate_fits": fits,
                    "sam": measured,
                    "resenc": resenc,
                }
            )
        except Exception as e:  # noqa: BLE001  (one preset that fails must not stop the others)
            report["failed"][key] = f"{type(e).__name__}: {str(e)[:300]}"
        torch.cuda.empty_cache()
    return report


def format_gpu_report(report: dict) -> str:
    lines = [f"GPU: {report['device']}, {report['total_memory'] / GIB:.1f} GiB (measured)"]
    for r in report["rows"]:
        s, u = r["sam"], r["resenc"]
        lines.append(
            f"  {r['preset']:<30} b{r['batch_size']} {'x'.join(map(str, r['patch_size'])):<11} {r['option_set']:<24}"
            f"step {s['step_s']:.3f} s, max allocated {s['max_memory_allocated'] / GIB:.2f} GiB (estimate "
            f"{r['estimate_bytes'] / GIB:.2f}); ResEnc U-Net {u['step_s']:.3f} s, "
            f"{u['max_memory_allocated'] / GIB:.2f} GiB"
        )
    for key, reason in report["failed"].items():
        lines.append(f"  FAILED {key}: {reason}")
    return "\n".join(lines)

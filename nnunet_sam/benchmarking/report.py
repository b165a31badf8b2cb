"""The benchmark's report: what is counted for each configuration, how the run is put together, and its table.

See :mod:`nnunet_sam.benchmarking.counting` (parameters, FLOPs), :mod:`~nnunet_sam.training.memory_estimate`
(estimated peak training memory) and :mod:`~nnunet_sam.benchmarking.timing` (what is measured on this CPU).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from nnunet_sam import benchmarking
from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.benchmarking.configs import (
    METHODS,
    PRESETS,
    Preset,
    available_backbones,
    build_sam_network,
    build_unet,
    on_meta,
    sam_record,
    trainer_class,
    training_forwards,
    training_network,
)
from nnunet_sam.benchmarking.counting import (
    all_frozen_floor,
    checkpoint_bytes,
    count_flops,
    encoder_floor,
    inference_flops,
    parameter_counts,
    train_step_flops,
)
from nnunet_sam.benchmarking.timing import attention_comparison, cpu_timings, sliding_window_times
from nnunet_sam.blocks.checkpointing import block_checkpointing
from nnunet_sam.inference.bound_forward import BoundForward
from nnunet_sam.trainers.masksam import MaskSAMTrainer
from nnunet_sam.training.memory_estimate import (
    GIB,
    MEMORY_OPTIONS,
    OPTIMIZER_STATE,
    SavedTensorTrace,
    activation_bytes,
    choose_memory_options,
    memory_estimate,
    memory_row,
    memory_table,
)


def benchmark_config(
    name: str, trainer: type, backbone: str, planned: Sequence[int], num_classes: int, in_channels: int, bf16: bool
) -> dict:
    """Everything counted (not run) for one trainer x backbone at its derived patch."""
    record = sam_record(trainer, planned, num_classes)
    patch = record["patch_size"]

    def build() -> nn.Module:
        return build_sam_network(trainer, record, in_channels, num_classes)

    net = on_meta(build)
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
            "train_step_checkpointed": checkpointed_train_step_flops(net, x),
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


def checkpointed_train_step_flops(net: nn.Module, x: torch.Tensor) -> int:
    with block_checkpointing():
        return train_step_flops(net, x)[0]


def preset_row(preset: Preset, in_channels: int, bf16: bool) -> dict:
    """Parameters, FLOPs (training step, inference forward; per sample) and estimated peak training memory at the
    preset's batch size with segment-anything's attention ("sam") and ours ("sdpa"), every memory option set.

    The training step is the trainer's own ``forward_batch`` hook (its stages, prompts simulated from the target),
    with the parameters its ``configure_optimizers`` trains (SAM's weights pretrained); FLOPs and memory are those
    of the costliest phase. Inference is the eval-mode forward; a promptable model without a prompt-free output
    (RadSAM) is counted through its last training phase in eval mode (``inference_scope`` says which).
    """
    records = {attention: preset.record(attention) for attention in ("sam", "sdpa")}
    patch = records["sdpa"]["patch_size"]
    trainer, classes = preset.trainer, preset.num_classes
    forwards = training_forwards(trainer, classes)

    def build(record: dict) -> nn.Module:
        return training_network(trainer, record, in_channels, classes)

    net = on_meta(lambda: build(records["sdpa"]))
    params = parameter_counts(net)
    x = torch.zeros(1, in_channels, *patch, device="meta")
    per_phase = {phase: train_step_flops(net, x, forward)[0] for phase, forward in forwards.items()}
    inference_scope = "eval forward"
    try:
        inference = inference_flops(net, x)
    except Exception as e:  # noqa: BLE001  (no prompt-free output)
        inference_scope = f"last training phase in eval mode (eval forward: {type(e).__name__})"
        inference = inference_flops(net, x, list(forwards.values())[-1])
    buffers = OPTIMIZER_STATE[trainer.optimizer_name]
    row = {
        "preset": preset.name,
        "trainer_class": trainer.__name__,
        "backbone": records["sdpa"]["backbone"],
        "patch_size": patch,
        "sam_input_size": records["sdpa"]["sam_input_size"],
        "batch_size": preset.batch_size,
        "target_gib": preset.target_gib,
        "phases": list(forwards),
        "inference_scope": inference_scope,
        "params": params,
        "flops": {"train_step": max(per_phase.values()), "train_step_per_phase": per_phase, "inference": inference},
        "memory_bytes": {},
    }
    for attention, record in records.items():
        row["memory_bytes"][attention] = memory_row(
            lambda r=record: build(r),
            params,
            buffers,
            in_channels,
            patch,
            preset.batch_size,
            bf16,
            list(forwards.values()),
        )
    if preset.target_gib is not None:
        choice, fits = choose_memory_options(row["memory_bytes"]["sdpa"], preset.target_gib * GIB)
        row["target"] = {"option_set": choice, "fits": fits, "bytes": row["memory_bytes"]["sdpa"][choice]}
    return row


def format_presets(rows: list[dict], attention: list[dict]) -> list[str]:
    lines = []
    if rows:
        lines += [
            "",
            "Presets: parameters, GFLOP per sample, estimated peak training memory (GiB) at the preset's batch size;",
            "attention 'sam' = segment-anything's, 'sdpa' = ours (nnunet_sam.backbones.attention); ckpt = block "
            "checkpointing, 16-bit = autocast. Estimates on fake tensors, not GPU measurements.",
        ]
        head = (
            f"{'preset':<30}{'backbone':<9}{'patch':<11}{'px':>5}{'b':>3}{'params M':>9}{'train GF':>10}"
            f"{'infer GF':>10}{'attn':>6}"
            + "".join(f"{o:>9}" for o in ("none", "ckpt", "16-bit", "both"))
            + f"  {'target (GiB)'}"
        )
        lines += [head, "-" * len(head)]
        for r in rows:
            if len(r["phases"]) > 1:
                per_phase = ", ".join(f"{k} {_g(v)}" for k, v in r["flops"]["train_step_per_phase"].items())
                lines.append(f"{r['preset']}: training phases (train GF) {per_phase}; the largest figures are shown")
            if r["inference_scope"] != "eval forward":
                lines.append(f"{r['preset']}: inference counted through its {r['inference_scope']}")
            for impl in ("sam", "sdpa"):
                m = r["memory_bytes"][impl]
                first = impl == "sam"
                target = ""
                if not first and r.get("target"):
                    t = r["target"]
                    target = f"{'fits' if t['fits'] else 'over'} {r['target_gib']:g} with {t['option_set']}"
                lines.append(
                    (
                        f"{r['preset'][:29]:<30}{r['backbone']:<9}{_patch(r['patch_size']):<11}"
                        f"{r['sam_input_size']:>5}{r['batch_size']:>3}{r['params']['total'] / 1e6:>9.1f}"
                        f"{_g(r['flops']['train_step']):>10}{_g(r['flops']['inference']):>10}"
                        if first
                        else " " * 90
                    )
                    + f"{impl:>6}"
                    + "".join(f"{_gib(m.get(o)):>9}" for o in MEMORY_OPTIONS)
                    + f"  {target}"
                )
    if attention:
        lines += ["", "Attention on this CPU: SAM ViT-B image encoder, one slice, forward + backward (same run):"]
        for r in attention:
            sam, ours = r["sam"], r["sdpa"]
            if "time_ratio" not in r:
                lines.append(f"  {r['input_size']} px: sam {sam}, ours {ours}")
                continue
            lines.append(
                f"  {r['input_size']:>5} px: segment-anything {sam['seconds']:.1f} s, {_gib(sam['peak_added_bytes'])} "
                f"GiB; ours {ours['seconds']:.1f} s, {_gib(ours['peak_added_bytes'])} GiB; ratio ours / theirs: time "
                f"{r['time_ratio']:.2f}, peak memory {r['memory_ratio']:.2f}"
            )
    return lines


def _patch(patch: Sequence[int]) -> str:
    return "x".join(map(str, patch))


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.1f}"


def _gib(size: float | None) -> str:
    return "-" if size is None else f"{size / GIB:.2f}"


def format_configs(report: dict) -> list[str]:
    """Tables of the trainer x backbone configurations and of the U-Net at their patches."""
    lines: list[str] = []
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

    return lines


def format_report(report: dict) -> str:
    lines = []
    setup = report["setup"]
    lines.append(
        f"nnunet_sam_benchmark: planned nnU-Net patch {setup['planned_patch']}, {setup['num_classes']} classes, "
        f"{setup['in_channels']} input channel(s); FLOPs in GFLOP per sample (batch 1), memory in GiB."
    )
    if report["configs"]:
        lines += format_configs(report)
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
    lines += format_presets(report.get("presets", []), report.get("attention", []))
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
            "method": benchmarking.__doc__,
        },
        "configs": [],
        "unet": {},
        "cpu": [],
        "input_sizes": [],
        "volume_scaling": [],
        "presets": [],
        "attention": [],
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
    for preset in [p for p in PRESETS if p.name in args.presets]:
        _progress(start, f"preset {preset.name} batch {preset.batch_size}")
        try:
            report["presets"].append(preset_row(preset, args.in_channels, not args.no_autocast))
        except Exception as e:  # noqa: BLE001
            report["failed"][f"preset {preset.name} b{preset.batch_size}"] = f"{type(e).__name__}: {e}"
    if args.attention_sizes:
        _progress(start, f"attention on this CPU at {args.attention_sizes} px (fresh processes)")
        report["attention"] = attention_comparison(args.attention_sizes)
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

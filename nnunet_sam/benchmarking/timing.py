"""Measured on this machine: CPU wall time of training steps and inference, and the attention comparison.

* Training step (forward + real loss + backward + optimiser step) and inference patch: median of ``runs`` after
  ``warmup`` runs, with nnU-Net's U-Net at the same patch measured in the same run.
* Sliding-window inference against volume size: nnU-Net's own predictor (tile step 0.5, Gaussian, no mirroring).
* Attention: SAM ViT-B's image encoder (random weights, frozen; the input needs a gradient, as behind a trainable
  stem) forward + backward on one slice, with segment-anything's attention and with ours, each in a fresh
  process of this run: wall time and the peak resident memory the pass adds (``ru_maxrss`` after it minus the
  resident memory before it).
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_sam.backbones.encoder import blockwise, run_block
from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.benchmarking.configs import build_unet
from nnunet_sam.benchmarking.prediction import network_predictor


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
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    patch = list(record["patch_size"])
    torch.manual_seed(0)
    net = trainer.build_network(record, in_channels, num_classes)
    predictor, _ = network_predictor(net, patch, num_classes, record=record, name=trainer.__name__)
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


_UNET_TIMES: dict[tuple, dict] = {}  # the U-Net is timed once per patch and shared by the trainers of one run


def cpu_timings(trainer: type, record: dict, in_channels: int, num_classes: int, runs: int, warmup: int) -> dict:
    patch = record["patch_size"]
    torch.manual_seed(0)
    net = trainer.build_network(record, in_channels, num_classes)
    x = torch.randn(2, in_channels, *patch)
    target = blob_target(2, patch, num_classes)
    loss = trainer.build_loss(num_classes)  # the loss a training of this trainer uses
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


def _resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def encoder_pass(backbone: str, size: int, attention: str, seed: int = 0) -> dict:
    """One forward + backward of a backbone's image encoder on one slice (this process): seconds, added peak bytes."""
    torch.manual_seed(seed)
    encoder = build_sam(get_backbone(backbone), size).image_encoder.requires_grad_(False)
    view = blockwise(encoder)
    x = torch.randn(1, 3, size, size, requires_grad=True)
    before = _resident_bytes()
    start = time.perf_counter()
    h = view.stem(x)
    for i, block in enumerate(view.blocks):
        h = run_block(block, view.enter_block(i, h), lambda a: a, torch.zeros_like, attention)
    view.neck(h).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"seconds": seconds, "peak_added_bytes": max(0, peak - before)}


def attention_comparison(
    sizes: Sequence[int], backbone: str = "vit_b", timeout: float = 3600, limit_gib: float = 16
) -> list[dict]:
    """segment-anything's attention against ours in the image encoder, each pass in a fresh process, same run.

    Each process may map at most ``limit_gib`` GiB (``RLIMIT_AS``): a pass that needs more fails with an error in
    the report instead of pushing a shared machine into its out-of-memory killer.
    """

    def limit() -> None:
        size = int(limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))

    rows = []
    for size in sizes:
        row: dict = {"backbone": backbone, "input_size": size}
        for attention in ("sam", "sdpa"):
            code = (
                "import json, sys; from nnunet_sam.benchmarking.timing import encoder_pass; "
                f"print(json.dumps(encoder_pass({backbone!r}, {size}, {attention!r})))"
            )
            try:
                done = subprocess.run(
                    [sys.executable, "-c", code],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=True,
                    preexec_fn=limit,
                )
                row[attention] = json.loads(done.stdout.strip().splitlines()[-1])
            except subprocess.CalledProcessError as e:
                row[attention] = {"error": (e.stderr or "").strip().splitlines()[-1:] or [f"exit code {e.returncode}"]}
            except (subprocess.SubprocessError, ValueError, IndexError) as e:
                row[attention] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        if "seconds" in row["sam"] and "seconds" in row["sdpa"]:
            row["time_ratio"] = row["sdpa"]["seconds"] / row["sam"]["seconds"]
            row["memory_ratio"] = row["sdpa"]["peak_added_bytes"] / max(1, row["sam"]["peak_added_bytes"])
        rows.append(row)
    return rows

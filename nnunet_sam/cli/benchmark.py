"""``nnunet_sam_benchmark``: the command-line face of :mod:`nnunet_sam.benchmarking` (figures and methods there)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from nnunet_sam.backbones.sam_vit import BACKBONES as KNOWN_BACKBONES
from nnunet_sam.benchmarking.configs import BACKBONES, CPU_BACKBONES, METHODS, PRESETS
from nnunet_sam.benchmarking.report import format_report, run_benchmark


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nnunet_sam_benchmark",
        description="Parameters, FLOPs, estimated GPU memory, checkpoint size and CPU time of the SAM trainers "
        "next to nnU-Net's default U-Net. FLOPs and memory are counted on meta/fake tensors (no GPU needed).",
    )
    parser.add_argument("--trainers", nargs="+", default=list(METHODS), choices=list(METHODS))
    known = sorted(KNOWN_BACKBONES)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=known, metavar="BACKBONE")
    parser.add_argument(
        "--planned-patch",
        nargs="+",
        type=int,
        default=[64, 192, 160],
        help="nnU-Net's planned patch; each trainer derives its SAM patch from it (nnunet_sam.training.planning)",
    )
    parser.add_argument("--num-classes", type=int, default=14, help="classes including background (Synapse: 14)")
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument(
        "--cpu-backbones", nargs="*", default=list(CPU_BACKBONES), choices=known, help="backbones timed on CPU"
    )
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
    names = sorted({p.name for p in PRESETS})
    parser.add_argument("--presets", nargs="*", default=names, choices=names, metavar="PRESET", help=", ".join(names))
    parser.add_argument(
        "--attention-sizes",
        nargs="*",
        type=int,
        default=[512, 1024],
        help="input sizes of the CPU comparison of segment-anything's attention and ours (ViT-B encoder)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: measure step time and memory of every preset on the GPU instead (nnunet_sam.benchmarking.gpu)",
    )
    parser.add_argument(
        "--short-training",
        default="MaskSAMTrainer_ACDC",
        metavar="TRAINER",
        help="--device cuda: the trainer of the short real nnUNetv2_train run on phantom data ('none': skip it)",
    )
    parser.add_argument(
        "--workdir",
        default="nnunet_sam_gpu_check",
        help="--device cuda: folder of the short training (nnU-Net's raw/preprocessed/results folders, its log)",
    )
    parser.add_argument("--gpu-gib", type=float, default=24.0, help="GPU memory target for MaskSAMTrainer (vit_b)")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark for command-line arguments ``argv``, print the table, write the JSON; return the report."""
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        from nnunet_sam.benchmarking.gpu import format_gpu_report, run_gpu_benchmark

        if not torch.cuda.is_available():
            print(
                "nnunet_sam_benchmark: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False); the "
                "estimates run on any machine without --device",
                file=sys.stderr,
            )
            raise SystemExit(2)
        short = None if args.short_training.lower() == "none" else args.short_training
        presets = [p for p in PRESETS if p.name in args.presets]
        report = run_gpu_benchmark(presets, args.in_channels, "cuda", short=short, workdir=args.workdir)
        text = format_gpu_report
    else:
        report, text = run_benchmark(args), format_report
    if args.json:  # before the table: a long run's figures survive a formatting fault
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    print(text(report))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)

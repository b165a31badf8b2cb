"""Command-line face of :mod:`nnunet_sam.evaluation.radsam`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from nnunet_sam.cli import conventions
from nnunet_sam.evaluation.radsam import GRIDS, LEVELS, format_table, run_benchmark
from nnunet_sam.inference.radsam import PROPAGATIONS, RadSAMModel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="RadSAM benchmark: volume-level prompting (one prompt + two boundary slices, propagated) and "
        "slice-level prompting (one prompt per slice), with 0..N simulated edit clicks; prints the per-class 3D "
        "Dice table."
    )
    parser.add_argument("-m", required=True, help="RadSAM model folder (nnUNet_results/DATASET/TRAINER__PLANS__2d)")
    parser.add_argument("-i", required=True, help="image folder (CASE_0000.nii.gz ...)")
    parser.add_argument("-l", required=True, help="reference label folder (CASE.nii.gz)")
    parser.add_argument("--prompts", nargs="+", default=["point", "box"], choices=["point", "box"])
    parser.add_argument("--edits", nargs="+", type=int, default=[0, 5], help="edit clicks per volume (volume level)")
    parser.add_argument(
        "--slice-edits", nargs="+", type=int, default=[0, 2], help="edit clicks per slice (slice level)"
    )
    parser.add_argument("-f", type=conventions.fold, default=0, help="fold (default 0; or 'all')")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated prompts and clicks")
    parser.add_argument("--max-cases", type=int, help="use only the first N cases")
    parser.add_argument(
        "--grid",
        choices=GRIDS,
        default="original",
        help="where 3D Dice is computed: original (default, the paper's: the image grid) or preprocessed",
    )
    parser.add_argument(
        "--stop-at-clicked-slices",
        action="store_true",
        help="volume-level edits stop propagating before a slice with earlier clicks (default: they pass it and "
        "re-use its clicks, the paper's reading)",
    )
    parser.add_argument(
        "--propagation",
        choices=PROPAGATIONS,
        help="what each slice passes to the next at volume level: its mask (RadSAM's training) or a box around it "
        "(RadSAM's Table 5 compares both; default: the model's own)",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also score each slice's best of SAM's three multimask outputs at slice level (RadSAM's Table 6)",
    )
    parser.add_argument(
        "--points",
        type=int,
        default=1,
        help="points per point prompt at slice level (default 1; e.g. 5 for PanSAM's 'SAM' row, with --levels slice)",
    )
    parser.add_argument(
        "--levels", nargs="+", choices=LEVELS, default=list(LEVELS), help="prompting levels (default: both)"
    )
    parser.add_argument("--json", help="also write the result (with per-case values) to this JSON file")
    parser.add_argument("-device", default="cpu", choices=["cuda", "cpu", "mps"], help="device (default cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.edits + args.slice_edits) < 0:
        parser.error("edit counts must be >= 0")
    if args.points < 1:
        parser.error(f"--points must be >= 1, got {args.points}")
    if args.points > 1 and "volume" in args.levels:
        parser.error(
            f"--points {args.points} is a slice-level setting (the volume level takes one prompt): add --levels slice"
        )
    model = RadSAMModel(args.m, args.f, args.chk, args.device)
    result = run_benchmark(
        model,
        args.i,
        args.l,
        args.prompts,
        sorted(set(args.edits)),
        sorted(set(args.slice_edits)),
        args.seed,
        args.max_cases,
        args.grid,
        not args.stop_at_clicked_slices,
        args.propagation,
        args.oracle,
        args.points,
        args.levels,
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

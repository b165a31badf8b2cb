"""Command-line face of :mod:`nnunet_sam.evaluation.prompted` (``nnunet_sam_evaluate_prompted``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_sam.cli import conventions
from nnunet_sam.evaluation.folders import EvaluationError
from nnunet_sam.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM
from nnunet_sam.evaluation.prompted import NUM_POINTS, PAPER_POSITION, POSITIONS, run_prompted_evaluation

COMMAND = "nnunet_sam_evaluate_prompted"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet_sam_evaluate_prompted",
        description="3DSAM-adapter's point-prompt evaluation: simulate 1, 3 or 10 clicks per object from the "
        "reference (uniform, the default: voxels of the object drawn uniformly, as 3DSAM-adapter's public test "
        "script; centre: deepest voxel, then the core with depth >= 0.75 of the maximum; surrounding: depth "
        "between 0.25 and 0.75; margin: depth <= 0.25), predict with a SAM3DAdapterTrainer_prompted* model and "
        "report Dice, NSD and HD95 per class (evaluation.json, tables.md, table_*.csv; one row per setting).",
    )
    parser.add_argument("-m", required=True, help="model folder (trained with SAM3DAdapterTrainer_prompted*)")
    parser.add_argument("-i", required=True, help="image folder (CASE_0000.nii.gz, ...), e.g. imagesTs")
    parser.add_argument("-ref", required=True, help="reference label folder, e.g. labelsTs")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("--points", type=int, nargs="+", choices=NUM_POINTS, default=[1], help="clicks per object")
    parser.add_argument(
        "--position", nargs="+", choices=POSITIONS, default=[PAPER_POSITION], help="click positions (default uniform)"
    )
    parser.add_argument("-f", nargs="+", type=conventions.fold, default=[0], help="folds (or 'all'); default 0")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated clicks (default 0)")
    parser.add_argument("--nsd-tolerance", type=float, default=DEFAULT_NSD_TOLERANCE_MM, help="NSD tolerance in mm")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device")
    parser.add_argument(
        "--whole-volume",
        action="store_true",
        help="predict every sliding-window patch (default: one patch centred on the clicks, 3DSAM-adapter's test "
        "protocol)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from nnunet_sam.inference.model_folder import ModelFolderError
    from nnunet_sam.inference.prompted import UnusableInputError

    args = build_parser().parse_args(argv)
    folds = list(args.f)
    try:
        run_prompted_evaluation(
            args.m,
            args.i,
            args.ref,
            args.o,
            args.points,
            args.position,
            folds,
            args.seed,
            args.nsd_tolerance,
            not args.disable_tta,
            args.device,
            whole_volume=args.whole_volume,
        )
    except (EvaluationError, UnusableInputError, ModelFolderError) as error:
        return conventions.error(COMMAND, error)
    print((Path(args.o) / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

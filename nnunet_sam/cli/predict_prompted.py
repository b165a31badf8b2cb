"""Command-line face of :mod:`nnunet_sam.inference.prompted` (``nnunet_sam_predict_prompted``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_sam.cli import conventions
from nnunet_sam.inference.model_folder import ModelFolderError
from nnunet_sam.inference.predict import UnusableArgumentsError, check_run
from nnunet_sam.inference.prompted import UnusableInputError, initialize_predictor, predict_prompted, read_points_file

COMMAND = "nnunet_sam_predict_prompted"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet_sam_predict_prompted",
        description="Point-prompted prediction with a SAM3DAdapterTrainer_prompted* model: images + a points file "
        '(JSON: {"coordinates": "voxel" | "world", "points": {case: [{"position": [..3..], "label": class}, ...]}}; '
        "voxel = 0-based (z, y, x) index of the array as SimpleITK reads it, world = ITK physical (x, y, z) mm) -> "
        "label maps with the input's geometry. Bad cases are reported and skipped; exits with 1 if any failed.",
    )
    parser.add_argument("-i", required=True, help="input folder (CASE_0000.nii.gz, ...)")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-points", required=True, help="points file (JSON, see the description)")
    parser.add_argument(
        "--whole-volume",
        action="store_true",
        help="predict every sliding-window patch, each with the clicks inside it (default: 3DSAM-adapter's test "
        "protocol, one patch centred on the clicks and background elsewhere)",
    )
    conventions.add_model_arguments(parser, trainer="SAM3DAdapterTrainer_prompted", configuration="3d_fullres")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model_folder, folds = conventions.model_folder_and_folds(parser, args)
    try:
        read_points_file(args.points)  # a broken file stops the command before the model is loaded
        check_run(args.i, args.o, model_folder, folds, args.chk, args.save_probabilities)
        predictor = initialize_predictor(
            model_folder, folds, args.chk, args.step_size, not args.disable_tta, args.device, args.whole_volume
        )
        failures = predict_prompted(predictor, args.i, args.points, args.o, args.save_probabilities)
    except (UnusableInputError, UnusableArgumentsError, ModelFolderError) as error:
        return conventions.error(COMMAND, error)
    if failures:
        return conventions.failed_cases(COMMAND, failures)
    print(f"every case predicted into {args.o}")
    return conventions.DONE


if __name__ == "__main__":
    sys.exit(main())

"""Command-line face of :mod:`nnunet_sam.inference.predict` (``nnunet_sam_predict``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nnunet_sam.cli import conventions
from nnunet_sam.inference.dicom import Algorithm
from nnunet_sam.inference.model_folder import ModelFolderError, load_predictor
from nnunet_sam.inference.predict import (
    OUTPUT_TYPES,
    UnusableArgumentsError,
    _describe,
    cases_of_part,
    check_run,
    input_cases,
    other_format_files,
    predict_cases,
)

COMMAND = "nnunet_sam_predict"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict a folder like nnUNetv2_predict, but check every case, skip bad ones with a message and "
        "predict the others; exits with 1 if any case failed. Cases run one after the other in this process."
    )
    parser.add_argument(
        "-i",
        required=True,
        help="input folder: CASE_0000.nii.gz, CASE_0001.nii.gz, ...; or a DICOM series (a folder of CT/MR slices, "
        "or one sub-folder per case)",
    )
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument(
        "--output-type",
        choices=OUTPUT_TYPES,
        default="nifti",
        help="nifti (default): the model's image format; dicom_seg: also a DICOM Segmentation CASE.dcm referencing "
        "the source series (DICOM input only; needs the extra nnunet-sam[dicom])",
    )
    parser.add_argument("--seg-only", action="store_true", help="with --output-type dicom_seg: write only the SEG")
    parser.add_argument(
        "--series", metavar="UID", help="the SeriesInstanceUID to predict in DICOM folders that hold several series"
    )
    parser.add_argument("--continue_prediction", action="store_true", help="skip cases whose output exists")
    parser.add_argument(
        "-num_parts", type=int, default=1, help="split the cases into this many parts (one per machine or job)"
    )
    parser.add_argument(
        "-part_id", type=int, default=0, help="the part this run predicts, 0 to num_parts - 1 (as nnUNetv2_predict)"
    )
    conventions.add_model_arguments(parser, trainer="nnUNetTrainer", configuration=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model_folder, folds = conventions.model_folder_and_folds(parser, args)
    if args.seg_only and args.output_type != "dicom_seg":
        parser.error("--seg-only goes with --output-type dicom_seg")
    try:
        check_run(args.i, args.o, model_folder, folds, args.chk, args.save_probabilities, args.output_type)
    except (UnusableArgumentsError, ModelFolderError) as error:
        parser.error(str(error))
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        parser.error(f"-part_id must be 0 to num_parts - 1 (got -part_id {args.part_id} -num_parts {args.num_parts})")
    try:
        predictor = load_predictor(model_folder, folds, args.chk, args.device, args.step_size, not args.disable_tta)
    except ModelFolderError as error:  # e.g. a checkpoint that would run code (nnunet_sam.safe_checkpoints)
        parser.error(str(error))
    ending = predictor.dataset_json["file_ending"]
    cases, misnamed = input_cases(args.i, ending, args.o)
    part = f" of part {args.part_id} (-num_parts {args.num_parts}, {len(cases)} in the folder)"
    part = part if args.num_parts > 1 else ""
    cases = cases_of_part(cases, args.num_parts, args.part_id)
    try:
        failures = predict_cases(
            predictor,
            cases,
            args.o,
            args.save_probabilities,
            not args.continue_prediction,
            output_type=args.output_type,
            seg_only=args.seg_only,
            series_uid=args.series,
            algorithm=Algorithm.of_model_folder(model_folder, folds),
        )
    except OSError as error:  # dataset.json / plans.json of the output folder
        return conventions.error(COMMAND, f"cannot write into {args.o}: {_describe(error)}; nothing was predicted")
    print(f"{len(cases) - len(failures)} of {len(cases)} case(s){part} predicted into {args.o}")
    for name in misnamed if args.part_id == 0 else []:  # in no part: part 0 reports them
        failures[name] = f"{name}: not named CASE_XXXX{ending} (XXXX = channel number, e.g. _0000); not predicted"
    for name in other_format_files(args.i, ending) if args.part_id == 0 else []:
        failures[name] = f"{name}: not a {ending} file, the format of this model's data; not predicted (convert it)"
    return conventions.failed_cases(COMMAND, failures, f"case(s){part}")


if __name__ == "__main__":
    sys.exit(main())

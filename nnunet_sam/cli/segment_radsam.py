"""Command-line face of :mod:`nnunet_sam.inference.radsam` (``nnunet_sam_segment_radsam``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_sam.cli import conventions
from nnunet_sam.evaluation.folders import EvaluationError, _check_geometry  # the evaluation's geometry check
from nnunet_sam.file_checks import DamagedFileError, is_nifti, read_label_values
from nnunet_sam.inference import dicom
from nnunet_sam.inference.model_folder import ModelFolderError, check_model_folder
from nnunet_sam.inference.predict import (
    IMAGE_ENDINGS,
    OUTPUT_TYPES,
    BadCaseError,
    read_dicom_case,
    write_checked,
    write_seg_checked,
)
from nnunet_sam.inference.radsam import (
    Geometry,
    PromptError,
    RadSAMModel,
    SliceModel,
    edit,
    from_mask,
    read_prompt_file,
    segment_from_prompt,
)

COMMAND = "nnunet_sam_segment_radsam"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="RadSAM: segment a 3D structure from one prompt (point, box or mask on one slice, plus the "
        "boundary slices) with a trained RadSAM model, apply correction clicks, and write the 3D mask with the "
        "image's geometry. The prompt file format is described in nnunet_sam.inference.radsam.read_prompt_file."
    )
    parser.add_argument(
        "-i",
        nargs="+",
        required=True,
        help="image file(s), one per channel (CASE_0000.nii.gz ...), or one DICOM series folder",
    )
    parser.add_argument(
        "-o", required=True, help="output mask file (same format as the image; .nii.gz for a DICOM series)"
    )
    parser.add_argument(
        "--output-type",
        choices=OUTPUT_TYPES,
        default="nifti",
        help="dicom_seg: also write a DICOM Segmentation of the series (-i a DICOM folder) to -o with the ending "
        ".dcm (needs the extra nnunet-sam[dicom])",
    )
    parser.add_argument("--seg-only", action="store_true", help="with --output-type dicom_seg: write only the SEG")
    parser.add_argument("--series", metavar="UID", help="the SeriesInstanceUID to read if the folder holds several")
    parser.add_argument("-m", required=True, help="model folder (nnUNet_results/DATASET/TRAINER__PLANS__2d)")
    parser.add_argument("--prompt", required=True, help="prompt file (JSON)")
    parser.add_argument("--mask", help="3D mask file with the image's geometry, for 'kind': 'mask' prompts")
    parser.add_argument(
        "--start", help="start from this 3D label map (e.g. any nnU-Net model's prediction) instead of a prompt"
    )
    parser.add_argument("--start-label", type=int, default=1, help="label of the structure in --start (default 1)")
    parser.add_argument("--label", type=int, default=1, help="value written for the structure (default 1)")
    parser.add_argument("-f", type=conventions.fold, default=0, help="fold (default 0; or 'all')")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("-device", default="cpu", choices=["cuda", "cpu", "mps"], help="device (default cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fold = args.f
    inputs = [*args.i, args.prompt, *(f for f in (args.mask, args.start) if f)]
    if any(os.path.realpath(args.o) == os.path.realpath(f) for f in inputs):
        parser.error(f"the output -o {args.o} is an input of this run; it would be overwritten. Give a new file")
    if args.label == 0:
        parser.error("--label 0 is the background: the mask would be empty. Give the structure's label value")
    from_dicom = len(args.i) == 1 and os.path.isdir(args.i[0])
    seg_file = seg_path(args.o)
    if args.seg_only and args.output_type != "dicom_seg":
        parser.error("--seg-only goes with --output-type dicom_seg")
    if args.output_type == "dicom_seg":
        if not from_dicom:
            parser.error(
                "--output-type dicom_seg needs a DICOM series folder as -i: a DICOM SEG must reference the source "
                "instances it segments, which a NIfTI image has not"
            )
        try:
            dicom.require("--output-type dicom_seg")
        except dicom.DicomError as error:
            parser.error(str(error))
        if os.path.realpath(seg_file).startswith(os.path.realpath(args.i[0]) + os.sep):
            parser.error(f"the SEG {seg_file} would be written into the series folder {args.i[0]}; write it elsewhere")
    ending = next((e for e in IMAGE_ENDINGS if args.i[0].lower().endswith(e)), None)
    if ending is not None and not args.o.lower().endswith(ending):
        parser.error(f"the output -o {args.o} must end with {ending}: the mask is written in the image's format")
    try:
        check_model_folder(args.m, [fold], args.chk)
        with open(os.path.join(args.m, "dataset.json"), encoding="utf-8") as f:
            labels = json.load(f)["labels"]
    except ModelFolderError as error:
        parser.error(str(error))
    classes = sorted(v for v in labels.values() if isinstance(v, int) and not isinstance(v, bool) and v != 0)
    if args.label not in classes:
        parser.error(f"--label {args.label} is not a class of the model; its classes are {classes}")
    try:
        model = RadSAMModel(args.m, fold, args.chk, args.device)
        series, writer = None, model.reader
        if from_dicom:
            names = model.dataset_json["channel_names"]
            channels = [names[k] for k in sorted(names, key=int)]
            case = os.path.basename(os.path.normpath(args.i[0]))
            for_seg = args.output_type == "dicom_seg"
            series, image, properties = read_dicom_case(case, args.i[0], channels, False, args.series, for_seg)
            writer = SimpleITKIO()
        else:
            image, properties = model.read(args.i)

        def label_map(path: str, value: int | None) -> np.ndarray:
            """--mask / --start: complete, integer-valued, on the image's grid (as evaluation checks them)."""
            try:
                if is_nifti(path):
                    read_label_values(path)  # cut short (ITK: zeros), NaN (ITK: 0) or fractional voxels
                seg, seg_properties = model.reader.read_seg(path)  # (1, Z, Y, X)
                _check_geometry(image.shape[1:], properties, seg.shape[1:], seg_properties, path)
            except (DamagedFileError, EvaluationError) as error:
                raise PromptError(
                    str(error).replace(f"case {path}: ", f"{path}: ").replace("prediction", "map")
                ) from None
            except Exception as error:  # the reader's own errors for a file it cannot read
                raise PromptError(f"{path} cannot be read as a label map ({type(error).__name__}: {error})") from None
            return (seg > 0 if value is None else seg == value).astype(np.int16)

        extra = None
        if args.mask or args.start:
            extra = label_map(args.mask, None) if args.mask else label_map(args.start, args.start_label)
        data, seg, properties = model.preprocess(image, properties, extra)
        geometry = Geometry(properties, data.shape[1:])
        extra_mask = None if seg is None else seg[0] > 0
        prompts = read_prompt_file(args.prompt, geometry, extra_mask if args.mask else None)
        slices = SliceModel(model.network, data, args.device)
        if args.start:
            segmentation = from_mask(extra_mask, prompts.boundaries)
        else:
            if prompts.prompt is None:
                raise PromptError("the prompt file needs 'kind' (with its coordinates)")
            if prompts.boundaries is None and slices.propagation != "box":
                raise PromptError("the prompt file needs 'boundaries' (this model propagates mask prompts)")
            # box models stop where the structure ends: without boundaries they may go through the whole volume
            boundaries = prompts.boundaries or (0, data.shape[1] - 1)
            segmentation = segment_from_prompt(slices, prompts.prompt, boundaries)
        segmentation = edit(slices, segmentation, prompts.corrections)
        result = model.to_original(segmentation.mask, properties) * np.uint8(args.label)
        if series is not None and args.output_type == "dicom_seg":
            name = next(k for k, v in labels.items() if v == args.label)
            algorithm = dicom.Algorithm.of_model_folder(args.m, [fold])
            write_seg_checked(os.path.basename(args.o), series, result, {args.label: name}, seg_file, algorithm)
        if not args.seg_only:
            try:
                write_checked(os.path.basename(args.o), result, writer, args.o, properties)
            except BadCaseError:
                if series is not None and args.output_type == "dicom_seg":
                    os.unlink(seg_file)  # both outputs or neither
                raise
    except ModelFolderError as error:  # another method's model
        parser.error(str(error))
    except (PromptError, BadCaseError) as error:
        return conventions.error(COMMAND, error)
    written = ([seg_file] if args.output_type == "dicom_seg" else []) + ([] if args.seg_only else [args.o])
    voxels = int(segmentation.mask.sum())
    print(f"wrote {' and '.join(written)}: {voxels} voxels in the model grid, slices {segmentation.boundaries}")
    return 0


def seg_path(output: str) -> str:
    """Where ``--output-type dicom_seg`` writes the SEG: ``-o`` itself if it ends with .dcm, else ``-o`` with its
    image ending replaced by .dcm (``liver.nii.gz`` -> ``liver.dcm``)."""
    if output.lower().endswith(dicom.SEG_ENDING):
        return output
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gipl", ".tif", ".tiff", ".png"):
        if output.endswith(ending):
            return output[: -len(ending)] + dicom.SEG_ENDING
    return output + dicom.SEG_ENDING


if __name__ == "__main__":
    sys.exit(main())

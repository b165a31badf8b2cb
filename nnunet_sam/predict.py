"""``nnunet_sam_predict``: nnUNetv2_predict that checks every case and keeps going past a bad one.

nnU-Net's ``nnUNetv2_predict`` stops at the first case it cannot read or process and leaves the rest of the
folder unpredicted; some bad inputs (NaN voxels, a missing channel file) it does not notice at all. This command
takes the common arguments of ``nnUNetv2_predict`` and works on the same model folders, but predicts one case
after the other in this process (nnU-Net's own preprocessing, sliding window and export): every case is checked
first (:func:`check_case`), a case that cannot be segmented correctly is skipped with a message naming the case
and the problem, the others are predicted, and the command lists the failures at the end and exits with 1.
See docs/bad_inputs.md for what is checked and what nnU-Net does with each bad input.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence

import nibabel
import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json, save_pickle
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.file_path_utilities import get_output_folder

NON_FINITE = "non-finite voxels (NaN or inf)"
NON_FINITE_ADVICE = (
    "a segmentation of them would be meaningless (ITK's NIfTI reader even turns them into 0 silently). "
    "Replace them (e.g. by the background intensity) and predict again"
)


class BadCaseError(ValueError):
    """A prediction input that cannot be segmented correctly; the message names the case and the problem."""


def check_case(case: str, image: np.ndarray, properties: dict, channel_names: Sequence[str], model_is_3d: bool) -> None:
    """Raise :class:`BadCaseError` unless ``image`` (C, Z, Y, X), as nnU-Net's readers return it, can be segmented.

    Checks: the number of channels, a 2D image (one slice) given to a 3D model, non-finite voxels (NaN, inf; readers
    other than ITK's NIfTI reader keep them, see :func:`check_nifti_file`) and,
    where the reader reports one (``properties["sitk_stuff"]["direction"]``), a non-orthonormal direction matrix.
    Volumes smaller than the patch are fine: nnU-Net pads them and crops the prediction back.
    """
    if image.ndim != 4:
        raise BadCaseError(f"{case}: the reader returned an array of shape {image.shape}, expected (C, Z, Y, X)")
    if image.shape[0] != len(channel_names):
        raise BadCaseError(
            f"{case}: {image.shape[0]} channel(s) but the model expects {len(channel_names)} "
            f"({', '.join(channel_names)}): one file per channel, named CASE_0000, CASE_0001, ..."
        )
    if model_is_3d and image.shape[1] == 1:
        raise BadCaseError(
            f"{case}: a 2D image (one slice of {image.shape[2]}x{image.shape[3]}) given to a 3D model; "
            "predict it with a 2d configuration (-c 2d)"
        )
    finite = np.isfinite(image)
    if not finite.all():
        bad = [f"{channel_names[c]}: {int((~finite[c]).sum())}" for c in range(image.shape[0]) if not finite[c].all()]
        raise BadCaseError(f"{case}: {NON_FINITE}: {'; '.join(bad)}; {NON_FINITE_ADVICE}")
    direction = properties.get("sitk_stuff", {}).get("direction")
    if direction is not None:
        n = int(round(len(direction) ** 0.5))
        matrix = np.asarray(direction, dtype=np.float64).reshape(n, n)
        if not np.allclose(matrix @ matrix.T, np.eye(n), atol=1e-4):
            raise BadCaseError(
                f"{case}: the direction matrix {matrix.round(4).tolist()} is not orthonormal (sheared or scaled "
                "axes); nnU-Net works in voxel space and would write a wrong geometry. Resample the image first"
            )


def check_nifti_file(case: str, files: Sequence[str]) -> None:
    """Raise :class:`BadCaseError` for what ITK's NIfTI reader would hide: sheared axes and NaN/inf voxels.

    ITK replaces a non-orthogonal affine by an orthogonal one (a warning on stderr only), so the prediction would be
    written with another geometry, and reads NaN and inf voxels as 0. Only the file itself shows either; the voxel
    data are read only for floating-point files (integer NIfTI cannot hold NaN).
    """
    for file in files:
        if not file.endswith((".nii", ".nii.gz")):
            continue
        nifti = nibabel.load(file)
        axes = np.asarray(nifti.affine, dtype=np.float64)[:3, :3]
        axes = axes / np.linalg.norm(axes, axis=0, keepdims=True)
        if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-4):
            raise BadCaseError(
                f"{case}: {os.path.basename(file)} has a non-orthogonal (sheared) affine "
                f"{axes.round(4).tolist()}; ITK would replace it by an orthogonal one and the prediction would not "
                "overlay the image. Resample the image to an orthogonal grid first"
            )
        if np.issubdtype(nifti.get_data_dtype(), np.floating):
            bad = int((~np.isfinite(np.asanyarray(nifti.dataobj))).sum())
            if bad:
                raise BadCaseError(f"{case}: {NON_FINITE}: {os.path.basename(file)}: {bad}; {NON_FINITE_ADVICE}")


def cases_in_folder(folder: str, file_ending: str) -> tuple[dict[str, list[str]], list[str]]:
    """nnU-Net's naming: CASE_XXXX<file_ending> per channel. Returns case -> sorted channel files, and the files
    with the right ending that do not follow the naming (nnU-Net ignores those silently)."""
    pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(file_ending)}")
    cases: dict[str, list[str]] = {}
    misnamed = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(file_ending):
            continue
        match = pattern.fullmatch(name)
        if match is None:
            misnamed.append(name)
        else:
            cases.setdefault(match.group(1), []).append(os.path.join(folder, name))
    return cases, misnamed


def cases_of_part(cases: dict[str, list[str]], num_parts: int, part_id: int) -> dict[str, list[str]]:
    """Part ``part_id`` of ``num_parts`` as ``nnUNetv2_predict -num_parts -part_id`` takes it: every
    ``num_parts``-th case of the sorted case names, from the ``part_id``-th on (disjoint parts, together all cases)."""
    return {case: cases[case] for case in sorted(cases)[part_id::num_parts]}


def read_and_check(
    case: str, files: Sequence[str], reader, channel_names: Sequence[str], model_is_3d: bool
) -> tuple[np.ndarray, dict]:
    """Read a case with nnU-Net's reader after :func:`check_nifti_file`, then :func:`check_case` it."""
    check_nifti_file(case, files)
    image, properties = reader.read_images(files)
    check_case(case, image, properties, channel_names, model_is_3d)
    return image, properties


def write_checked(
    case: str, segmentation: np.ndarray, writer: BaseReaderWriter, output_file: str, properties: dict
) -> None:
    """Write ``segmentation`` (Z, Y, X; (1, Y, X) for 2D images) to ``output_file`` only if it reads back equal.

    ITK's NIfTI writer does not raise on a full disk: it prints an error and leaves a truncated file that may even
    read back without error. The segmentation is therefore written to a hidden temporary file in the output
    folder, read back and compared voxel by voxel, and only then renamed to ``output_file``; otherwise the
    temporary file is removed and :class:`BadCaseError` names the case (an existing ``output_file`` is kept).
    """
    folder, name = os.path.split(output_file)
    temporary = os.path.join(folder, f".{name}.partial-{os.getpid()}{_ending(name)}")
    try:
        writer.write_seg(segmentation, temporary, properties)
        written = writer.read_seg(temporary)[0][0]
        complete = written.shape == segmentation.shape and np.array_equal(written, segmentation)
    except Exception as error:
        complete, reason = False, f"{type(error).__name__}: {error}"
    else:
        reason = "the file read back differs from the prediction"
    if not complete:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise BadCaseError(
            f"{case}: the segmentation could not be written completely to {output_file} ({reason}); is the disk "
            "full? Nothing was written for this case"
        )
    os.replace(temporary, output_file)


def _ending(name: str) -> str:
    """The file ending nnU-Net's writers choose the format by (``.nii.gz``, ``.nrrd``, ...)."""
    for ending in (".nii.gz", ".seg.nrrd"):
        if name.endswith(ending):
            return ending
    return os.path.splitext(name)[1]


def predict_cases(
    predictor: nnUNetPredictor,
    cases: dict[str, list[str]],
    output_folder: str,
    save_probabilities: bool = False,
    overwrite: bool = True,
    prepare: Callable[[str, np.ndarray, dict, np.ndarray], None] | None = None,
) -> dict[str, str]:
    """Check and predict every case (name -> its channel files) into ``output_folder``; return name -> error.

    A case that fails (a :class:`BadCaseError` or any other exception) is reported and skipped; the others are
    predicted. ``prepare(case, image, properties, data)``, if given, runs after nnU-Net's preprocessing and before
    the network, with the image as read (C, Z, Y, X), the properties preprocessing returned (crop box, shapes) and
    the preprocessed array; it may raise :class:`BadCaseError` (how the prompted command sets each case's points).
    """
    plans, configuration = predictor.plans_manager, predictor.configuration_manager
    dataset_json = predictor.dataset_json
    channel_names = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    model_is_3d = len(configuration.patch_size) == 3
    reader = plans.image_reader_writer_class()
    label_manager = plans.get_label_manager(dataset_json)
    preprocessor = configuration.preprocessor_class(verbose=False)
    os.makedirs(output_folder, exist_ok=True)
    save_json(dataset_json, os.path.join(output_folder, "dataset.json"), sort_keys=False)
    save_json(plans.plans, os.path.join(output_folder, "plans.json"), sort_keys=False)
    failures: dict[str, str] = {}
    for case, files in sorted(cases.items()):
        output = os.path.join(output_folder, case)
        if not overwrite and os.path.isfile(output + dataset_json["file_ending"]):
            continue
        try:
            image, properties = read_and_check(case, files, reader, channel_names, model_is_3d)
            low, high = float(image.min()), float(image.max())  # preprocessing may work in place
            data, _, properties = preprocessor.run_case_npy(image, None, properties, plans, configuration, dataset_json)
            if not np.isfinite(data).all():
                raise BadCaseError(
                    f"{case}: not finite after nnU-Net's intensity normalisation (intensities {low:g} to {high:g}); "
                    "check the image for extreme values"
                )
            if prepare is not None:
                prepare(case, image, properties, data)
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
            if not torch.isfinite(logits).all():
                raise BadCaseError(f"{case}: the network's output is not finite; nothing was written")
            result = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, plans, configuration, label_manager, properties, return_probabilities=save_probabilities
            )
            segmentation = result[0] if save_probabilities else result
            if save_probabilities:  # numpy and pickle raise on a full disk, unlike ITK's NIfTI writer
                np.savez_compressed(output + ".npz", probabilities=result[1])
                save_pickle(properties, output + ".pkl")
            write_checked(case, segmentation, reader, output + dataset_json["file_ending"], properties)
        except Exception as error:  # one bad case must not stop the others
            message = str(error) if isinstance(error, BadCaseError) else f"{case}: {type(error).__name__}: {error}"
            failures[case] = message
            print(f"FAILED {message}", file=sys.stderr)
        else:
            print(f"done {case}")
    return failures


def add_model_arguments(parser: argparse.ArgumentParser, trainer: str, configuration: str | None) -> None:
    """Model selection and inference options, named as in ``nnUNetv2_predict``; see :func:`model_folder_and_folds`."""
    parser.add_argument("-m", help="model folder (instead of -d, -c, -tr, -p), as nnUNetv2_predict_from_modelfolder")
    parser.add_argument("-d", help="dataset name or id")
    parser.add_argument("-c", default=configuration, help=f"configuration (default {configuration})")
    parser.add_argument("-tr", default=trainer, help=f"trainer (default {trainer})")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (or 'all')")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding window step (fraction of the patch)")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("--save_probabilities", action="store_true", help="also write the probabilities (.npz)")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device")


def model_folder_and_folds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, list]:
    """The model folder (``-m``, or nnU-Net's results folder of ``-d -c -tr -p``) and the folds of ``-f``."""
    if args.m is None and (args.d is None or args.c is None):
        parser.error("give -d and -c (with -tr, -p), or the model folder with -m")
    folds = [f if f == "all" else int(f) for f in args.f]
    return args.m or get_output_folder(args.d, args.tr, args.p, args.c), folds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict a folder like nnUNetv2_predict, but check every case, skip bad ones with a message and "
        "predict the others; exits with 1 if any case failed. Cases run one after the other in this process."
    )
    parser.add_argument("-i", required=True, help="input folder (CASE_0000.nii.gz, CASE_0001.nii.gz, ...)")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("--continue_prediction", action="store_true", help="skip cases whose output exists")
    parser.add_argument(
        "-num_parts", type=int, default=1, help="split the cases into this many parts (one per machine or job)"
    )
    parser.add_argument(
        "-part_id", type=int, default=0, help="the part this run predicts, 0 to num_parts - 1 (as nnUNetv2_predict)"
    )
    add_model_arguments(parser, trainer="nnUNetTrainer", configuration=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model_folder, folds = model_folder_and_folds(parser, args)
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        parser.error(f"-part_id must be 0 to num_parts - 1 (got -part_id {args.part_id} -num_parts {args.num_parts})")
    predictor = nnUNetPredictor(
        tile_step_size=args.step_size,
        use_mirroring=not args.disable_tta,
        device=torch.device(args.device),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(model_folder, folds, args.chk)
    ending = predictor.dataset_json["file_ending"]
    cases, misnamed = cases_in_folder(args.i, ending)
    part = f" of part {args.part_id} (-num_parts {args.num_parts}, {len(cases)} in the folder)"
    part = part if args.num_parts > 1 else ""
    cases = cases_of_part(cases, args.num_parts, args.part_id)
    failures = predict_cases(predictor, cases, args.o, args.save_probabilities, not args.continue_prediction)
    print(f"{len(cases) - len(failures)} of {len(cases)} case(s){part} predicted into {args.o}")
    for name in misnamed if args.part_id == 0 else []:  # in no part: part 0 reports them
        failures[name] = f"{name}: not named CASE_XXXX{ending} (XXXX = channel number, e.g. _0000); not predicted"
    if failures:
        print(f"{len(failures)} case(s){part} failed:", file=sys.stderr)
        for message in failures.values():
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

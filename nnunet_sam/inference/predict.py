"""``nnunet_sam_predict``: nnUNetv2_predict that checks every case and keeps going past a bad one.

nnU-Net's ``nnUNetv2_predict`` stops at the first case it cannot read or process and leaves the rest of the
folder unpredicted; some bad inputs (NaN voxels, a missing channel file) it does not notice at all. This command
takes the common arguments of ``nnUNetv2_predict`` and works on the same model folders, but predicts one case
after the other in this process (nnU-Net's own preprocessing, sliding window and export): every case is checked
first (:func:`check_case`), a case that cannot be segmented correctly is skipped with a message naming the case
and the problem, the others are predicted, and the command lists the failures at the end and exits with 1.
Before any work it refuses (exit 2) what makes the whole run impossible or harmful: a missing input folder, an
unwritable or full output folder, an untrained fold or damaged checkpoint, and an output folder whose files would
overwrite inputs of the run. Every output is written completely or not at all
(:func:`nnunet_sam.training.fault_tolerance.staged_file`).
See docs/bad_inputs.md for what is checked and what nnU-Net does with each bad input.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_pickle
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

from nnunet_sam.file_checks import DamagedFileError, load_nifti
from nnunet_sam.inference import dicom
from nnunet_sam.inference.model_folder import check_model_folder
from nnunet_sam.training.fault_tolerance import (
    DISK_FULL_ERRNOS,
    remove_stale_partial_files,
    staged_file,
    write_text_file,
)

COMMAND = "nnunet_sam_predict"

NON_FINITE = "non-finite voxels (NaN or inf)"
NON_FINITE_ADVICE = (
    "a segmentation of them would be meaningless (ITK's NIfTI reader even turns them into 0 silently). "
    "Replace them (e.g. by the background intensity) and predict again"
)
# a resampled case larger than this (voxels) is refused: a wrong header spacing (e.g. 1e30 mm), not an image
MAX_RESAMPLED_VOXELS = 2**32
# image formats nnU-Net's readers take: a file in another one than the model's is reported, not silently skipped
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gipl", ".tif", ".tiff", ".png", ".bmp")
# --output-type: the model's image format (as nnUNetv2_predict), or also a DICOM Segmentation (DICOM input only)
OUTPUT_TYPES = ("nifti", "dicom_seg")


class BadCaseError(ValueError):
    """A prediction input that cannot be segmented correctly; the message names the case and the problem."""


class UnusableArgumentsError(ValueError):
    """Arguments or files that make the whole run impossible (exit code 2, before any case is predicted)."""


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
    spacing = np.asarray(properties.get("spacing", ()), dtype=np.float64)
    if spacing.size and not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise BadCaseError(
            f"{case}: the voxel spacing {spacing.tolist()} is zero, negative or not finite; fix the image header"
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
    """Raise :class:`BadCaseError` for what ITK's NIfTI reader would hide: a file cut short (ITK fills the missing
    voxels with 0), a zero or non-finite spacing (ITK reads 1 mm), a NaN affine, sheared axes and NaN/inf voxels.

    ITK replaces a non-orthogonal affine by an orthogonal one (a warning on stderr only), so the prediction would be
    written with another geometry, and reads NaN and inf voxels as 0. Only the file itself shows any of these
    (:func:`nnunet_sam.file_checks.load_nifti`); the voxel values are read only for floating-point files (integer
    NIfTI cannot hold NaN).
    """
    for file in files:
        if not file.endswith((".nii", ".nii.gz")):
            continue
        try:
            nifti = load_nifti(file)
        except DamagedFileError as error:
            raise BadCaseError(f"{case}: {error}") from None
        axes = np.asarray(nifti.affine, dtype=np.float64)[:3, :3]
        axes = axes / np.linalg.norm(axes, axis=0, keepdims=True)
        if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-4):
            raise BadCaseError(
                f"{case}: {os.path.basename(file)} has a non-orthogonal (sheared) affine "
                f"{axes.round(4).tolist()}; ITK would replace it by an orthogonal one and the prediction would not "
                "overlay the image. Resample the image to an orthogonal grid first"
            )
        if np.issubdtype(nifti.get_data_dtype(), np.floating):
            data = np.asanyarray(nifti.dataobj)
            bad = int((~np.isfinite(data)).sum())
            if bad:
                raise BadCaseError(f"{case}: {NON_FINITE}: {os.path.basename(file)}: {bad}; {NON_FINITE_ADVICE}")
            huge = np.abs(data) > np.finfo(np.float32).max
            if huge.any():
                raise BadCaseError(
                    f"{case}: {os.path.basename(file)} has {int(huge.sum())} finite voxel(s) beyond float32's range "
                    f"(up to {float(np.abs(data).max()):.3g}; float32 ends at 3.4e38): nnU-Net reads images as "
                    "float32, where they would become inf. Replace or rescale them"
                )


def check_channel_numbers(case: str, files: Sequence[str], file_ending: str, channel_names: Sequence[str]) -> None:
    """Raise :class:`BadCaseError` unless the files are exactly CASE_0000 ... CASE_{C-1} for the model's C channels
    (nnU-Net only counts them, so a lone CASE_0001 would be read as channel 0)."""
    found = [os.path.basename(f)[len(case) + 1 : -len(file_ending)] for f in files]
    expected = [f"{c:04d}" for c in range(len(channel_names))]
    if sorted(found) != expected:
        names = ", ".join(f"{e} ({n})" for e, n in zip(expected, channel_names))
        raise BadCaseError(
            f"{case}: channel file(s) _{', _'.join(sorted(found))} but the model's dataset.json declares channel(s) "
            f"{names}: one file CASE_XXXX{file_ending} per channel number"
        )


def check_resampled_size(case: str, image: np.ndarray, properties: dict, target_spacing: Sequence[float]) -> None:
    """Raise :class:`BadCaseError` if resampling to the model's spacing would make an absurdly large volume (a header
    spacing such as 1e30 mm), instead of running out of memory somewhere in nnU-Net's preprocessing."""
    spacing = [float(s) for s in properties["spacing"]]
    if len(spacing) != len(target_spacing):
        return
    new_shape = compute_new_shape(image.shape[1:], spacing, target_spacing)
    if float(np.prod(np.asarray(new_shape, dtype=np.float64))) > MAX_RESAMPLED_VOXELS:
        raise BadCaseError(
            f"{case}: the voxel spacing {_numbers(spacing)} mm would resample the image of shape "
            f"{list(image.shape[1:])} to {_numbers(new_shape)} voxels at the model's spacing "
            f"{_numbers(target_spacing)} mm; the header's spacing is wrong. Fix it and predict again"
        )


def _numbers(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


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


def is_dicom_case(files: Sequence[str]) -> bool:
    """Whether a case's "files" are one DICOM series folder (see :func:`input_cases`)."""
    return len(files) == 1 and os.path.isdir(files[0])


def input_cases(
    folder: str, file_ending: str, output_folder: str | None = None
) -> tuple[dict[str, list[str]], list[str]]:
    """:func:`cases_in_folder`, plus each DICOM series folder (``-i`` itself or its sub-folders, see
    :func:`nnunet_sam.inference.dicom.dicom_cases`) as a case whose only "file" is the folder; an ``output_folder``
    inside ``folder`` is no case (it holds the SEGs of an earlier run)."""
    cases, misnamed = cases_in_folder(folder, file_ending)
    skip = os.path.realpath(output_folder) if output_folder else None
    for case, series_folder in dicom.dicom_cases(folder).items():
        if os.path.realpath(series_folder) != skip:
            cases.setdefault(case, [series_folder])
    return cases, misnamed


def other_format_files(folder: str, file_ending: str) -> list[str]:
    """Image files in ``folder`` in another format than the model's (e.g. ``a_0000.nii`` for a ``.nii.gz`` model):
    nnU-Net skips them without a word."""
    return sorted(
        name
        for name in os.listdir(folder)
        if not name.endswith(file_ending) and name.lower().endswith(IMAGE_ENDINGS) and not name.startswith(".")
    )


def check_folders(input_folder: str, output_folder: str) -> None:
    """Raise :class:`UnusableArgumentsError` unless ``input_folder`` is a folder and ``output_folder`` is (or can be
    made) a writable folder; leaves nothing behind in the output folder."""
    if not os.path.isdir(input_folder):
        what = "is a file, not a folder" if os.path.exists(input_folder) else "does not exist"
        raise UnusableArgumentsError(f"the input folder -i {input_folder} {what}")
    if os.path.exists(output_folder) and not os.path.isdir(output_folder):
        raise UnusableArgumentsError(f"the output folder -o {output_folder} is a file; give a folder")
    try:
        os.makedirs(output_folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_folder) as probe:  # a full disk fails here, not in dataset.json
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        message = f"cannot write into the output folder -o {output_folder}: {_describe(error)}"
        raise UnusableArgumentsError(message) from None


def output_collisions(
    cases: dict[str, list[str]], output_folder: str, file_ending: str, save_probabilities: bool
) -> list[str]:
    """Input files of this run that an output would overwrite (``-o`` equal to or around ``-i``): e.g. the mask of
    case ``a_0000`` is ``a_0000.nii.gz``, the image file of channel 0 of case ``a``."""
    inputs = {os.path.realpath(f): f for files in cases.values() for f in files}
    names = ["dataset.json", "plans.json"]
    for case in cases:
        names += [case + file_ending] + ([case + ".npz", case + ".pkl"] if save_probabilities else [])
    return sorted(inputs[p] for p in (os.path.realpath(os.path.join(output_folder, n)) for n in names) if p in inputs)


def check_run(
    input_folder: str,
    output_folder: str,
    model_folder: str,
    folds: Sequence[int | str],
    checkpoint: str,
    save_probabilities: bool,
    output_type: str = "nifti",
) -> None:
    """Everything that makes a prediction run impossible or harmful, checked before the model is loaded (raises
    :class:`UnusableArgumentsError`, or :class:`ModelFolderError` for the model folder): :func:`check_folders`,
    :func:`~nnunet_sam.inference.model_folder.check_model_folder`, an input folder without any case,
    :func:`output_collisions` (an ``-o`` that would overwrite input files of the run, or lie inside a DICOM series
    folder) and what DICOM needs (pydicom for DICOM input; for ``output_type`` ``dicom_seg`` highdicom and only
    DICOM cases, since a SEG of a NIfTI image would have no source instances to reference)."""
    check_folders(input_folder, output_folder)
    check_model_folder(model_folder, folds, checkpoint)
    with open(os.path.join(model_folder, "dataset.json"), encoding="utf-8") as f:
        ending = json.load(f)["file_ending"]
    cases, misnamed = input_cases(input_folder, ending, output_folder)
    if not cases and not misnamed and not other_format_files(input_folder, ending):
        raise UnusableArgumentsError(
            f"the input folder -i {input_folder} holds no case: expected image files CASE_0000{ending} (one per "
            "channel) or DICOM series (a folder of slices, or one sub-folder per case)"
        )
    collisions = output_collisions(cases, output_folder, ending, save_probabilities)
    if collisions:
        raise UnusableArgumentsError(
            f"the output folder -o {output_folder} would overwrite input file(s) of this run: "
            f"{', '.join(collisions)}. Give an output folder outside the input folder"
        )
    series_folders = [files[0] for files in cases.values() if is_dicom_case(files)]
    output = os.path.realpath(output_folder)
    for folder in series_folders:
        if output == os.path.realpath(folder) or output.startswith(os.path.realpath(folder) + os.sep):
            raise UnusableArgumentsError(
                f"the output folder -o {output_folder} lies in the DICOM series folder {folder}: its outputs would "
                "become part of the series. Give an output folder outside it"
            )
    try:
        if series_folders:
            dicom.require(f"the DICOM series in -i {input_folder}", "pydicom")
        if output_type == "dicom_seg":
            dicom.require("--output-type dicom_seg")
    except dicom.DicomError as error:
        raise UnusableArgumentsError(str(error)) from None
    not_dicom = sorted(case for case, files in cases.items() if not is_dicom_case(files))
    if output_type == "dicom_seg" and not_dicom:
        raise UnusableArgumentsError(
            f"--output-type dicom_seg needs DICOM input, but case(s) {', '.join(not_dicom[:5])}"
            f"{' ...' if len(not_dicom) > 5 else ''} are {ending} files: a DICOM SEG must reference the source "
            "instances it segments. Predict them with --output-type nifti"
        )


def _describe(error: OSError) -> str:
    """An OSError as the user should read it: the cause, and for a full disk that it is full."""
    text = f"{error.strerror or error} ({type(error).__name__})"
    return f"{text}: disk full" if error.errno in DISK_FULL_ERRNOS else text


def cases_of_part(cases: dict[str, list[str]], num_parts: int, part_id: int) -> dict[str, list[str]]:
    """Part ``part_id`` of ``num_parts`` as ``nnUNetv2_predict -num_parts -part_id`` takes it: every
    ``num_parts``-th case of the sorted case names, from the ``part_id``-th on (disjoint parts, together all cases)."""
    return {case: cases[case] for case in sorted(cases)[part_id::num_parts]}


def read_and_check(
    case: str,
    files: Sequence[str],
    reader,
    channel_names: Sequence[str],
    model_is_3d: bool,
    series_uid: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Read a case with nnU-Net's reader after :func:`check_nifti_file`, then :func:`check_case` it; a DICOM
    series folder (``files`` = [folder]) is read by :func:`read_dicom_case` instead."""
    if is_dicom_case(files):
        return read_dicom_case(case, files[0], channel_names, model_is_3d, series_uid)[1:]
    check_nifti_file(case, files)
    image, properties = reader.read_images(files)
    check_case(case, image, properties, channel_names, model_is_3d)
    return image, properties


def read_dicom_case(
    case: str,
    folder: str,
    channel_names: Sequence[str],
    model_is_3d: bool,
    series_uid: str | None = None,
    for_seg: bool = False,
):
    """A DICOM series folder -> (series, image (1, Z, Y, X), properties as nnU-Net's SimpleITK reader gives for
    the series' NIfTI conversion), checked (:func:`nnunet_sam.inference.dicom.read_series`, :func:`check_case`;
    with ``for_seg`` also that a SEG can reference every instance); :class:`BadCaseError` names the problem."""
    if len(channel_names) != 1:
        raise BadCaseError(
            f"{case}: a DICOM series is one image channel, but the model expects {len(channel_names)} "
            f"({', '.join(channel_names)}); convert the series to files CASE_0000, CASE_0001, ..."
        )
    try:
        series = dicom.read_series(folder, series_uid)
        if for_seg:
            dicom.check_referencable(series)
        image, properties = series.image()
    except dicom.DicomError as error:
        raise BadCaseError(f"{case}: {error}") from None
    check_case(case, image, properties, channel_names, model_is_3d)
    return series, image, properties


def dicom_output_ending(file_ending: str) -> str:
    """The ending of the NIfTI-like output of a DICOM case: the model's if SimpleITK writes it, else .nii.gz."""
    return file_ending if file_ending in (".nii.gz", ".nii", ".nrrd", ".mha") else ".nii.gz"


def write_seg_checked(
    case: str, series, segmentation: np.ndarray, labels: dict[int, str], output_file: str, algorithm
) -> None:
    """:func:`nnunet_sam.inference.dicom.write_segmentation` with its failures as :class:`BadCaseError` (complete
    or nothing)."""
    try:
        dicom.write_segmentation(series, segmentation, labels, output_file, algorithm)
    except dicom.DicomError as error:
        raise BadCaseError(f"{case}: {error}; no SEG was written") from None
    except OSError as error:
        raise BadCaseError(f"{case}: the SEG could not be written to {output_file} ({_describe(error)})") from None


def output_labels(dataset_json: dict) -> dict[int, str]:
    """Label value in the exported segmentation -> name, from a model's ``dataset.json`` (region-based models:
    the ``regions_class_order`` values, named by their regions)."""
    labels = {name: value for name, value in dataset_json["labels"].items() if name != "background"}
    if all(isinstance(v, int) for v in labels.values()):
        return {int(v): name for name, v in labels.items() if v != 0}
    order = dataset_json.get("regions_class_order", [])
    return {int(value): name for value, name in zip(order, labels)}


def write_checked(
    case: str, segmentation: np.ndarray, writer: BaseReaderWriter, output_file: str, properties: dict
) -> None:
    """Write ``segmentation`` (Z, Y, X; (1, Y, X) for 2D images) to ``output_file`` only if it reads back equal.

    ITK's NIfTI writer does not raise on a full disk: it prints an error and leaves a truncated file that may even
    read back without error. The segmentation is therefore written into a private temporary folder next to
    ``output_file`` (:func:`nnunet_sam.training.fault_tolerance.staged_file`: an unpredictable name created
    exclusively, so
    nothing planted there is written through), read back and compared voxel by voxel, and only then renamed to
    ``output_file``; otherwise :class:`BadCaseError` names the case and the cause (an existing file is kept).
    """
    try:
        with staged_file(output_file) as temporary:
            writer.write_seg(segmentation, temporary, properties)
            written = writer.read_seg(temporary)[0][0]
            if written.shape != segmentation.shape or not np.array_equal(written, segmentation):
                raise BadCaseError("the file read back differs from the prediction; is the disk full?")
    except BadCaseError as error:
        reason = str(error)
    except OSError as error:
        reason = _describe(error)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}; is the disk full?"
    else:
        return
    raise BadCaseError(
        f"{case}: the segmentation could not be written completely to {output_file} ({reason}). Nothing was "
        "written for this case"
    )


def save_probabilities_checked(case: str, output: str, probabilities: np.ndarray, properties: dict) -> None:
    """``output``.npz and ``output``.pkl (nnU-Net's --save_probabilities files), each complete or not at all."""
    try:
        with staged_file(output + ".npz") as temporary:
            np.savez_compressed(temporary, probabilities=probabilities)
        with staged_file(output + ".pkl") as temporary:
            save_pickle(properties, temporary)
    except OSError as error:
        if os.path.isfile(output + ".npz") and not os.path.isfile(output + ".pkl"):
            os.unlink(output + ".npz")  # one without the other is of no use to nnU-Net's ensembling
        raise BadCaseError(
            f"{case}: the probabilities could not be written to {output}.npz/.pkl ({_describe(error)}); the "
            "segmentation was written, its probabilities were not (run again with --continue_prediction)"
        ) from None


def preprocess_case(
    predictor: nnUNetPredictor, case: str, image: np.ndarray, properties: dict, preprocessor=None
) -> tuple[np.ndarray, dict]:
    """nnU-Net's preprocessing of an image as read (C, Z, Y, X) -> the preprocessed array and the properties it
    fills in (crop box, shapes); :class:`BadCaseError` if normalisation made it non-finite. May change ``image``."""
    plans, configuration = predictor.plans_manager, predictor.configuration_manager
    preprocessor = preprocessor or configuration.preprocessor_class(verbose=False)
    low, high = float(image.min()), float(image.max())  # preprocessing may work in place
    data, _, properties = preprocessor.run_case_npy(
        image, None, properties, plans, configuration, predictor.dataset_json
    )
    if not np.isfinite(data).all():
        raise BadCaseError(
            f"{case}: not finite after nnU-Net's intensity normalisation (intensities {low:g} to {high:g}); "
            "check the image for extreme values"
        )
    return data, properties


def predict_preprocessed(
    predictor: nnUNetPredictor, case: str, data: np.ndarray, properties: dict, return_probabilities: bool = False
):
    """The predictor's logits of a preprocessed case -> its segmentation in the original grid (and the
    probabilities with ``return_probabilities``), by nnU-Net's export; :class:`BadCaseError` if not finite."""
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
    if not torch.isfinite(logits).all():
        raise BadCaseError(f"{case}: the network's output is not finite; nothing was written")
    label_manager = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits,
        predictor.plans_manager,
        predictor.configuration_manager,
        label_manager,
        properties,
        return_probabilities=return_probabilities,
    )


def predict_cases(
    predictor: nnUNetPredictor,
    cases: dict[str, list[str]],
    output_folder: str,
    save_probabilities: bool = False,
    overwrite: bool = True,
    prepare: Callable[[str, np.ndarray, dict, np.ndarray], None] | None = None,
    output_type: str = "nifti",
    seg_only: bool = False,
    series_uid: str | None = None,
    algorithm: dicom.Algorithm | None = None,
) -> dict[str, str]:
    """Check and predict every case (name -> its channel files, or [DICOM series folder]) into ``output_folder``;
    return name -> error.

    A case that fails (a :class:`BadCaseError` or any other exception) is reported and skipped; the others are
    predicted. ``prepare(case, image, properties, data)``, if given, runs after nnU-Net's preprocessing and before
    the network, with the image as read (C, Z, Y, X), the properties preprocessing returned (crop box, shapes) and
    the preprocessed array; it may raise :class:`BadCaseError` (how the prompted command sets each case's points).
    A DICOM case is written as ``CASE`` + the model's ending (:func:`dicom_output_ending`); with ``output_type``
    ``dicom_seg`` also (``seg_only``: only) as the DICOM Segmentation ``CASE.dcm`` made by ``algorithm``
    (``series_uid`` picks the series in folders holding several).
    """
    plans, configuration = predictor.plans_manager, predictor.configuration_manager
    dataset_json = predictor.dataset_json
    channel_names = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    model_is_3d = len(configuration.patch_size) == 3
    reader = plans.image_reader_writer_class()
    preprocessor = configuration.preprocessor_class(verbose=False)
    os.makedirs(output_folder, exist_ok=True)
    for path in remove_stale_partial_files(output_folder):
        print(f"removed {path.name}, a partial file left by a killed run", file=sys.stderr)
    for name, content in (("dataset.json", dataset_json), ("plans.json", plans.plans)):
        write_text_file(os.path.join(output_folder, name), json.dumps(content, indent=4))
    want_seg = output_type == "dicom_seg"
    algorithm = algorithm or dicom.Algorithm(getattr(predictor, "trainer_name", None) or "")
    failures: dict[str, str] = {}
    for case, files in sorted(cases.items()):
        output = os.path.join(output_folder, case)
        from_dicom = is_dicom_case(files)
        ending = dicom_output_ending(dataset_json["file_ending"]) if from_dicom else dataset_json["file_ending"]
        expected = (
            ([output + dicom.SEG_ENDING] if want_seg else [])
            + ([] if seg_only else [output + ending])
            + ([output + ".npz", output + ".pkl"] if save_probabilities else [])
        )
        if not overwrite and all(os.path.isfile(f) for f in expected):  # as nnU-Net: probabilities asked, .npz there
            continue
        try:
            series, writer = None, reader
            if from_dicom:
                series, image, properties = read_dicom_case(
                    case, files[0], channel_names, model_is_3d, series_uid, for_seg=want_seg
                )
                writer = SimpleITKIO()
            elif want_seg:
                raise BadCaseError(f"{case}: a DICOM SEG needs a DICOM series as input (source instances to reference)")
            else:
                check_channel_numbers(case, files, dataset_json["file_ending"], channel_names)
                image, properties = read_and_check(case, files, reader, channel_names, model_is_3d)
            check_resampled_size(case, image, properties, configuration.spacing)
            data, properties = preprocess_case(predictor, case, image, properties, preprocessor)
            if prepare is not None:
                prepare(case, image, properties, data)
            result = predict_preprocessed(predictor, case, data, properties, save_probabilities)
            segmentation = result[0] if save_probabilities else result
            if want_seg:
                labels = output_labels(dataset_json)
                write_seg_checked(case, series, segmentation, labels, output + dicom.SEG_ENDING, algorithm)
            if not seg_only:
                try:
                    write_checked(case, segmentation, writer, output + ending, properties)
                except BadCaseError:
                    if want_seg:  # the case's outputs come together or not at all
                        os.unlink(output + dicom.SEG_ENDING)
                    raise
            if save_probabilities:  # after the segmentation: a case that failed leaves no .npz/.pkl
                save_probabilities_checked(case, output, result[1], properties)
        except Exception as error:  # one bad case must not stop the others
            message = str(error) if isinstance(error, BadCaseError) else f"{case}: {type(error).__name__}: {error}"
            failures[case] = message
            print(f"FAILED {message}", file=sys.stderr)
        else:
            print(f"done {case}")
    return failures

"""NIH Pancreas-CT (TCIA) -> nnU-Net raw dataset: DICOM image series + NIfTI labels.

Assumed input layout (the TCIA download as written by the NBIA Data Retriever, and the separate label zip):

- ``--images``: ``Pancreas-CT/PANCREAS_XXXX/<study folder>/<series folder>/1-NNN.dcm``, one CT series per patient
  (the series may sit at any depth below ``PANCREAS_XXXX``; a patient folder with several series is refused);
- ``--labels``: ``TCIA_pancreas_labels-02-05-2017/labelXXXX.nii.gz``, the same 4-digit number as the patient
  folder, values 0 (background) and 1 (pancreas).

TCIA lists 82 patient numbers of which 0025 and 0070 were withdrawn (duplicates), so 80 cases are expected in
a full download; the converter takes whatever patients have both a series and a label and refuses a patient
with only one of them. Images are read with SimpleITK's ``ImageSeriesReader`` (slices ordered by position) and
written as NIfTI; the label must match the series' geometry within the tolerance, and is then written with the
image's exact geometry so nnU-Net sees identical headers. Label files converted by other tools often describe
the same voxels with flipped or swapped axes (e.g. rows flipped); such labels are refused unless
``--align-labels`` is given, which resamples them onto the series' grid only when every label voxel centre falls
on an image voxel centre (a pure reordering of voxels, checked; anything else stays an error).

Split: no official split exists; NIH Pancreas-CT papers mostly report 4-fold cross-validation by patient
(Roth et al. 2016). ``splits_final.json`` holds nnU-Net's cross-validation over all cases with ``--folds`` folds
(default 4, seed 12345); all cases are in ``imagesTr``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import SimpleITK as sitk
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_sam.dataset_conversion.common import (
    DEFAULT_TOLERANCE,
    NIFTI,
    ConversionError,
    align_to_image,
    check_files,
    check_geometry,
    check_label_values,
    finish_dataset,
    label_values,
    nifti_cases,
    pair_cases,
    require_folder,
    run_conversion,
    staged_dataset,
    write_dataset_json,
)

COMMAND = "nnunet_sam_convert_nih_pancreas"

PATIENT = re.compile(r"PANCREAS_(\d{4})$")
LABELS = {"background": 0, "pancreas": 1}


def find_series(patient_dir: Path) -> list[str]:
    """File names of the single DICOM series below ``patient_dir``, in slice order."""
    found = []
    for folder in sorted({p.parent for p in patient_dir.rglob("*") if p.is_file()}):
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            found.append(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id))
    if not found:
        files = [p for p in patient_dir.rglob("*") if p.is_file()]
        raise ConversionError(
            f"no readable DICOM series below {patient_dir}: {len(files)} file(s) there, none of them a DICOM image "
            f"that can be read (e.g. {files[0].relative_to(patient_dir) if files else 'no file at all'}); the "
            "download is damaged or incomplete. Download this patient again"
        )
    if len(found) != 1:
        raise ConversionError(f"expected one DICOM series below {patient_dir}, found {len(found)}")
    return list(found[0])


def read_series(files: list[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def convert_nih_pancreas(
    images: str | Path,
    labels: str | Path,
    dataset_id: int = 82,
    name: str = "NIHPancreas",
    folds: int = 4,
    tolerance: float = DEFAULT_TOLERANCE,
    align_labels: bool = False,
) -> Path:
    images, labels = Path(images), Path(labels)
    patients = {}
    for p in sorted(require_folder(images, "Pancreas-CT image folder").iterdir()):
        match = PATIENT.match(p.name)
        if match and p.is_dir():
            patients[match.group(1)] = p
    label_files = nifti_cases(require_folder(labels, "NIfTI label folder"), prefix="label")
    ids = pair_cases(patients, label_files)
    series = {}
    for case in ids:  # each patient's series is checked first: a damaged one is named, not counted as too few
        series[case] = find_series(patients[case])
        reader = sitk.ImageFileReader()
        reader.SetFileName(series[case][0])
        reader.ReadImageInformation()
        check_files(case, label=label_files[case])
        label = sitk.ReadImage(str(label_files[case]))
        check_label_values(label_values(label), LABELS.values(), case)
        shape = (*reader.GetSize()[:2], len(series[case]))
        if not align_labels and shape != label.GetSize():
            raise ConversionError(
                f"geometry mismatch in case {case}: series of {len(series[case])} slices of "
                f"{reader.GetSize()[:2]} != label size {label.GetSize()}"
            )

    if len(ids) < folds:
        raise ConversionError(f"{len(ids)} cases cannot make {folds} folds")
    to_nnunet = {c: f"nih_{c}" for c in ids}
    with staged_dataset(dataset_id, name) as folder:
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir()
        for case in ids:
            image = read_series(series[case])
            label = sitk.ReadImage(str(label_files[case]))
            if align_labels:
                label = align_to_image(label, image, case, tolerance)
            check_geometry(image, label, case, tolerance)
            label = sitk.Cast(label, sitk.sitkUInt8)
            label.CopyInformation(image)
            sitk.WriteImage(image, str(folder / "imagesTr" / f"{to_nnunet[case]}_0000{NIFTI}"), True)
            sitk.WriteImage(label, str(folder / "labelsTr" / f"{to_nnunet[case]}{NIFTI}"), True)
        cases = sorted(to_nnunet.values())
        write_dataset_json(
            folder,
            dataset_id,
            name,
            {0: "CT"},
            dict(LABELS),
            len(cases),
            reference="https://doi.org/10.7937/K9/TCIA.2016.tNB1kqBU",
        )
        return finish_dataset(
            folder,
            dataset_id,
            name,
            generate_crossval_split(cases, seed=12345, n_splits=folds),
            protocol=f"nih-pancreas-{folds}fold",
            source=images,
            label_map={0: 0, 1: 1},
            cases={
                to_nnunet[c]: {
                    "original_id": c,
                    "image": str(patients[c].relative_to(images)),
                    "label": label_files[c].name,
                    "submission_name": f"label{c}{NIFTI}",
                }
                for c in ids
            },
            splits={"train": cases, "val": [], "test": []},
            labels_source=str(labels.resolve()),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert NIH Pancreas-CT (TCIA DICOM series in PANCREAS_XXXX/ folders, labels labelXXXX.nii.gz) "
        "to an nnU-Net raw dataset; splits_final.json: cross-validation by patient (default 4 folds)."
    )
    parser.add_argument("-i", "--images", required=True, help="folder holding the PANCREAS_XXXX patient folders")
    parser.add_argument("-l", "--labels", required=True, help="folder holding labelXXXX.nii.gz")
    parser.add_argument("-d", "--dataset-id", type=int, default=82, help="nnU-Net dataset id (default 82)")
    parser.add_argument("--name", default="NIHPancreas", help="dataset name (default NIHPancreas)")
    parser.add_argument("--folds", type=int, default=4, help="cross-validation folds (default 4)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="image/label geometry tolerance")
    parser.add_argument(
        "--align-labels",
        action="store_true",
        help="resample labels whose header describes the series' voxels with flipped/swapped axes onto the series "
        "grid (only when every label voxel lands on an image voxel centre)",
    )
    args = parser.parse_args(argv)
    return run_conversion(
        COMMAND,
        lambda: convert_nih_pancreas(
            args.images, args.labels, args.dataset_id, args.name, args.folds, args.tolerance, args.align_labels
        ),
    )


if __name__ == "__main__":
    sys.exit(main())

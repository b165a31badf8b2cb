"""AbdomenCT-1K -> nnU-Net raw dataset of test cases (external validation, e.g. PanSAM's zero-shot protocol).

Assumed input layout (the public download): ``-i`` one or more image folders holding ``Case_XXXXX_0000.nii.gz``
(the download comes in several parts; ``Case_XXXXX.nii.gz`` is accepted too) and ``-l`` the mask folder holding
``Case_XXXXX.nii.gz`` with the values 0 background, 1 liver, 2 kidney, 3 spleen, 4 pancreas. An image without a
mask (the unlabelled parts) is skipped only with ``--skip-unlabelled``; a mask without an image is an error.

Every case goes to ``imagesTs``/``labelsTs`` (a zero-shot dataset trains nothing), labels keep their values, and
``dataset.json`` names them, so ``nnunet_sam_evaluate_pansam --data abdomen1k DATASET/imagesTs DATASET/labelsTs``
scores a pancreas model against label 4 by name. Images are copied unchanged after checking that mask and image
share their geometry.

Zero-shot protocol: AbdomenCT-1K contains scans of other public datasets, among them NIH Pancreas-CT, on which a
PanSAM model is trained. ``--exclude-like FOLDER ...`` (e.g. the ``imagesTr`` and ``imagesTs`` of the NIH dataset
the model trained on) leaves out every case whose image is the same scan as one of those folders' images, by
content (:func:`image_fingerprint`: voxel values and spacing, in one orientation), since AbdomenCT-1K's case ids do
not name their source. The record lists the excluded cases with the file each matched, and the command prints
their number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_sam.dataset_conversion.common import (
    DEFAULT_TOLERANCE,
    NIFTI,
    RECORD_FILE,
    ConversionError,
    check_case,
    dataset_folder_name,
    nifti_cases,
    pair_cases,
    require_folder,
    run_conversion,
    same_name_cases,
    staged_dataset,
    write_dataset_json,
    write_record,
)

COMMAND = "nnunet_sam_convert_abdomenct1k"

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}


def _images(folders: Sequence[Path]) -> dict[str, Path]:
    """Case id (``Case_XXXXX``) -> image file over all image folders; a case found twice is an error."""
    found: dict[str, Path] = {}
    for folder in folders:
        for name, path in nifti_cases(require_folder(folder, "AbdomenCT-1K image folder")).items():
            case = name[: -len("_0000")] if name.endswith("_0000") else name
            if case in found:
                raise ConversionError(f"case {case} found twice: {found[case]} and {path}")
            found[case] = path
    return found


def image_fingerprint(path: Path) -> str:
    """SHA-256 of a scan's voxel values (int32, in LPS orientation) with its size and spacing (0.01 mm): the same
    scan converted twice, to another orientation or file type, gets the same fingerprint."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    digest = hashlib.sha256()
    digest.update(repr((image.GetSize(), tuple(round(s, 2) for s in image.GetSpacing()))).encode())
    digest.update(sitk.GetArrayViewFromImage(sitk.Cast(image, sitk.sitkInt32)).tobytes())
    return digest.hexdigest()


def scans_also_in(cases: dict[str, Path], folders: Sequence[Path]) -> dict[str, str]:
    """{case: the matching file} for every case whose image is, by :func:`image_fingerprint`, a scan of ``folders``."""
    known: dict[str, str] = {}
    for folder in folders:
        for path in sorted(require_folder(folder, "folder of images to exclude").iterdir()):
            if path.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")) and not path.name.startswith("."):
                known.setdefault(image_fingerprint(path), str(path))
    matches = {}
    for case, path in cases.items():
        found = known.get(image_fingerprint(path))
        if found is not None:
            matches[case] = found
    return matches


def convert_abdomenct1k(
    images: Sequence[str | Path],
    labels: str | Path,
    dataset_id: int = 511,
    name: str = "AbdomenCT1K",
    skip_unlabelled: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    exclude_like: Sequence[str | Path] = (),
) -> Path:
    """Convert the download into a test-only dataset; cases whose image is a scan of ``exclude_like`` are left out."""
    image_files = _images([Path(f) for f in images])
    label_files = nifti_cases(require_folder(Path(labels), "AbdomenCT-1K mask folder"))
    if skip_unlabelled:
        image_files = {c: p for c, p in image_files.items() if c in label_files}
    cases = pair_cases(image_files, label_files)
    excluded = (
        scans_also_in({c: image_files[c] for c in cases}, [Path(f) for f in exclude_like]) if exclude_like else {}
    )
    cases = [c for c in cases if c not in excluded]
    for case in cases:
        check_case(image_files[case], label_files[case], case, LABELS.values(), tolerance)

    with staged_dataset(dataset_id, name) as folder:
        for sub in ("imagesTr", "imagesTs", "labelsTs"):
            (folder / sub).mkdir()
        for case in cases:
            shutil.copyfile(image_files[case], folder / "imagesTs" / f"{case}_0000{NIFTI}")
            shutil.copyfile(label_files[case], folder / "labelsTs" / f"{case}{NIFTI}")
        write_dataset_json(
            folder,
            dataset_id,
            name,
            {0: "CT"},
            dict(LABELS),
            0,
            reference="https://github.com/JunMa11/AbdomenCT-1K",
            numTest=len(cases),
        )
        write_record(
            folder,
            protocol="abdomenct1k-external-test",
            source=Path(images[0]),
            label_map={v: v for v in LABELS.values()},
            cases=same_name_cases(cases),
            splits={"train": [], "val": [], "test": cases},
            labels_source=str(Path(labels).resolve()),
            excluded=excluded,
        )
    return folder.parent / dataset_folder_name(dataset_id, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert AbdomenCT-1K (Case_XXXXX_0000.nii.gz images, Case_XXXXX.nii.gz masks: 1 liver, "
        "2 kidney, 3 spleen, 4 pancreas) into an nnU-Net raw dataset whose cases are all test cases "
        "(imagesTs/labelsTs) with named labels, for external (zero-shot) evaluation."
    )
    parser.add_argument("-i", "--images", nargs="+", required=True, help="image folder(s) (the download's parts)")
    parser.add_argument("-l", "--labels", required=True, help="mask folder (Case_XXXXX.nii.gz)")
    parser.add_argument("-d", "--dataset-id", type=int, default=511, help="nnU-Net dataset id (default 511)")
    parser.add_argument("--name", default="AbdomenCT1K", help="dataset name (default AbdomenCT1K)")
    parser.add_argument("--skip-unlabelled", action="store_true", help="leave out images that have no mask")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="image/mask geometry tolerance")
    parser.add_argument(
        "--exclude-like",
        nargs="+",
        default=[],
        help="image folder(s) of the training data (e.g. the NIH dataset's imagesTr imagesTs): cases with the same "
        "scan are left out (the zero-shot protocol)",
    )
    args = parser.parse_args(argv)

    def report(out: Path) -> str:
        excluded = json.loads((out / RECORD_FILE).read_text())["excluded"]
        note = f"excluded {len(excluded)} case(s) whose scan is in {', '.join(args.exclude_like)}\n"
        return (note if args.exclude_like else "") + f"wrote {out}"

    return run_conversion(
        COMMAND,
        lambda: convert_abdomenct1k(
            args.images,
            args.labels,
            args.dataset_id,
            args.name,
            args.skip_unlabelled,
            args.tolerance,
            args.exclude_like,
        ),
        report,
    )


if __name__ == "__main__":
    sys.exit(main())

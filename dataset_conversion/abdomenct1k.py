"""AbdomenCT-1K -> nnU-Net raw dataset of test cases (external validation, e.g. PanSAM's zero-shot protocol).

Assumed input layout (the public download): ``-i`` one or more image folders holding ``Case_XXXXX_0000.nii.gz``
(the download comes in several parts; ``Case_XXXXX.nii.gz`` is accepted too) and ``-l`` the mask folder holding
``Case_XXXXX.nii.gz`` with the values 0 background, 1 liver, 2 kidney, 3 spleen, 4 pancreas. An image without a
mask (the unlabelled parts) is skipped only with ``--skip-unlabelled``; a mask without an image is an error.

Every case goes to ``imagesTs``/``labelsTs`` (a zero-shot dataset trains nothing), labels keep their values, and
``dataset.json`` names them, so ``nnunet_sam_evaluate_pansam --data abdomen1k DATASET/imagesTs DATASET/labelsTs``
scores a pancreas model against label 4 by name. Images are copied unchanged after checking that mask and image
share their geometry.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_sam.cli import conventions
from nnunet_sam.dataset_conversion.common import (
    DEFAULT_TOLERANCE,
    NIFTI,
    ConversionError,
    check_case,
    dataset_folder_name,
    nifti_cases,
    pair_cases,
    require_folder,
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


def convert_abdomenct1k(
    images: Sequence[str | Path],
    labels: str | Path,
    dataset_id: int = 511,
    name: str = "AbdomenCT1K",
    skip_unlabelled: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    image_files = _images([Path(f) for f in images])
    label_files = nifti_cases(require_folder(Path(labels), "AbdomenCT-1K mask folder"))
    if skip_unlabelled:
        image_files = {c: p for c, p in image_files.items() if c in label_files}
    cases = pair_cases(image_files, label_files)
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
            {0: "CT"},
            dict(LABELS),
            0,
            dataset_name=dataset_folder_name(dataset_id, name),
            reference="https://github.com/JunMa11/AbdomenCT-1K",
            numTest=len(cases),
        )
        write_record(
            folder,
            protocol="abdomenct1k-external-test",
            source=Path(images[0]),
            label_map={v: v for v in LABELS.values()},
            cases={c: {"original_id": c, "submission_name": f"{c}{NIFTI}"} for c in cases},
            splits={"train": [], "val": [], "test": cases},
            labels_source=str(Path(labels).resolve()),
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
    args = parser.parse_args(argv)
    try:
        out = convert_abdomenct1k(
            args.images, args.labels, args.dataset_id, args.name, args.skip_unlabelled, args.tolerance
        )
    except ConversionError as e:
        return conventions.error(COMMAND, e)
    print(f"wrote {out}")
    return conventions.DONE


if __name__ == "__main__":
    sys.exit(main())

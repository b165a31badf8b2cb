"""AbdomenCT-1K -> nnU-Net raw dataset of test cases (external validation, e.g. PanSAM's zero-shot protocol).

Assumed input layout (the public download): ``-i`` one or more image folders holding ``Case_XXXXX_0000.nii.gz``
(the download comes in several parts; ``Case_XXXXX.nii.gz`` is accepted too) and ``-l`` the mask folder holding
``Case_XXXXX.nii.gz`` with the values 0 background, 1 liver, 2 kidney, 3 spleen, 4 pancreas. An image without a
mask (the unlabelled parts) is skipped only with ``--skip-unlabelled``; a mask without an image is an error.

Every case goes to ``imagesTs``/``labelsTs`` (a zero-shot dataset trains nothing), labels keep their values, and
``dataset.json`` names them, so ``nnunet_sam_evaluate_pansam --data abdomen1k DATASET/imagesTs DATASET/labelsTs``
scores a pancreas model against label 4 by name. Images are copied unchanged after checking that mask and image
share their geometry.

Zero-shot protocol: AbdomenCT-1K contains scans of other public datasets, among them the NIH Pancreas-CT scans a
PanSAM model is trained on (80 cases by AbdomenCT-1K's supplementary Table 1, "NIH-Pancreas Plus"). They are left
out by case id (``Case_XXXXX``): ``--exclude-cases LIST`` takes the ids (a text file, one id per line, or the ids
themselves); each must be a case of the download. AbdomenCT-1K does not publish which of its ids come from which
source (its maintainers keep that hidden on purpose: issues #4, #11 and #21 of JunMa11/AbdomenCT-1K), so no list
ships with this package; ``--exclude-like FOLDER ...`` (e.g. the NIH download's images) finds the ids: the cases whose
scan is one of those folders' images (:func:`scans_also_in`, by content, whatever the file type, orientation or
header spacing). Either way the dataset folder gets ``excluded_cases.txt`` (the ids, reusable as ``--exclude-cases``),
the record names every excluded case with its reason, and the command prints their number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
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
NIH_CASES = 80  # AbdomenCT-1K's supplementary Table 1: "NIH-Pancreas Plus", 80 of NIH's 82 scans


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


def _sorted_size(path: Path) -> tuple[int, ...]:
    """The image's size, axes sorted (read from the header only): unchanged by a reorientation."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(sorted(reader.GetSize()))


def image_fingerprint(path: Path) -> str:
    """SHA-256 of a scan's axis-sorted size and the histogram of its voxel values (as int32): the same scan stored
    in another file type, orientation or axis order, or with other spacing or origin in its header, gets the same
    fingerprint; two different scans practically never share one."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    values = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkInt32)).ravel().astype(np.int64)
    low = int(values.min())
    digest = hashlib.sha256()
    digest.update(repr((tuple(sorted(image.GetSize())), low)).encode())
    digest.update(np.bincount(values - low).tobytes())
    return digest.hexdigest()


IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")


def scans_also_in(cases: dict[str, Path], folders: Sequence[Path]) -> dict[str, str]:
    """{case: the matching file} for every case whose image is, by :func:`image_fingerprint`, a scan of ``folders``
    (only cases with the size of one of those scans are read)."""
    others = [
        path
        for folder in folders
        for path in sorted(require_folder(folder, "folder of images to exclude").iterdir())
        if path.name.endswith(IMAGE_ENDINGS) and not path.name.startswith(".")
    ]
    by_size: dict[tuple[int, ...], list[Path]] = {}
    for path in others:
        by_size.setdefault(_sorted_size(path), []).append(path)
    fingerprints: dict[Path, str] = {}  # each scan of ``folders`` read once, when a case of its size turns up
    matches = {}
    for case, path in cases.items():
        candidates = by_size.get(_sorted_size(path), [])
        if not candidates:
            continue
        for other in candidates:
            if other not in fingerprints:
                fingerprints[other] = image_fingerprint(other)
        fingerprint = image_fingerprint(path)
        found = next((other for other in candidates if fingerprints[other] == fingerprint), None)
        if found is not None:
            matches[case] = str(found)
    return matches


CASE_ID = re.compile(r"^Case_\d{5}$")
EXCLUSIONS_FILE = "excluded_cases.txt"


def read_case_list(items: Sequence[str | Path]) -> dict[str, str]:
    """{case id: where it was listed} from ``items``: text files (one ``Case_XXXXX`` per line; blank lines and ``#``
    comments skipped) or ids. An item that is neither an existing file nor a case id is an error."""
    listed: dict[str, str] = {}
    for item in items:
        path = Path(item)
        if path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                case = line.split("#", 1)[0].strip()
                if not case:
                    continue
                if not CASE_ID.match(case):
                    raise ConversionError(
                        f"{path}, line {number}: '{case}' is not an AbdomenCT-1K case id (Case_XXXXX)"
                    )
                listed.setdefault(case, f"listed in {path}")
        elif CASE_ID.match(str(item)):
            listed.setdefault(str(item), "listed")
        else:
            raise ConversionError(f"--exclude-cases '{item}' is neither a list file nor a case id (Case_XXXXX)")
    return listed


def convert_abdomenct1k(
    images: Sequence[str | Path],
    labels: str | Path,
    dataset_id: int = 511,
    name: str = "AbdomenCT1K",
    skip_unlabelled: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    exclude_like: Sequence[str | Path] = (),
    exclude_cases: Sequence[str | Path] = (),
) -> Path:
    """Convert the download into a test-only dataset without the cases of ``exclude_cases`` (ids or list files, see
    :func:`read_case_list`) and those whose image is a scan of ``exclude_like`` (folders)."""
    image_files = _images([Path(f) for f in images])
    label_files = nifti_cases(require_folder(Path(labels), "AbdomenCT-1K mask folder"))
    excluded = read_case_list(exclude_cases)
    unknown = sorted(set(excluded) - set(image_files) - set(label_files))
    if unknown:
        raise ConversionError(
            f"{len(unknown)} case(s) to exclude are not in the download ({', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}): check the list against the image and mask folders"
        )
    if skip_unlabelled:
        image_files = {c: p for c, p in image_files.items() if c in label_files}
    cases = pair_cases(image_files, label_files)
    if exclude_like:
        found = scans_also_in({c: image_files[c] for c in cases}, [Path(f) for f in exclude_like])
        excluded.update({c: f"same scan as {f}" for c, f in found.items() if c not in excluded})
    excluded = {c: why for c, why in excluded.items() if c in cases}  # a listed case without a mask: not converted
    cases = [c for c in cases if c not in excluded]
    for case in cases:
        check_case(image_files[case], label_files[case], case, LABELS.values(), tolerance)

    with staged_dataset(dataset_id, name) as folder:
        for sub in ("imagesTr", "imagesTs", "labelsTs"):
            (folder / sub).mkdir()
        if exclude_cases or exclude_like:
            text = "".join(f"{case}  # {why}\n" for case, why in sorted(excluded.items()))
            (folder / EXCLUSIONS_FILE).write_text(text, encoding="utf-8")
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
            excluded=dict(sorted(excluded.items())),
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
        "--exclude-cases",
        nargs="+",
        default=[],
        metavar="LIST",
        help="case ids to leave out (the zero-shot protocol: the NIH Pancreas-CT cases), as a text file with one "
        "Case_XXXXX per line (e.g. a previous run's excluded_cases.txt) or as ids",
    )
    parser.add_argument(
        "--exclude-like",
        nargs="+",
        default=[],
        metavar="FOLDER",
        help="image folder(s) of the training data (e.g. the NIH Pancreas-CT images): the ids of cases with the "
        "same scan are found by content and left out (AbdomenCT-1K publishes no list of them)",
    )
    args = parser.parse_args(argv)

    def report(out: Path) -> str:
        excluded = json.loads((out / RECORD_FILE).read_text())["excluded"]
        note = (
            f"excluded {len(excluded)} case(s) (listed in {out / EXCLUSIONS_FILE}); AbdomenCT-1K holds "
            f"{NIH_CASES} NIH Pancreas-CT scans (its supplementary Table 1)\n"
        )
        return (note if args.exclude_like or args.exclude_cases else "") + f"wrote {out}"

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
            args.exclude_cases,
        ),
        report,
    )


if __name__ == "__main__":
    sys.exit(main())

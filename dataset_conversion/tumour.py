"""3DSAM-adapter's tumour protocol -> nnU-Net raw datasets: KiTS21, LiTS17, MSD-Colon, MSD-Pancreas (tumour only).

Each dataset becomes a binary task (0 background, 1 tumour): the tumour label of the download is mapped to 1,
every other label (kidney, cyst, liver, pancreas) to background, as the method segments the tumour only. The split
(``--split``) is by default the paper protocol's: the train / val / test case lists that 3DSAM-adapter's public code
ships (:mod:`~nnunet_sam.dataset_conversion.published_splits`; e.g. KiTS 209 / 30 / 61, pancreas 196 / 28 / 57;
cases no list names, such as 13 LiTS volumes, are left out and named in the record); ``--split random`` shuffles
the labelled cases with ``--seed`` and cuts 70 % train / 10 % val / 20 % test
(:func:`~nnunet_sam.dataset_conversion.common.split_fractions`). Train and val stay in ``imagesTr``/``labelsTr``
and form the one fold of ``splits_final.json``; the test cases go to ``imagesTs``/``labelsTs`` and are listed in
the conversion record (``nnunet_sam_conversion.json``, ``splits.test``) with the original ids.

Download layouts read (``-i``):

* ``kits21``: the ``data/`` folder of the KiTS21 repository after its download script:
  ``case_XXXXX/imaging.nii.gz`` and ``case_XXXXX/aggregated_MAJ_seg.nii.gz`` (1 kidney, 2 tumour, 3 cyst);
* ``lits17``: the LiTS training download: ``volume-N.nii`` and ``segmentation-N.nii`` (1 liver, 2 tumour), in any
  sub-folders (``Training Batch 1``, ``Training Batch 2``);
* ``msd_colon``: MSD ``Task10_Colon`` (``imagesTr``/``labelsTr``, 1 colon cancer);
* ``msd_pancreas``: MSD ``Task07_Pancreas`` (1 pancreas, 2 tumour); ``nnunet_sam_convert_msd_pancreas`` keeps both
  labels on the same split, this keeps the tumour only.

Images are copied byte for byte when they already are ``.nii.gz`` and re-encoded otherwise (LiTS ``.nii``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from nnunet_sam.dataset_conversion.common import (
    DEFAULT_TOLERANCE,
    NIFTI,
    RECORD_FILE,
    ConversionError,
    check_case,
    finish_dataset,
    move_cases_to_test,
    nifti_cases,
    pair_cases,
    relabel,
    require_folder,
    run_conversion,
    split_fractions,
    staged_dataset,
    write_dataset_json,
)
from nnunet_sam.dataset_conversion.published_splits import PUBLISHED_SPLITS

COMMAND = "nnunet_sam_convert_tumour"

FRACTIONS = (0.7, 0.1, 0.2)
Cases = dict[str, tuple[Path, Path]]  # nnU-Net case id -> (image, label) of the download


def _kits21(source: Path) -> Cases:
    cases = {}
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and re.fullmatch(r"case_\d{5}", p.name)):
        image, label = folder / "imaging.nii.gz", folder / "aggregated_MAJ_seg.nii.gz"
        for path, what in ((image, "image"), (label, "label")):
            if not path.is_file():
                raise ConversionError(f"{what} missing: case {folder.name} has no {path.name} in {folder}")
        cases[folder.name] = (image, label)
    return cases


def _lits17(source: Path) -> Cases:
    def numbered(pattern: str) -> dict[str, Path]:
        found = {}
        for path in sorted(source.rglob("*.nii")):
            match = re.fullmatch(pattern, path.name)
            if match and not path.name.startswith("."):
                found[f"lits_{int(match.group(1)):03d}"] = path
        return found

    images, labels = numbered(r"volume-(\d+)\.nii"), numbered(r"segmentation-(\d+)\.nii")
    return {case: (images[case], labels[case]) for case in pair_cases(images, labels)}


def _msd(task: str) -> Callable[[Path], Cases]:
    def find(source: Path) -> Cases:
        if not source.resolve().name.startswith(task):
            raise ConversionError(f"expected the MSD folder {task}_*, got {source}")
        images = nifti_cases(require_folder(source / "imagesTr", f"MSD {task} imagesTr/"))
        labels = nifti_cases(require_folder(source / "labelsTr", f"MSD {task} labelsTr/"))
        return {case: (images[case], labels[case]) for case in pair_cases(images, labels)}

    return find


@dataclass(frozen=True)
class TumourProtocol:
    """One dataset of the protocol: how to find its cases, its label values and which one is the tumour."""

    title: str
    find_cases: Callable[[Path], Cases]
    labels: tuple[int, ...]  # the values a download label may hold
    tumour: int  # the value mapped to 1
    tumour_name: str
    dataset_id: int
    name: str
    reference: str


PROTOCOLS = {
    "kits21": TumourProtocol(
        "KiTS21", _kits21, (0, 1, 2, 3), 2, "kidney tumour", 501, "KiTS21Tumour",
        "https://kits-challenge.org/kits21/",
    ),
    "lits17": TumourProtocol(
        "LiTS17", _lits17, (0, 1, 2), 2, "liver tumour", 502, "LiTS17Tumour",
        "https://competitions.codalab.org/competitions/17094",
    ),
    "msd_colon": TumourProtocol(
        "MSD-Colon", _msd("Task10_Colon"), (0, 1), 1, "colon cancer", 503, "MSDColonTumour",
        "http://medicaldecathlon.com/",
    ),
    "msd_pancreas": TumourProtocol(
        "MSD-Pancreas", _msd("Task07_Pancreas"), (0, 1, 2), 2, "pancreas tumour", 504, "MSDPancreasTumour",
        "http://medicaldecathlon.com/",
    ),
}  # fmt: skip


SPLITS = ("published", "random")


def published_split(protocol: str, cases: Cases) -> tuple[dict[str, list[str]], list[str]]:
    """(3DSAM-adapter's published train / val / test lists for ``protocol``, the download's cases that no list
    names). A listed case missing from the download is an error: the protocol's test set would be incomplete."""
    split = {k: list(v) for k, v in PUBLISHED_SPLITS[protocol].items()}
    listed = {c for ids in split.values() for c in ids}
    missing = sorted(listed - set(cases))
    if missing:
        raise ConversionError(
            f"{len(missing)} case(s) of 3DSAM-adapter's published {protocol} split are not in the download "
            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). Convert the complete download, or use "
            "--split random for a seeded 70/10/20 split of the cases present."
        )
    return split, sorted(set(cases) - listed)


def convert_tumour(
    protocol: str,
    source: str | Path,
    dataset_id: int | None = None,
    seed: int = 12345,
    name: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    split_kind: str = "published",
) -> Path:
    """Convert one download of the tumour protocol (``protocol`` in :data:`PROTOCOLS`); returns the dataset folder.

    ``split_kind``: "published" (the paper protocol: the case lists 3DSAM-adapter's public code ships; cases no list
    names are left out and listed in the record as ``unlisted``) or "random" (a ``seed``-ed 70/10/20 split)."""
    assert split_kind in SPLITS, f"split_kind must be one of {SPLITS}, got {split_kind!r}"
    spec = PROTOCOLS[protocol]
    dataset_id = spec.dataset_id if dataset_id is None else dataset_id
    name = name or spec.name
    source = require_folder(source, f"{spec.title} download")
    cases = spec.find_cases(source)
    if not cases:
        raise ConversionError(f"no {spec.title} cases found in {source}")
    unlisted: list[str] = []
    if split_kind == "published":
        split, unlisted = published_split(protocol, cases)
        cases = {c: paths for c, paths in cases.items() if c not in unlisted}
        how = "3DSAM-adapter's published split (fold 0 of its public code)"
    else:
        split = split_fractions(sorted(cases), FRACTIONS, seed)
        how = f"3DSAM-adapter 70/10/20 random split (seed {seed})"
    for case, (image, label) in cases.items():
        check_case(image, label, case, spec.labels, tolerance)
    with staged_dataset(dataset_id, name) as folder:
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir()
        for case, (image, label) in cases.items():
            target = folder / "imagesTr" / f"{case}_0000{NIFTI}"
            if image.name.endswith(NIFTI):
                shutil.copyfile(image, target)
            else:
                sitk.WriteImage(sitk.ReadImage(str(image)), str(target), True)
            tumour = relabel(sitk.ReadImage(str(label)), {spec.tumour: 1})
            sitk.WriteImage(tumour, str(folder / "labelsTr" / f"{case}{NIFTI}"), True)
        move_cases_to_test(folder, split["test"])
        write_dataset_json(
            folder,
            dataset_id,
            name,
            {0: "CT"},
            {"background": 0, spec.tumour_name: 1},
            len(split["train"]) + len(split["val"]),
            reference=spec.reference,
            description=f"{spec.title}, tumour only, {how}",
            numTest=len(split["test"]),
        )
        return finish_dataset(
            folder,
            dataset_id,
            name,
            protocol=f"{protocol}-tumour-{'published' if split_kind == 'published' else '70-10-20'}",
            source=source,
            label_map={0: 0, 1: spec.tumour},
            cases={
                c: {
                    "original_id": c,
                    "image": str(image.relative_to(source)),
                    "label": str(label.relative_to(source)),
                    "submission_name": f"{c}{NIFTI}",
                }
                for c, (image, label) in cases.items()
            },
            splits=split,
            seed=seed if split_kind == "random" else None,
            unlisted=unlisted,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnunet_sam_convert_tumour",
        description="Convert KiTS21, LiTS17, MSD-Colon or MSD-Pancreas to a tumour-only nnU-Net dataset with "
        "3DSAM-adapter's split (default: the case lists its public code ships; --split random: a seeded 70/10/20 "
        "split). Test cases in imagesTs/labelsTs, train/val as fold 0 of splits_final.json, all three lists in "
        "nnunet_sam_conversion.json.",
    )
    parser.add_argument("protocol", choices=sorted(PROTOCOLS), help="which dataset")
    parser.add_argument(
        "-i",
        "--input",
        required=True,
        help="kits21: KiTS21 data/ (case_XXXXX/); lits17: folder with volume-N.nii, segmentation-N.nii; "
        "msd_colon / msd_pancreas: Task10_Colon / Task07_Pancreas",
    )
    parser.add_argument("-d", "--dataset-id", type=int, help="nnU-Net dataset id (default 501-504 by dataset)")
    parser.add_argument("--name", help="dataset name (default e.g. KiTS21Tumour)")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="published",
        help="published (default, the paper protocol): 3DSAM-adapter's case lists; random: seeded 70/10/20",
    )
    parser.add_argument("--seed", type=int, default=12345, help="seed of --split random (default 12345)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="image/label geometry tolerance")
    args = parser.parse_args(argv)

    def report(out: Path) -> str:
        splits = json.loads((out / RECORD_FILE).read_text())["splits"]
        return f"wrote {out}: " + ", ".join(f"{len(v)} {k}" for k, v in splits.items())

    return run_conversion(
        COMMAND,
        lambda: convert_tumour(
            args.protocol, args.input, args.dataset_id, args.seed, args.name, args.tolerance, args.split
        ),
        report,
    )


if __name__ == "__main__":
    sys.exit(main())

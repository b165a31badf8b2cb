"""Synapse / BTCV multi-organ CT -> nnU-Net raw dataset with the TransUNet 18 train / 12 test protocol.

Input: the BTCV "Abdomen" training download (``RawData/Training``): ``img/imgXXXX.nii.gz`` and
``label/labelXXXX.nii.gz``, 30 cases with ids 0001-0010 and 0021-0040, BTCV label values 0-13.

Output ``DatasetXXX_Synapse``: the 18 training cases in ``imagesTr``/``labelsTr``, the 12 test cases in
``imagesTs``/``labelsTs`` (so that ``-f all`` never sees them), images copied byte for byte, labels mapped to
the 8 Synapse organs (or kept as 13 BTCV labels with ``--all-labels``). ``splits_final.json`` holds
nnU-Net's own 5-fold cross-validation (``generate_crossval_split``, seed 12345) over the 18 training cases;
the papers train on all 18 (``-f all``) and report on the 12 test cases.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import SimpleITK as sitk
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_sam.dataset_conversion.common import (
    DEFAULT_TOLERANCE,
    NIFTI,
    ConversionError,
    check_case,
    finish_dataset,
    move_cases_to_test,
    nifti_cases,
    pair_cases,
    relabel,
    require_folder,
    run_conversion,
    staged_dataset,
    write_dataset_json,
)

COMMAND = "nnunet_sam_convert_synapse"

# Test volumes of the Synapse protocol: TransUNet's published list ``lists/lists_Synapse/test_vol.txt``
# (github.com/Beckschen/TransUNet), followed by Swin-Unet, MISSFormer, nnFormer and the SAM papers we reproduce.
SYNAPSE_TEST_IDS = ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038")

BTCV_LABELS = {
    "background": 0,
    "spleen": 1,
    "right kidney": 2,
    "left kidney": 3,
    "gallbladder": 4,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior vena cava": 9,
    "portal and splenic vein": 10,
    "pancreas": 11,
    "right adrenal gland": 12,
    "left adrenal gland": 13,
}
# TransUNet's 8-organ preprocessing: BTCV value -> Synapse value (all other BTCV labels -> background)
SYNAPSE_FROM_BTCV = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
SYNAPSE_LABELS = {
    "background": 0,
    "spleen": 1,
    "right kidney": 2,
    "left kidney": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "aorta": 7,
    "pancreas": 8,
}


def convert_synapse(
    source: str | Path,
    dataset_id: int = 120,
    all_labels: bool = False,
    name: str = "Synapse",
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    """Convert a BTCV training folder; returns the dataset folder in ``$nnUNet_raw``."""
    source = Path(source)
    images = nifti_cases(require_folder(source / "img", "BTCV image folder img/"), prefix="img")
    labels = nifti_cases(require_folder(source / "label", "BTCV label folder label/"), prefix="label")
    ids = pair_cases(images, labels)
    missing = sorted(set(SYNAPSE_TEST_IDS) - set(ids))
    if missing:
        raise ConversionError(f"Synapse test cases missing from {source}: {missing}")
    for case in ids:
        check_case(images[case], labels[case], case, BTCV_LABELS.values(), tolerance)

    mapping = {v: v for v in BTCV_LABELS.values()} if all_labels else SYNAPSE_FROM_BTCV
    label_names = BTCV_LABELS if all_labels else SYNAPSE_LABELS
    to_nnunet = {c: f"synapse_{c}" for c in ids}
    with staged_dataset(dataset_id, name) as folder:
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir()
        for case in ids:
            shutil.copyfile(images[case], folder / "imagesTr" / f"{to_nnunet[case]}_0000{NIFTI}")
            mapped = relabel(sitk.ReadImage(str(labels[case])), mapping)
            sitk.WriteImage(mapped, str(folder / "labelsTr" / f"{to_nnunet[case]}{NIFTI}"), True)
        test = [to_nnunet[c] for c in SYNAPSE_TEST_IDS]
        train = [to_nnunet[c] for c in ids if c not in SYNAPSE_TEST_IDS]
        move_cases_to_test(folder, test)
        write_dataset_json(
            folder,
            dataset_id,
            name,
            {0: "CT"},
            dict(label_names),
            len(train),
            reference="https://www.synapse.org/#!Synapse:syn3193805",
            description="BTCV abdomen, TransUNet 18/12 split" + (", 13 BTCV labels" if all_labels else ", 8 organs"),
        )
        return finish_dataset(
            folder,
            dataset_id,
            name,
            generate_crossval_split(sorted(train), seed=12345, n_splits=5),
            protocol="synapse-transunet-13labels" if all_labels else "synapse-transunet-8organs",
            source=source,
            label_map={dst: src for src, dst in mapping.items()},
            cases={
                to_nnunet[c]: {
                    "original_id": c,
                    "image": f"img/img{c}{NIFTI}",
                    "label": f"label/label{c}{NIFTI}",
                    "submission_name": f"label{c}{NIFTI}",
                }
                for c in ids
            },
            splits={"train": train, "val": [], "test": test},
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert the BTCV (Synapse) training download (img/imgXXXX.nii.gz, label/labelXXXX.nii.gz) to "
        "an nnU-Net raw dataset with TransUNet's 18 train / 12 test split (test cases in imagesTs/labelsTs; "
        "splits_final.json: nnU-Net's 5-fold CV over the 18 training cases)."
    )
    parser.add_argument("-i", "--input", required=True, help="folder holding img/ and label/ (BTCV RawData/Training)")
    parser.add_argument("-d", "--dataset-id", type=int, default=120, help="nnU-Net dataset id (default 120)")
    parser.add_argument("--name", default="Synapse", help="dataset name (default Synapse)")
    parser.add_argument(
        "--all-labels", action="store_true", help="keep the 13 BTCV labels instead of the 8 Synapse organs"
    )
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="image/label geometry tolerance")
    args = parser.parse_args(argv)
    return run_conversion(
        COMMAND, lambda: convert_synapse(args.input, args.dataset_id, args.all_labels, args.name, args.tolerance)
    )


if __name__ == "__main__":
    sys.exit(main())

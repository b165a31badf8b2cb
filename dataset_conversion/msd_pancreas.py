"""MSD Task07 Pancreas -> nnU-Net raw dataset, through nnU-Net's ``convert_msd_dataset``, with the 70/10/20 split.

Input: the extracted MSD download ``Task07_Pancreas/`` with ``dataset.json``, ``imagesTr/pancreas_XXX.nii.gz``,
``labelsTr/pancreas_XXX.nii.gz`` (0 background, 1 pancreas, 2 cancer) and ``imagesTs/``; macOS ``._*`` files
are skipped as nnU-Net does. The folder name must stay ``TaskNN_Name`` (nnU-Net's converter reads it).

The 281 labelled cases are shuffled with ``--seed`` and cut 70 % train / 10 % val / 20 % test (the
3DSAM-adapter protocol). Train and val stay in ``imagesTr`` as the one fold of ``splits_final.json``; the test
cases move to ``imagesTs``/``labelsTs``. MSD's own test images have no public labels and are not part of the
protocol: they are not written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from nnunetv2.dataset_conversion import convert_MSD_dataset

from nnunet_sam.dataset_conversion.common import (
    DEFAULT_TOLERANCE,
    ConversionError,
    adopt_nnunet_output,
    check_case,
    dataset_folder_name,
    finish_dataset,
    move_cases_to_test,
    nifti_cases,
    pair_cases,
    require_folder,
    run_conversion,
    same_name_cases,
    split_fractions,
    staged_dataset,
)

COMMAND = "nnunet_sam_convert_msd_pancreas"

FRACTIONS = (0.7, 0.1, 0.2)


def convert_msd_pancreas(
    source: str | Path,
    dataset_id: int = 7,
    seed: int = 12345,
    name: str = "Pancreas",
    num_processes: int = 2,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    source = Path(source)
    require_folder(source, "MSD task folder")
    task = source.resolve().name.split("_")
    if len(task) != 2 or not task[0].startswith("Task"):
        raise ConversionError(f"the MSD folder must keep its download name TaskNN_Name, got {source.name}")
    if not (source / "dataset.json").is_file():
        raise ConversionError(f"missing dataset.json in {source}")
    images = nifti_cases(require_folder(source / "imagesTr", "MSD imagesTr/"))
    labels = nifti_cases(require_folder(source / "labelsTr", "MSD labelsTr/"))
    require_folder(source / "imagesTs", "MSD imagesTs/")
    cases = pair_cases(images, labels)
    allowed = [int(v) for v in json.loads((source / "dataset.json").read_text())["labels"]]
    for case in cases:
        check_case(images[case], labels[case], case, allowed, tolerance)
    split = split_fractions(cases, FRACTIONS, seed)

    with staged_dataset(dataset_id, name) as folder:
        convert = convert_MSD_dataset.convert_msd_dataset
        adopt_nnunet_output(convert_MSD_dataset, folder, lambda: convert(str(source), dataset_id, num_processes))
        shutil.rmtree(folder / "imagesTs")  # unlabelled MSD test images: not part of the protocol
        move_cases_to_test(folder, split["test"])
        dataset_json = json.loads((folder / "dataset.json").read_text())
        dataset_json.update(numTraining=len(split["train"]) + len(split["val"]), numTest=len(split["test"]))
        dataset_json["name"] = dataset_folder_name(dataset_id, name)
        (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
        return finish_dataset(
            folder,
            dataset_id,
            name,
            protocol="msd-pancreas-70-10-20",
            source=source,
            label_map={v: v for v in allowed},
            cases=same_name_cases(cases),
            splits=split,
            seed=seed,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert MSD Task07_Pancreas with nnU-Net's MSD converter and split the labelled cases "
        "70/10/20 at random with a fixed seed (test cases in imagesTs/labelsTs, train/val as fold 0)."
    )
    parser.add_argument("-i", "--input", required=True, help="the extracted Task07_Pancreas folder")
    parser.add_argument("-d", "--dataset-id", type=int, default=7, help="nnU-Net dataset id (default 7)")
    parser.add_argument("--name", default="Pancreas", help="dataset name (default Pancreas)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the random split (default 12345)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="processes for nnU-Net's converter")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="image/label geometry tolerance")
    args = parser.parse_args(argv)
    return run_conversion(
        COMMAND,
        lambda: convert_msd_pancreas(
            args.input, args.dataset_id, args.seed, args.name, args.num_processes, args.tolerance
        ),
    )


if __name__ == "__main__":
    sys.exit(main())

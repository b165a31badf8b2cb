"""AMOS22 -> nnU-Net raw dataset, through nnU-Net's ``Dataset218`` (task 1, CT) / ``Dataset219`` (task 2, CT+MR).

Input: the extracted AMOS22 release (zenodo.org/record/7262581, folder ``amos22/``): ``dataset.json`` listing
``training`` / ``validation`` / ``test`` entries (``{"image": "./imagesTr/amos_0001.nii.gz", ...}``) and the
folders ``imagesTr``, ``labelsTr``, ``imagesVa``, ``labelsVa``, ``imagesTs``. Labels 0-15 (see dataset.json).
Task 1 keeps the CT cases only (nnU-Net's converter filters by case number).

nnU-Net's converters put the official training and validation cases together in ``imagesTr``; the split file
written here separates them again: one fold with ``train`` = the official training cases and ``val`` = the
official validation cases. ``imagesTs`` holds the official test images, the cases of the AMOS leaderboard
submission (``nnunet_sam_convert_submission amos``). Case ids and label values are AMOS's own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from nnunet_sam.dataset_conversion.common import (
    DEFAULT_TOLERANCE,
    NIFTI,
    ConversionError,
    adopt_nnunet_output,
    check_case,
    check_files,
    finish_dataset,
    require_folder,
    run_conversion,
    same_name_cases,
    staged_dataset,
)

COMMAND = "nnunet_sam_convert_amos"

NNUNET_CONVERTERS = {
    1: ("nnunetv2.dataset_conversion.Dataset218_Amos2022_task1", "convert_amos_task1"),
    2: ("nnunetv2.dataset_conversion.Dataset219_Amos2022_task2", "convert_amos_task2"),
}


def _listed(entries: list[dict]) -> list[str]:
    return [Path(e["image"]).name[: -len(NIFTI)] for e in entries]


def convert_amos(
    source: str | Path,
    task: int = 1,
    dataset_id: int = 218,
    name: str = "AMOS2022_task1",
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    source = Path(source)
    if task not in NNUNET_CONVERTERS:
        raise ConversionError(f"AMOS task must be 1 (CT) or 2 (CT and MR), got {task}")
    require_folder(source, "AMOS22 folder")
    if not (source / "dataset.json").is_file():
        raise ConversionError(f"missing dataset.json in {source}")
    meta = json.loads((source / "dataset.json").read_text())
    allowed = [int(k) for k in meta["labels"]]
    for images, labels, key in (("imagesTr", "labelsTr", "training"), ("imagesVa", "labelsVa", "validation")):
        require_folder(source / images, f"AMOS {images}/")
        require_folder(source / labels, f"AMOS {labels}/")
        for case in _listed(meta[key]):
            image, label = source / images / f"{case}{NIFTI}", source / labels / f"{case}{NIFTI}"
            if not image.is_file():
                raise ConversionError(f"missing image: {image} is listed in dataset.json")
            if not label.is_file():
                raise ConversionError(f"image without label: {image} has no {labels}/{label.name}")
            check_case(image, label, case, allowed, tolerance)
    for image in sorted(require_folder(source / "imagesTs", "AMOS imagesTs/").glob(f"*{NIFTI}")):
        check_files(image.name[: -len(NIFTI)], image)

    module_name, function = NNUNET_CONVERTERS[task]
    module = importlib.import_module(module_name)
    with staged_dataset(dataset_id, name) as folder:
        adopt_nnunet_output(module, folder, lambda: getattr(module, function)(str(source), dataset_id))
        converted = {f.name[: -len(NIFTI)] for f in (folder / "labelsTr").iterdir()}
        test = sorted(f.name[: -len("_0000" + NIFTI)] for f in (folder / "imagesTs").iterdir())
        split = {
            "train": sorted(set(_listed(meta["training"])) & converted),
            "val": sorted(set(_listed(meta["validation"])) & converted),
            "test": test,
        }
        return finish_dataset(
            folder,
            dataset_id,
            name,
            protocol=f"amos22-task{task}-official-train-val",
            source=source,
            label_map={v: v for v in allowed},
            cases=same_name_cases(sorted(converted) + test),
            splits=split,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert AMOS22 with nnU-Net's Dataset218 (task 1, CT) or Dataset219 (task 2, CT+MR) converter; "
        "splits_final.json holds one fold: official training cases -> train, official validation cases -> val."
    )
    parser.add_argument("-i", "--input", required=True, help="the extracted amos22 folder (dataset.json, imagesTr...)")
    parser.add_argument("--task", type=int, choices=(1, 2), default=1, help="AMOS task: 1 CT, 2 CT+MR (default 1)")
    parser.add_argument("-d", "--dataset-id", type=int, default=None, help="nnU-Net dataset id (default 218 / 219)")
    parser.add_argument("--name", default=None, help="dataset name (default AMOS2022_task<N>)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="image/label geometry tolerance")
    args = parser.parse_args(argv)
    dataset_id = args.dataset_id or 217 + args.task
    return run_conversion(
        COMMAND,
        lambda: convert_amos(
            args.input, args.task, dataset_id, args.name or f"AMOS2022_task{args.task}", args.tolerance
        ),
    )


if __name__ == "__main__":
    sys.exit(main())

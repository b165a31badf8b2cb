"""ACDC cardiac cine MRI -> nnU-Net raw dataset, through nnU-Net's own ``Dataset027_ACDC`` converter.

Input: the ACDC download (``database/``) with ``training/patientXXX/`` (patients 001-100) and
``testing/patientXXX/`` (101-150). Each patient folder holds ``Info.cfg`` (``ED: 1``, ``ES: 12``,
``Group: DCM`` ...), ``patientXXX_4d.nii.gz`` and ``patientXXX_frameYY.nii.gz`` with
``patientXXX_frameYY_gt.nii.gz`` for the ED and ES frames. Labels: 0 background, 1 RV, 2 MYO, 3 LV.

Protocols (``--protocol``):

- ``paper`` (default): the fixed 70 / 10 / 20 patient lists (:data:`PAPER_PATIENTS`) of MaskSAM's public ACDC
  trainer: its 70 training and 10 validation patients, and as test set the 20 training patients it leaves out,
  the patient list of the baselines that MaskSAM's and Self-Prompt-SAM's ACDC tables copy (TransUNet / nnFormer).
- ``random``: a 70 / 10 / 20 split made by patient, stratified by the ``Group`` of ``Info.cfg`` (14 / 2 / 4
  patients of each of the five groups), shuffled with ``--seed``.

In both, both frames of a patient stay together; train and val go to ``imagesTr`` and one fold of
``splits_final.json``, the 20 test patients to ``imagesTs``/``labelsTs``; the challenge's testing patients are not
written.
- ``challenge``: nnU-Net's own conversion unchanged (all 100 training patients in ``imagesTr``, testing
  patients in ``imagesTs``) with nnU-Net's 5-fold split by patient (``create_ACDC_split``); predict
  ``imagesTs`` and write the challenge files with ``nnunet_sam_convert_submission acdc``.

The conversion record keeps, for every case, the patient and whether the frame is ED or ES.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from nnunetv2.dataset_conversion.Dataset027_ACDC import copy_files, create_ACDC_split

from nnunet_sam.dataset_conversion.common import (
    DEFAULT_TOLERANCE,
    NIFTI,
    ConversionError,
    check_case,
    finish_dataset,
    move_cases_to_test,
    require_folder,
    run_conversion,
    staged_dataset,
    write_dataset_json,
)

COMMAND = "nnunet_sam_convert_acdc"

ACDC_LABELS = {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}  # names as in nnU-Net's Dataset027


def _patients(numbers: str) -> list[str]:
    return [f"patient{int(n):03d}" for n in numbers.split()]


# MaskSAM's public ACDC trainer (MaskSAM_ACDC.do_split): train and val patients; test = the rest of 001-100. The test
# patients are those of nnFormer's public ACDC dataset.json ("test", both frames each; checked patient by patient),
# the list the TransUNet-style ACDC tables of MaskSAM and Self-Prompt-SAM copy their baselines from.
_VAL = "089 090 091 093 094 096 097 098 099 100"
_TEST = "002 003 008 009 012 014 017 024 042 048 049 053 055 064 067 079 081 088 092 095"
PAPER_PATIENTS: dict[str, list[str]] = {
    "train": sorted(set(_patients(" ".join(str(n) for n in range(1, 101)))) - set(_patients(_VAL + " " + _TEST))),
    "val": _patients(_VAL),
    "test": _patients(_TEST),
}
PROTOCOLS = ("paper", "random", "challenge")
PAPER_COUNTS = (14, 2, 4)  # train / val / test patients per pathology group (5 groups of 20)


def read_info(patient_dir: Path) -> dict[str, str]:
    info = patient_dir / "Info.cfg"
    if not info.is_file():
        raise ConversionError(f"missing Info.cfg in {patient_dir}")
    pairs = (line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def frame_phases(patient_dir: Path) -> dict[str, str]:
    """``{case id 'patientXXX_frameYY': 'ED' | 'ES'}`` from Info.cfg."""
    info = read_info(patient_dir)
    phases = {}
    for phase in ("ED", "ES"):
        if phase not in info:
            raise ConversionError(f"{patient_dir / 'Info.cfg'} has no {phase} entry")
        phases[f"{patient_dir.name}_frame{int(info[phase]):02d}"] = phase
    return phases


def _check_patients(folder: Path, with_labels: bool, tolerance: float) -> dict[str, dict]:
    cases = {}
    for patient_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for case, phase in frame_phases(patient_dir).items():
            image = patient_dir / f"{case}{NIFTI}"
            if not image.is_file():
                raise ConversionError(f"missing image {image} for the {phase} frame named in Info.cfg")
            if with_labels:
                label = patient_dir / f"{case}_gt{NIFTI}"
                if not label.is_file():
                    raise ConversionError(f"image without label: {image} has no {label.name}")
                check_case(image, label, case, ACDC_LABELS.values(), tolerance)
            cases[case] = {"original_id": case, "patient": patient_dir.name, "phase": phase}
    if not cases:
        raise ConversionError(f"no patient folders in {folder}")
    return cases


def paper_split(patients: dict[str, str], seed: int) -> dict[str, list[str]]:
    """70/10/20 patients: ``patients`` maps patient -> group; 14/2/4 per group after a seeded shuffle."""
    split = {"train": [], "val": [], "test": []}
    rs = np.random.RandomState(seed)
    for group in sorted(set(patients.values())):
        members = [str(p) for p in rs.permutation(sorted(p for p, g in patients.items() if g == group))]
        n = len(members)
        n_train, n_val = round(n * PAPER_COUNTS[0] / 20), round(n * PAPER_COUNTS[1] / 20)
        split["train"] += members[:n_train]
        split["val"] += members[n_train : n_train + n_val]
        split["test"] += members[n_train + n_val :]
    return {k: sorted(v) for k, v in split.items()}


def convert_acdc(
    source: str | Path,
    dataset_id: int = 27,
    protocol: str = "paper",
    seed: int = 12345,
    name: str = "ACDC",
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    source = Path(source)
    training = require_folder(source / "training", "ACDC training folder training/")
    if protocol not in PROTOCOLS:
        raise ConversionError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    testing = require_folder(source / "testing", "ACDC testing folder testing/") if protocol == "challenge" else None
    cases = _check_patients(training, True, tolerance)
    if protocol == "paper":
        present = {r["patient"] for r in cases.values()}
        missing = sorted({p for ids in PAPER_PATIENTS.values() for p in ids} - present)
        if missing:
            raise ConversionError(
                f"{len(missing)} patient(s) of the paper protocol's lists are not in {training} "
                f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). Convert the complete ACDC training "
                "set, or use --protocol random."
            )
    test_cases = _check_patients(testing, False, tolerance) if testing else {}
    for record in {**cases, **test_cases}.values():
        record["submission_name"] = f"{record['patient']}_{record['phase']}{NIFTI}"

    with staged_dataset(dataset_id, name) as folder:
        dirs = {k: folder / k for k in ("imagesTr", "labelsTr", "imagesTs")}
        for d in dirs.values():
            d.mkdir()
        if testing is None:  # copy_files reads both folders; give it an empty testing folder
            with tempfile.TemporaryDirectory() as empty:
                (Path(empty) / "training").symlink_to(training.resolve())
                (Path(empty) / "testing").mkdir()
                copy_files(Path(empty), dirs["imagesTr"], dirs["labelsTr"], dirs["imagesTs"])
        else:
            copy_files(source, dirs["imagesTr"], dirs["labelsTr"], dirs["imagesTs"])
        # nnU-Net's copy_files copies every frame file; only ED/ES frames have labels
        for f in dirs["imagesTr"].iterdir():
            if f.name[: -len("_0000" + NIFTI)] not in cases:
                f.unlink()
        for f in dirs["imagesTs"].iterdir():
            if f.name[: -len("_0000" + NIFTI)] not in test_cases:
                f.unlink()

        if protocol in ("paper", "random"):
            groups = {}
            for patient_dir in sorted(p for p in training.iterdir() if p.is_dir()):
                groups[patient_dir.name] = read_info(patient_dir).get("Group", "unknown")
            by_patient = PAPER_PATIENTS if protocol == "paper" else paper_split(groups, seed)
            split = {k: sorted(c for c, r in cases.items() if r["patient"] in v) for k, v in by_patient.items()}
            move_cases_to_test(folder, split["test"])
            folds = [{"train": split["train"], "val": split["val"]}]
        else:
            split = {"train": sorted(cases), "val": [], "test": sorted(test_cases)}
            folds = create_ACDC_split(str(dirs["labelsTr"]))
        num_training = len(split["train"]) + len(split["val"])
        write_dataset_json(
            folder,
            dataset_id,
            name,
            {0: "cineMRI"},
            dict(ACDC_LABELS),
            num_training,
            reference="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
            description=f"ACDC, protocol {protocol}",
        )
        return finish_dataset(
            folder,
            dataset_id,
            name,
            folds,
            protocol=f"acdc-{protocol}",
            source=source,
            label_map={v: v for v in ACDC_LABELS.values()},
            cases={**cases, **test_cases},
            splits=split,
            seed=seed if protocol == "random" else None,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert the ACDC download (training/, testing/ patient folders) with nnU-Net's Dataset027 "
        "converter. --protocol paper: the fixed 70/10/20 patient lists of MaskSAM's public ACDC code and the "
        "baselines' test patients; --protocol random: 70/10/20 patients stratified by pathology group, seeded; test "
        "patients in imagesTs/labelsTs. --protocol challenge: nnU-Net's conversion and 5-fold split, "
        "testing patients in imagesTs for the challenge submission."
    )
    parser.add_argument("-i", "--input", required=True, help="ACDC folder holding training/ (and testing/)")
    parser.add_argument("-d", "--dataset-id", type=int, default=27, help="nnU-Net dataset id (default 27)")
    parser.add_argument("--name", default="ACDC", help="dataset name (default ACDC)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="paper")
    parser.add_argument("--seed", type=int, default=12345, help="seed of --protocol random (default 12345)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="image/label geometry tolerance")
    args = parser.parse_args(argv)
    return run_conversion(
        COMMAND, lambda: convert_acdc(args.input, args.dataset_id, args.protocol, args.seed, args.name, args.tolerance)
    )


if __name__ == "__main__":
    sys.exit(main())

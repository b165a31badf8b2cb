"""Test helpers: tiny synthetic copies of the real dataset downloads, laid out file for file like the originals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SIZE = (16, 16, 8)  # x, y, z
SPACING = (0.8, 0.7, 2.5)
ORIGIN = (-12.5, 30.25, 100.0)
# a proper rotation (not the identity), so that direction mix-ups show
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
BTCV_IDS = tuple(f"{i:04d}" for i in (*range(1, 11), *range(21, 41)))  # the 30 BTCV training volumes


def volume(seed: int, values: int | None = None, size=SIZE, dtype=np.int16) -> sitk.Image:
    """Random image (``values=None``) or label with blobs of values 1..values, in the test geometry."""
    rs = np.random.RandomState(seed)
    shape = size[::-1]
    if values is None:
        arr = rs.randint(-200, 300, size=shape).astype(dtype)
    else:
        arr = np.zeros(shape, dtype=np.uint8)
        for v in range(1, values + 1):  # one small box per value, all values present
            z, y, x = rs.randint(0, shape[0] - 1), rs.randint(0, shape[1] - 2), rs.randint(0, shape[2] - 2)
            arr[z : z + 2, y : y + 3, x : x + 3] = v
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img


def write(img: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path


def make_btcv(root: Path, ids=BTCV_IDS) -> Path:
    """BTCV ``RawData/Training``: img/imgXXXX.nii.gz, label/labelXXXX.nii.gz with labels 0-13."""
    for n, case in enumerate(ids):
        write(volume(n), root / "img" / f"img{case}.nii.gz")
        write(volume(100 + n, values=13), root / "label" / f"label{case}.nii.gz")
    return root


ACDC_GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


def make_acdc(root: Path, per_group: int = 10, test_patients: int = 2) -> Path:
    """ACDC ``database/``: training/patientXXX (groups of ``per_group`` patients), testing/patientXXX."""

    def patient(folder: Path, number: int, group: str, n: int) -> None:
        name = f"patient{number:03d}"
        ed, es = 1, 5 + number % 7
        d = folder / name
        d.mkdir(parents=True)
        (d / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: 170.0\nNbFrame: 14\nWeight: 70.0\n")
        four_d = sitk.JoinSeries([volume(n)] * 2)
        sitk.WriteImage(four_d, str(d / f"{name}_4d.nii.gz"), True)
        for k, frame in enumerate((ed, es)):
            write(volume(n + k), d / f"{name}_frame{frame:02d}.nii.gz")
            write(volume(500 + n + k, values=3), d / f"{name}_frame{frame:02d}_gt.nii.gz")

    number = 1
    for group in ACDC_GROUPS:
        for _ in range(per_group):
            patient(root / "training", number, group, number)
            number += 1
    for t in range(test_patients):
        patient(root / "testing", 101 + t, "unknown", 101 + t)
    return root


def make_msd_pancreas(root: Path, n: int = 20, n_test: int = 2) -> Path:
    """MSD ``Task07_Pancreas``: dataset.json, imagesTr/labelsTr/imagesTs and the macOS ``._`` files of the tar."""
    task = root / "Task07_Pancreas"
    cases = [f"pancreas_{i:03d}" for i in range(1, 2 * n, 2)]
    tests = [f"pancreas_{i:03d}" for i in range(2, 2 * n_test + 1, 2)]
    for k, case in enumerate(cases):
        write(volume(k), task / "imagesTr" / f"{case}.nii.gz")
        write(volume(300 + k, values=2), task / "labelsTr" / f"{case}.nii.gz")
        (task / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    for k, case in enumerate(tests):
        write(volume(900 + k), task / "imagesTs" / f"{case}.nii.gz")
    meta = {
        "name": "Pancreas",
        "description": "Pancreas and cancer segmentation",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": len(cases),
        "numTest": len(tests),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [f"./imagesTs/{c}.nii.gz" for c in tests],
    }
    (task / "dataset.json").write_text(json.dumps(meta, indent=4))
    return task


AMOS_LABELS = [
    "background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach", "arota",
    "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder", "prostate/uterus",
]  # fmt: skip
AMOS_SPLIT = {  # CT ids <= 500, MR ids > 500 (task 1 keeps CT only)
    "training": ["amos_0001", "amos_0004", "amos_0005", "amos_0540"],
    "validation": ["amos_0008", "amos_0013", "amos_0580"],
    "test": ["amos_0002", "amos_0003", "amos_0510"],
}


def make_amos(root: Path) -> Path:
    """AMOS22 release ``amos22/``: dataset.json with training/validation/test lists and the five folders."""
    folders = {"training": ("imagesTr", "labelsTr"), "validation": ("imagesVa", "labelsVa"), "test": ("imagesTs", None)}
    meta = {
        "name": "AMOS",
        "description": "MICCAI2022 Multi-Modality Abdominal Multi-Organ Segmentation Challenge",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0 01/05/2022",
        "modality": {"0": "CT"},
        "labels": {str(i): name for i, name in enumerate(AMOS_LABELS)},
    }
    for key, (images, labels) in folders.items():
        meta[key] = []
        for case in AMOS_SPLIT[key]:
            n = int(case[-4:])
            write(volume(n), root / images / f"{case}.nii.gz")
            entry = {"image": f"./{images}/{case}.nii.gz"}
            if labels:
                write(volume(1000 + n, values=15), root / labels / f"{case}.nii.gz")
                entry["label"] = f"./{labels}/{case}.nii.gz"
            meta[key].append(entry)
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


def write_dicom_series(img: sitk.Image, folder: Path, series_uid: str) -> None:
    """One DICOM file per slice (``1-001.dcm`` ...) with the position/orientation tags a CT scanner writes."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = img.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[0:7:3], *direction[1:8:3]))
    for z in range(img.GetDepth()):
        s = sitk.Cast(img[:, :, z], sitk.sitkInt16)
        tags = {
            "0008|0060": "CT",
            "0010|0020": folder.parts[-3],
            "0020|000d": series_uid + ".1",
            "0020|000e": series_uid,
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0013": str(z + 1),
            "0028|0030": f"{img.GetSpacing()[1]:.6f}\\{img.GetSpacing()[0]:.6f}",
            "0018|0050": f"{img.GetSpacing()[2]:.6f}",
            "0008|0018": f"{series_uid}.{z + 1}",
        }
        for k, v in tags.items():
            s.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"1-{z + 1:03d}.dcm"))
        writer.Execute(s)


def make_nih_pancreas(root: Path, numbers=(1, 2, 3, 4, 5)) -> tuple[Path, Path]:
    """TCIA ``Pancreas-CT/PANCREAS_XXXX/<study>/<series>/1-NNN.dcm`` and ``labels/labelXXXX.nii.gz``."""
    images, labels = root / "Pancreas-CT", root / "TCIA_pancreas_labels-02-05-2017"
    for n in numbers:
        img = volume(n)
        study = f"11-24-2015-PANCREAS{n:04d}-Pancreas-{18000 + n}"
        write_dicom_series(img, images / f"PANCREAS_{n:04d}" / study / f"Pancreas-{99000 + n}", f"1.2.826.0.1.{n}")
        write(volume(700 + n, values=1), labels / f"label{n:04d}.nii.gz")
    return images, labels


def assert_unusable(capsys, code: int, pattern: str) -> None:
    """A converter command refused its input: exit code 2 and ``pattern`` in its ``COMMAND: error:`` line."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(r"nnunet_sam_convert_\w+: error: " + pattern, err), err

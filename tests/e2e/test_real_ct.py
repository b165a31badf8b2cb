"""Real-data geometry check: a real CT with real organ labels through the AMOS22 converter -> nnU-Net planning and
preprocessing (with ``--verify_dataset_integrity``) -> one tiny MaskSAM training epoch -> ``nnUNetv2_predict`` ->
AMOS leaderboard writer. The written files must carry exactly the spacing, origin and direction of the test
images, and the labels nnU-Net predicted, voxel for voxel.

The CT (``example_ct_sm.nii.gz``, 122 x 101 x 30 voxels of 3 mm, direction diag(-1, -1, 1)) and its
TotalSegmentator labels (``example_seg.nii.gz``) come from the ``totalsegmentator`` 2.18.0 sdist's
``tests/reference_files/``, fetched with ``pip download`` (the test skips when that fails). Sub-volumes of the CT
(cropped with SimpleITK, so each has its own origin) stand in for the AMOS training, validation and test cases;
the test set holds the untouched CT file and one crop. A few minutes on two CPU cores: slow set only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conversion_testing import AMOS_LABELS
from sam_testing import nnunet_env, run_tool

from nnunet_sam.dataset_conversion.common import ConversionError, relabel
from nnunet_sam.dataset_conversion.nih_pancreas import convert_nih_pancreas

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

BIN = Path(sys.executable).parent
DATASET = 218
VERSION = "2.18.0"
# TotalSegmentator v2 "total" task id -> AMOS22 id for the organs both know (others -> background). This
# upper-abdomen CT shows no esophagus, bladder or prostate/uterus (AMOS 5, 14, 15); the right lower lung lobe (14),
# small bowel (18) and colon (20) stand in for them, because MaskSAM's trainer refuses classes that never occur.
# The test is about geometry, not anatomy.
ORGANS = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 7, 7: 10, 8: 11, 9: 12, 19: 13, 52: 8, 63: 9}
STAND_INS = {14: 5, 18: 14, 20: 15}
TOTALSEG_TO_AMOS = ORGANS | STAND_INS
# (x, y, z) start and size of each crop of the 122 x 101 x 30 CT
CROPS = {
    ("training", "amos_0001"): ((0, 0, 0), (80, 80, 30)),
    ("training", "amos_0004"): ((42, 0, 0), (80, 80, 30)),
    ("training", "amos_0005"): ((0, 21, 0), (80, 80, 30)),
    ("training", "amos_0006"): ((42, 21, 2), (80, 80, 28)),
    ("validation", "amos_0008"): ((20, 10, 0), (80, 80, 30)),
    ("test", "amos_0003"): ((30, 15, 3), (72, 64, 24)),
}
TRAINER = """
from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny


class MaskSAMTrainer_tiny_geometry(MaskSAMTrainer_tiny):
    epochs = 1
    iterations_per_epoch = 2
    val_iterations_per_epoch = 1

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        pass  # the test predicts with nnUNetv2_predict; a second sliding-window pass would only cost minutes
"""


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory) -> Path:
    dl = tmp_path_factory.mktemp("sdist")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"totalsegmentator=={VERSION}"]
    result = subprocess.run(cmd + ["-d", str(dl)], capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    archives = list(dl.glob("totalsegmentator-*.tar.gz"))
    if result.returncode != 0 or not archives:
        pytest.skip(f"could not pip download the totalsegmentator {VERSION} sdist (real CT): {result.stderr[-300:]}")
    wanted = {"example_ct_sm.nii.gz", "example_seg.nii.gz", "example_seg_dicom.nii.gz"}
    with tarfile.open(archives[0]) as tar:
        members = [
            m
            for m in tar.getmembers()
            if "/tests/reference_files/" in m.name and (Path(m.name).name in wanted or "/example_ct_dicom/" in m.name)
        ]
        tar.extractall(dl, members=members, filter="data")
    return next(dl.glob("totalsegmentator-*/tests/reference_files"))


def _amos_download(reference_files: Path, root: Path) -> Path:
    """An AMOS22-layout folder cut from the real CT; labels mapped from TotalSegmentator to AMOS ids."""
    ct = sitk.ReadImage(str(reference_files / "example_ct_sm.nii.gz"))
    seg = relabel(sitk.ReadImage(str(reference_files / "example_seg.nii.gz")), TOTALSEG_TO_AMOS)
    folders = {"training": ("imagesTr", "labelsTr"), "validation": ("imagesVa", "labelsVa"), "test": ("imagesTs", "")}
    for sub in ("imagesTr", "labelsTr", "imagesVa", "labelsVa", "imagesTs"):
        (root / sub).mkdir(parents=True)
    meta = {"labels": {str(i): n for i, n in enumerate(AMOS_LABELS)}, "training": [], "validation": [], "test": []}
    for (key, case), (start, size) in CROPS.items():
        box = tuple(slice(s, s + n) for s, n in zip(start, size))
        images, labels = folders[key]
        sitk.WriteImage(ct[box], str(root / images / f"{case}.nii.gz"), True)
        if labels:
            sitk.WriteImage(seg[box], str(root / labels / f"{case}.nii.gz"), True)
        meta[key].append({"image": f"./{images}/{case}.nii.gz"})
    (root / "imagesTs" / "amos_0002.nii.gz").write_bytes((reference_files / "example_ct_sm.nii.gz").read_bytes())
    meta["test"].append({"image": "./imagesTs/amos_0002.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_real_ct_geometry_survives_the_pipeline(reference_files, tmp_path):
    env = nnunet_env(tmp_path, OMP_NUM_THREADS="1")
    (tmp_path / "user_trainers").mkdir()
    (tmp_path / "user_trainers" / "geometry_trainer.py").write_text(TRAINER)
    source = _amos_download(reference_files, tmp_path / "amos22")

    run_tool([str(BIN / "nnunet_sam_convert_amos"), "-i", str(source), "--task", "1"], env)
    run_tool(
        [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "3d_fullres", "-np", "1"]
        + ["--verify_dataset_integrity"],
        env,
    )
    splits = tmp_path / "preprocessed" / "Dataset218_AMOS2022_task1" / "splits_final.json"
    assert splits.read_text().count("amos_0008") == 1  # our split survived nnU-Net's preprocessing
    trainer = "MaskSAMTrainer_tiny_geometry"
    run_tool([str(BIN / "nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    raw = tmp_path / "raw" / "Dataset218_AMOS2022_task1"
    pred = tmp_path / "pred"
    run_tool(
        [str(BIN / "nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DATASET)]
        + ["-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"]
        + ["--disable_tta", "-step_size", "1"],
        env,
    )
    out = tmp_path / "results_upload"
    run_tool(
        [str(BIN / "nnunet_sam_convert_submission"), "amos", "-p", str(pred), "-r", str(raw), "-o", str(out), "--zip"],
        env,
    )

    assert sorted(f.name for f in out.iterdir()) == ["amos_0002.nii.gz", "amos_0003.nii.gz"]
    for case in ("amos_0002", "amos_0003"):
        original = sitk.ReadImage(str(source / "imagesTs" / f"{case}.nii.gz"))
        written = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert written.GetSize() == original.GetSize()
        assert written.GetSpacing() == original.GetSpacing()
        assert written.GetOrigin() == original.GetOrigin()
        assert written.GetDirection() == original.GetDirection()
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{case}.nii.gz")))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), predicted)
    full = sitk.ReadImage(str(reference_files / "example_ct_sm.nii.gz"))
    assert sitk.ReadImage(str(out / "amos_0002.nii.gz")).GetDirection() == full.GetDirection() == (
        -1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0,
    )  # fmt: skip
    assert (tmp_path / "results_upload.zip").is_file()


def test_real_dicom_series_with_flipped_nifti_label(reference_files, tmp_path, monkeypatch):
    """The NIH converter on a real CT DICOM series (512 x 512 x 20) and its NIfTI labels, whose header describes the
    series' voxels with the rows flipped (as written by dcm2niix-style tools): refused by default, reordered
    exactly with --align-labels; the written image keeps the series' geometry."""
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    images, labels = tmp_path / "Pancreas-CT", tmp_path / "labels"
    labels.mkdir()
    seg = sitk.ReadImage(str(reference_files / "example_seg_dicom.nii.gz"))
    pancreas = relabel(seg, {7: 1})  # TotalSegmentator's pancreas -> NIH's label 1
    for n in (1, 2):
        series = images / f"PANCREAS_{n:04d}" / "11-24-2015-PANCREAS-1" / "Pancreas-1"
        series.mkdir(parents=True)
        for f in (reference_files / "example_ct_dicom").iterdir():
            (series / f.name).write_bytes(f.read_bytes())
        sitk.WriteImage(pancreas, str(labels / f"label{n:04d}.nii.gz"), True)

    with pytest.raises(ConversionError, match="geometry mismatch in case 0001: image origin"):
        convert_nih_pancreas(images, labels, dataset_id=82, folds=2)
    assert not (tmp_path / "raw" / "Dataset082_NIHPancreas").exists()

    out = convert_nih_pancreas(images, labels, dataset_id=82, folds=2, align_labels=True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(
        reader.GetGDCMSeriesFileNames(str(images / "PANCREAS_0001" / "11-24-2015-PANCREAS-1" / "Pancreas-1"))
    )
    series_img = reader.Execute()
    written = sitk.ReadImage(str(out / "imagesTr" / "nih_0001_0000.nii.gz"))
    assert written.GetSize() == series_img.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(written.GetSpacing(), series_img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), series_img.GetOrigin(), atol=1e-4)
    assert written.GetDirection() == series_img.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(series_img))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "nih_0001.nii.gz")))
    np.testing.assert_array_equal(label, sitk.GetArrayFromImage(pancreas)[:, ::-1, :])  # rows reordered, not resampled
    assert label.sum() == (sitk.GetArrayFromImage(seg) == 7).sum() > 0

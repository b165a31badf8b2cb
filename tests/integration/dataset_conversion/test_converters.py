"""Dataset converters on tiny synthetic copies of the real downloads: layout, labels, splits, records, bad input.

nnU-Net's ``verify_dataset_integrity`` runs on every converted dataset. It (and nnU-Net's MSD converter) use a
``spawn`` pool, which re-imports torch in each worker (~15 s per call here); the tests switch the pool to
``fork`` so the same nnU-Net checks run in a fraction of that time.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conversion_testing import (
    AMOS_SPLIT,
    BTCV_IDS,
    DIRECTION,
    ORIGIN,
    SIZE,
    SPACING,
    assert_unusable,
    make_acdc,
    make_amos,
    make_btcv,
    make_msd_pancreas,
    make_nih_pancreas,
    volume,
    write,
)
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_sam.dataset_conversion.acdc import convert_acdc, paper_split
from nnunet_sam.dataset_conversion.amos import convert_amos
from nnunet_sam.dataset_conversion.common import RECORD_FILE, ConversionError, split_fractions
from nnunet_sam.dataset_conversion.msd_pancreas import convert_msd_pancreas
from nnunet_sam.dataset_conversion.nih_pancreas import convert_nih_pancreas
from nnunet_sam.dataset_conversion.synapse import SYNAPSE_TEST_IDS, convert_synapse


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch) -> Path:
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    fork = multiprocessing.get_context("fork")
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: fork)
    return tmp_path


def _splits(root: Path, dataset: str) -> list[dict]:
    return json.loads((root / "preprocessed" / dataset / "splits_final.json").read_text())


def _cases(folder: Path, channel: bool = False) -> list[str]:
    cut = len("_0000.nii.gz") if channel else len(".nii.gz")
    return sorted(f.name[:-cut] for f in folder.glob("*.nii.gz"))


def _leftovers(root: Path) -> list[str]:
    """Everything a failed conversion could have left: dataset/staging folders and split files."""
    raw = sorted(p.name for p in (root / "raw").iterdir()) if (root / "raw").is_dir() else []
    pre = sorted(str(p) for p in (root / "preprocessed").rglob("*")) if (root / "preprocessed").is_dir() else []
    return raw + pre


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_synapse_layout_labels_split_and_record(nnunet_env):
    src = make_btcv(nnunet_env / "RawData" / "Training")
    out = convert_synapse(src, dataset_id=120)
    verify_dataset_integrity(str(out), num_processes=1)

    test = [f"synapse_{c}" for c in SYNAPSE_TEST_IDS]
    train = [f"synapse_{c}" for c in BTCV_IDS if c not in SYNAPSE_TEST_IDS]
    assert len(train) == 18 and len(test) == 12
    assert _cases(out / "imagesTr", channel=True) == train == _cases(out / "labelsTr")
    assert _cases(out / "imagesTs", channel=True) == test == _cases(out / "labelsTs")
    folds = _splits(nnunet_env, out.name)
    assert len(folds) == 5
    assert sorted(sum((f["val"] for f in folds), [])) == train  # every training case validated once, no test case
    for f in folds:
        assert sorted(f["train"] + f["val"]) == train

    # TransUNet mapping, by hand: liver 6 -> 5, stomach 7 -> 6, aorta 8 -> 7, pancreas 11 -> 8, 5/9/10/12/13 -> 0
    original = _array(src / "label" / "label0001.nii.gz")
    converted = _array(out / "labelsTs" / "synapse_0001.nii.gz")
    expected = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0, 6: 5, 7: 6, 8: 7, 9: 0, 10: 0, 11: 8, 12: 0, 13: 0}
    np.testing.assert_array_equal(converted, np.vectorize(expected.get)(original))
    # images are copied byte for byte
    assert (out / "imagesTr" / "synapse_0005_0000.nii.gz").read_bytes() == (src / "img" / "img0005.nii.gz").read_bytes()

    record = json.loads((out / RECORD_FILE).read_text())
    back = {"0": 0, "1": 1, "2": 2, "3": 3, "4": 4, "5": 6, "6": 7, "7": 8, "8": 11}
    assert record["labels_nnunet_to_original"] == back
    assert record["cases"]["synapse_0022"]["submission_name"] == "label0022.nii.gz"
    assert record["splits"]["test"] == test
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert labels["liver"] == 5 and labels["pancreas"] == 8 and len(labels) == 9


def test_synapse_all_labels_keeps_btcv_values(nnunet_env):
    src = make_btcv(nnunet_env / "btcv")
    out = convert_synapse(src, dataset_id=121, all_labels=True)
    np.testing.assert_array_equal(
        _array(out / "labelsTr" / "synapse_0005.nii.gz"), _array(src / "label" / "label0005.nii.gz")
    )
    assert len(json.loads((out / "dataset.json").read_text())["labels"]) == 14


def test_acdc_paper_split_by_patient_and_phases(nnunet_env):
    src = make_acdc(nnunet_env / "database", per_group=10)
    out = convert_acdc(src, dataset_id=27, protocol="random")
    verify_dataset_integrity(str(out), num_processes=1)
    record = json.loads((out / RECORD_FILE).read_text())
    split = record["splits"]
    patients = {k: {c.split("_")[0] for c in v} for k, v in split.items()}
    assert [len(patients[k]) for k in ("train", "val", "test")] == [35, 5, 10]  # 70/10/20 of 50 patients
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"])
    assert all(len(v) == 2 * len(patients[k]) for k, v in split.items())  # ED and ES frames stay together
    # stratified: each pathology group (10 consecutive patient numbers here) gives 7/1/2
    for group in range(5):
        members = {f"patient{n:03d}" for n in range(10 * group + 1, 10 * group + 11)}
        assert [len(patients[k] & members) for k in ("train", "val", "test")] == [7, 1, 2]
    assert _splits(nnunet_env, out.name) == [{"train": split["train"], "val": split["val"]}]
    assert _cases(out / "labelsTs") == split["test"] == _cases(out / "imagesTs", channel=True)
    # Info.cfg of patient 003: ED 1, ES 5 + 3 % 7 = 8
    assert record["cases"]["patient003_frame01"]["phase"] == "ED"
    assert record["cases"]["patient003_frame08"]["submission_name"] == "patient003_ES.nii.gz"
    assert not list((out / "imagesTr").glob("*4d*"))


def test_acdc_paper_split_is_70_10_20_for_100_patients():
    groups = {f"patient{n:03d}": ("DCM", "HCM", "MINF", "NOR", "RV")[(n - 1) // 20] for n in range(1, 101)}
    split = paper_split(groups, seed=12345)
    assert [len(split[k]) for k in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(sum(split.values(), [])) == sorted(groups)
    assert paper_split(groups, seed=12345) == split != paper_split(groups, seed=1)


def test_acdc_challenge_protocol_keeps_nnunet_layout(nnunet_env):
    src = make_acdc(nnunet_env / "database", per_group=2, test_patients=2)
    out = convert_acdc(src, dataset_id=28, protocol="challenge")
    assert _cases(out / "imagesTs", channel=True) == [
        "patient101_frame01",
        "patient101_frame08",
        "patient102_frame01",
        "patient102_frame09",
    ]
    assert len(_cases(out / "labelsTr")) == 20 and not (out / "labelsTs").exists()
    folds = _splits(nnunet_env, out.name)
    assert len(folds) == 5 and all(len(f["val"]) == 4 for f in folds)  # nnU-Net's split: 2 patients per fold


def test_msd_pancreas_70_10_20_seeded(nnunet_env):
    task = make_msd_pancreas(nnunet_env / "msd", n=20)
    out = convert_msd_pancreas(task, dataset_id=7, seed=3, num_processes=1)
    verify_dataset_integrity(str(out), num_processes=1)
    split = json.loads((out / RECORD_FILE).read_text())["splits"]
    assert [len(split[k]) for k in ("train", "val", "test")] == [14, 2, 4]
    assert split == split_fractions([f"pancreas_{i:03d}" for i in range(1, 40, 2)], (0.7, 0.1, 0.2), seed=3)
    assert _splits(nnunet_env, out.name) == [{"train": split["train"], "val": split["val"]}]
    assert _cases(out / "labelsTs") == split["test"] and _cases(out / "imagesTs", channel=True) == split["test"]
    assert not list(out.rglob("._*"))  # macOS resource files skipped, MSD's unlabelled test images not written
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 16 and meta["labels"] == {"background": 0, "pancreas": 1, "cancer": 2}


def test_amos_task1_official_train_val_fold(nnunet_env):
    out = convert_amos(make_amos(nnunet_env / "amos22"), task=1, dataset_id=218)
    verify_dataset_integrity(str(out), num_processes=1)
    # task 1 keeps CT (ids <= 500): MR cases 0540, 0580, 0510 dropped by nnU-Net's converter
    assert _splits(nnunet_env, out.name) == [
        {"train": ["amos_0001", "amos_0004", "amos_0005"], "val": ["amos_0008", "amos_0013"]}
    ]
    assert _cases(out / "imagesTs", channel=True) == ["amos_0002", "amos_0003"]
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["splits"]["test"] == ["amos_0002", "amos_0003"]
    assert record["labels_nnunet_to_original"] == {str(i): i for i in range(16)}


def test_amos_task2_keeps_mr(nnunet_env):
    out = convert_amos(make_amos(nnunet_env / "amos22"), task=2, dataset_id=219)
    assert _splits(nnunet_env, out.name)[0]["train"] == sorted(AMOS_SPLIT["training"])
    assert _cases(out / "imagesTs", channel=True) == sorted(AMOS_SPLIT["test"])


def test_nih_pancreas_dicom_series_geometry(nnunet_env):
    images, labels = make_nih_pancreas(nnunet_env / "tcia")
    out = convert_nih_pancreas(images, labels, dataset_id=82)
    verify_dataset_integrity(str(out), num_processes=1)
    img = sitk.ReadImage(str(out / "imagesTr" / "nih_0002_0000.nii.gz"))
    np.testing.assert_allclose(img.GetSpacing(), SPACING, atol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(img.GetDirection(), DIRECTION, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(volume(2)))
    lab = sitk.ReadImage(str(out / "labelsTr" / "nih_0002.nii.gz"))
    assert lab.GetOrigin() == img.GetOrigin() and lab.GetDirection() == img.GetDirection()
    folds = _splits(nnunet_env, out.name)
    assert len(folds) == 4 and sorted(sum((f["val"] for f in folds), [])) == [f"nih_{i:04d}" for i in range(1, 6)]


# ---- bad input: clear message, nothing left behind ---------------------------------------------------------------


def _break_btcv(src: Path, problem: str) -> None:
    label = src / "label" / "label0005.nii.gz"
    if problem == "missing folder":
        for f in (src / "label").iterdir():
            f.unlink()
        (src / "label").rmdir()
    elif problem == "image without label":
        label.unlink()
    elif problem == "size":
        write(volume(5, values=3, size=(16, 16, 7)), label)
    else:
        img = sitk.ReadImage(str(label))
        if problem == "spacing":
            img.SetSpacing((0.8, 0.7, 3.0))
        elif problem == "origin":
            img.SetOrigin((-12.5, 30.25, 101.0))
        elif problem == "direction":
            img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
        elif problem == "label values":
            arr = sitk.GetArrayFromImage(img)
            arr[0, 0, 0] = 14
            new = sitk.GetImageFromArray(arr)
            new.CopyInformation(img)
            img = new
        write(img, label)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing folder", "missing folder: BTCV label folder label/ not found"),
        ("image without label", "image without label: .*img0005.nii.gz \\(case 0005\\)"),
        ("size", "geometry mismatch in case 0005: image size \\(16, 16, 8\\) != label size \\(16, 16, 7\\)"),
        ("spacing", "geometry mismatch in case 0005: image spacing .* != label spacing \\(0.8, 0.7, 3.0\\)"),
        ("origin", "geometry mismatch in case 0005: image origin .* != label origin \\(-12.5, 30.25, 101.0\\)"),
        ("direction", "geometry mismatch in case 0005: image direction"),
        ("label values", "label values outside the protocol in case 0005: \\[14\\]"),
    ],
)
def test_synapse_bad_input(nnunet_env, problem, message):
    src = make_btcv(nnunet_env / "btcv")
    _break_btcv(src, problem)
    with pytest.raises(ConversionError, match=message):
        convert_synapse(src, dataset_id=120)
    assert _leftovers(nnunet_env) == []


def test_command_line_reports_error_without_traceback(nnunet_env, capsys):
    from nnunet_sam.dataset_conversion.synapse import main

    assert_unusable(
        capsys, main(["-i", str(nnunet_env / "nowhere"), "-d", "120"]), "missing folder: BTCV image folder img/"
    )
    assert _leftovers(nnunet_env) == []


def test_error_while_writing_removes_staging_and_split(nnunet_env, monkeypatch):
    import nnunet_sam.dataset_conversion.common as common  # finish_dataset writes every converter's split file

    write_splits = common.write_splits

    def fail(*args, **kwargs):
        write_splits(*args, **kwargs)  # the split file exists ...
        raise OSError("disk full")  # ... and then the conversion fails

    monkeypatch.setattr(common, "write_splits", fail)
    with pytest.raises(ConversionError, match=r"writing the dataset into .* failed \(OSError: disk full\)"):
        convert_synapse(make_btcv(nnunet_env / "btcv"), dataset_id=120)  # a message since issue 29
    assert _leftovers(nnunet_env) == []


def test_taken_dataset_id_is_refused(nnunet_env):
    (nnunet_env / "raw" / "Dataset120_Other").mkdir(parents=True)
    with pytest.raises(ConversionError, match="dataset id 120 is already taken by \\['Dataset120_Other'\\]"):
        convert_synapse(make_btcv(nnunet_env / "btcv"), dataset_id=120)
    assert _leftovers(nnunet_env) == ["Dataset120_Other"]


def test_acdc_missing_label(nnunet_env):
    src = make_acdc(nnunet_env / "database", per_group=1)
    (src / "training" / "patient003" / "patient003_frame08_gt.nii.gz").unlink()
    with pytest.raises(ConversionError, match="image without label: .*patient003_frame08.nii.gz has no"):
        convert_acdc(src, dataset_id=27, protocol="random")
    assert _leftovers(nnunet_env) == []


def test_msd_label_values_outside_protocol(nnunet_env):
    task = make_msd_pancreas(nnunet_env / "msd", n=5)
    write(volume(7, values=3), task / "labelsTr" / "pancreas_003.nii.gz")
    with pytest.raises(ConversionError, match="label values outside the protocol in case pancreas_003: \\[3\\]"):
        convert_msd_pancreas(task, dataset_id=7, num_processes=1)
    assert _leftovers(nnunet_env) == []


def test_amos_missing_validation_label(nnunet_env):
    src = make_amos(nnunet_env / "amos22")
    (src / "labelsVa" / "amos_0013.nii.gz").unlink()
    with pytest.raises(ConversionError, match="image without label: .*imagesVa/amos_0013.nii.gz has no labelsVa/"):
        convert_amos(src, task=1, dataset_id=218)
    assert _leftovers(nnunet_env) == []


def test_nih_label_geometry_mismatch(nnunet_env):
    images, labels = make_nih_pancreas(nnunet_env / "tcia", numbers=(1, 2, 3, 4))
    flipped = volume(702, values=1)
    flipped.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    write(flipped, labels / "label0002.nii.gz")
    with pytest.raises(ConversionError, match="geometry mismatch in case 0002: image direction"):
        convert_nih_pancreas(images, labels, dataset_id=82)
    assert _leftovers(nnunet_env) == []


def test_nih_unreadable_series_is_named_not_counted_as_too_few_folds(nnunet_env):
    """Issue 29: a patient whose .dcm files cannot be read was reported as "1 cases cannot make 4 folds"."""
    images, labels = make_nih_pancreas(nnunet_env / "tcia", numbers=(1,))
    for path in (images / "PANCREAS_0001").rglob("*.dcm"):
        path.write_bytes(b"not a dicom file")
    with pytest.raises(ConversionError, match=r"no readable DICOM series below .*PANCREAS_0001: 8 file\(s\) there"):
        convert_nih_pancreas(images, labels, dataset_id=82)
    assert _leftovers(nnunet_env) == []


def test_nih_align_labels_reorders_a_flipped_label(nnunet_env):
    images, labels = make_nih_pancreas(nnunet_env / "tcia", numbers=(1, 2))
    on_grid = volume(702, values=1)
    # the same voxels described with the x axis reversed: origin at the last column, first direction column negated
    arr = sitk.GetArrayFromImage(on_grid)[:, :, ::-1]
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    flipped.SetSpacing(SPACING)
    flipped.SetOrigin(on_grid.TransformIndexToPhysicalPoint((SIZE[0] - 1, 0, 0)))
    d = np.array(DIRECTION).reshape(3, 3)
    d[:, 0] *= -1
    flipped.SetDirection(tuple(d.ravel()))
    write(flipped, labels / "label0002.nii.gz")
    with pytest.raises(ConversionError, match="geometry mismatch in case 0002: image origin"):
        convert_nih_pancreas(images, labels, dataset_id=82, folds=2)
    out = convert_nih_pancreas(images, labels, dataset_id=82, folds=2, align_labels=True)
    np.testing.assert_array_equal(_array(out / "labelsTr" / "nih_0002.nii.gz"), sitk.GetArrayFromImage(on_grid))
    # half a voxel off the image grid: no silent resampling
    shifted = volume(701, values=1)
    shifted.SetOrigin(tuple(o + 0.4 for o in ORIGIN))
    write(shifted, labels / "label0001.nii.gz")
    with pytest.raises(ConversionError, match="case 0001: the label does not cover the image's voxel grid"):
        convert_nih_pancreas(images, labels, dataset_id=83, folds=2, align_labels=True)


@pytest.mark.parametrize(
    "command", ["synapse", "acdc", "msd_pancreas", "amos", "nih_pancreas"], ids=lambda c: f"nnunet_sam_convert_{c}"
)
def test_help(command, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"nnunet_sam.dataset_conversion.{command}").main(["--help"])
    assert exit_info.value.code == 0 and "--dataset-id" in capsys.readouterr().out


# ---- non-integer labels (issue 17 item 8) -----------------------------------------------------------------------
def _as_float_labels(path: Path, fractional: bool) -> None:
    """Rewrite a label file as float32: integer values (fine), or with one voxel of value + 0.5."""
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if fractional:
        arr[arr > 0] += 0.5  # e.g. a label map resampled with linear interpolation
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    write(new, path)


def _convert_with_float_label(root: Path, converter: str, fractional: bool) -> tuple[Path | None, str]:
    """Run ``converter`` with one float label file; returns (dataset folder, the case id of that file)."""
    from nnunet_sam.dataset_conversion.tumour import convert_tumour

    if converter == "synapse":
        src = make_btcv(root / "btcv")
        _as_float_labels(src / "label" / "label0005.nii.gz", fractional)
        return (lambda: convert_synapse(src, dataset_id=120)), "0005"
    if converter == "acdc":
        src = make_acdc(root / "database", per_group=1)
        _as_float_labels(src / "training" / "patient003" / "patient003_frame01_gt.nii.gz", fractional)
        return (lambda: convert_acdc(src, dataset_id=27, protocol="random")), "patient003_frame01"
    if converter in ("msd_pancreas", "tumour"):
        task = make_msd_pancreas(root / "msd", n=10)
        _as_float_labels(task / "labelsTr" / "pancreas_003.nii.gz", fractional)
        if converter == "tumour":
            return (lambda: convert_tumour("msd_pancreas", task, dataset_id=8, split_kind="random")), "pancreas_003"
        return (lambda: convert_msd_pancreas(task, dataset_id=7, num_processes=1)), "pancreas_003"
    if converter == "amos":
        src = make_amos(root / "amos22")
        _as_float_labels(src / "labelsTr" / "amos_0004.nii.gz", fractional)
        return (lambda: convert_amos(src, task=1, dataset_id=218)), "amos_0004"
    images, labels = make_nih_pancreas(root / "tcia", numbers=(1, 2, 3, 4))
    _as_float_labels(labels / "label0002.nii.gz", fractional)
    return (lambda: convert_nih_pancreas(images, labels, dataset_id=82)), "0002"


CONVERTERS = ("synapse", "acdc", "msd_pancreas", "tumour", "amos", "nih_pancreas")


@pytest.mark.parametrize("converter", CONVERTERS)
def test_fractional_label_values_are_refused_by_every_converter(nnunet_env, converter):
    """Before: ACDC, MSD and AMOS copied 1.5 into labelsTr, NIH made it 1, Synapse and tumour raised IndexError."""
    convert, case = _convert_with_float_label(nnunet_env, converter, fractional=True)
    with pytest.raises(ConversionError, match=rf"fractional label values in case {case}: \[\d\.5"):
        convert()
    assert _leftovers(nnunet_env) == []


@pytest.mark.parametrize("converter", ["synapse", "tumour", "nih_pancreas"])
def test_float_label_files_with_integer_values_are_converted(nnunet_env, converter):
    """The converters that relabel (lookup table) cast them; before, Synapse and tumour raised IndexError."""
    convert, case = _convert_with_float_label(nnunet_env, converter, fractional=False)
    out = convert() or next((nnunet_env / "raw").glob("Dataset*"))
    written = [p for sub in ("labelsTr", "labelsTs") for p in (out / sub).glob(f"*{case}.nii.gz")]
    assert len(written) == 1 and np.issubdtype(_array(written[0]).dtype, np.integer) and _array(written[0]).max() > 0


def test_abdomenct1k_converter_keeps_named_labels_as_test_cases(nnunet_env):
    from nnunet_sam.dataset_conversion.abdomenct1k import convert_abdomenct1k
    from nnunet_sam.dataset_conversion.common import ConversionError
    from nnunet_sam.evaluation.pansam import dataset_target

    tmp_path = nnunet_env
    for k, part in ((1, "Part1"), (2, "Part1"), (3, "Part2")):
        write(volume(k), tmp_path / part / f"Case_{k:05d}_0000.nii.gz")
        write(volume(100 + k, values=4), tmp_path / "Mask" / f"Case_{k:05d}.nii.gz")
    write(volume(9), tmp_path / "Part2" / "Case_00009_0000.nii.gz")  # unlabelled part of the download
    with pytest.raises(ConversionError, match="image without label"):
        convert_abdomenct1k([tmp_path / "Part1", tmp_path / "Part2"], tmp_path / "Mask")
    out = convert_abdomenct1k([tmp_path / "Part1", tmp_path / "Part2"], tmp_path / "Mask", skip_unlabelled=True)
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"Case_{k:05d}_0000.nii.gz" for k in (1, 2, 3)]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTs" / "Case_00002.nii.gz")))
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "Mask" / "Case_00002.nii.gz")))
    np.testing.assert_array_equal(label, source)  # values kept: 4 is the pancreas
    assert dataset_target("a1k", out / "imagesTs", out / "labelsTs", "pancreas") == 4


def _abdomenct1k_download(root: Path, cases: Sequence[int]) -> tuple[Path, Path]:
    """A download laid out and named like the real one: ``AbdomenCT-1K-ImagePart1/Case_XXXXX_0000.nii.gz`` and
    ``Mask/Case_XXXXX.nii.gz`` (1 liver, 2 kidney, 3 spleen, 4 pancreas)."""
    for k in cases:
        write(volume(k), root / "AbdomenCT-1K-ImagePart1" / f"Case_{k:05d}_0000.nii.gz")
        write(volume(100 + k, values=4), root / "Mask" / f"Case_{k:05d}.nii.gz")
    return root / "AbdomenCT-1K-ImagePart1", root / "Mask"


def test_abdomenct1k_zero_shot_protocol_finds_the_nih_case_ids_by_content(nnunet_env, capsys):
    """PanSAM's zero-shot protocol (issue 25, item 12): AbdomenCT-1K publishes no case-id list of its NIH
    Pancreas-CT scans, so the ids are found by content, whatever the file type, orientation or header spacing, left
    out by id, counted and written as a reusable list."""
    from nnunet_sam.dataset_conversion.abdomenct1k import EXCLUSIONS_FILE, main

    tmp_path = nnunet_env
    images, masks = _abdomenct1k_download(tmp_path, (1, 2, 3, 4, 5))
    nih = tmp_path / "NIH" / "imagesTr"
    nih.mkdir(parents=True)
    sitk.WriteImage(volume(2), str(nih / "pancreas_0007_0000.nrrd"))  # the same scan as Case_00002, another format
    flipped = sitk.DICOMOrient(volume(4), "RAS")  # Case_00004's scan stored in another orientation ...
    flipped.SetSpacing((1.0, 1.0, 1.0))  # ... with another spacing in its header
    sitk.WriteImage(flipped, str(nih / "pancreas_0011_0000.nii.gz"))
    permuted = sitk.PermuteAxes(volume(5), (2, 1, 0))  # Case_00005's scan with its axes in another order
    sitk.WriteImage(permuted, str(nih / "pancreas_0013_0000.nii.gz"))
    sitk.WriteImage(volume(50), str(nih / "pancreas_0012_0000.nii.gz"))  # a scan AbdomenCT-1K does not hold
    argv = ["-i", str(images), "-l", str(masks), "-d", "512", "--exclude-like", str(nih)]
    assert main(argv) == 0
    assert "excluded 3 case(s)" in capsys.readouterr().out
    out = next((tmp_path / "raw").glob("Dataset512_*"))
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == ["Case_00001.nii.gz", "Case_00003.nii.gz"]
    record = json.loads((out / RECORD_FILE).read_text())
    assert sorted(record["excluded"]) == ["Case_00002", "Case_00004", "Case_00005"]
    assert record["excluded"]["Case_00002"].endswith("pancreas_0007_0000.nrrd")
    listed = [line.split()[0] for line in (out / EXCLUSIONS_FILE).read_text().splitlines()]
    assert listed == ["Case_00002", "Case_00004", "Case_00005"]


def test_abdomenct1k_zero_shot_protocol_excludes_listed_case_ids(nnunet_env, capsys):
    """The NIH case ids given as a list (a previous run's ``excluded_cases.txt``, or ids) are left out by id and
    counted; an id that is not in the download, or a line that is not an id, is refused with the reason."""
    from nnunet_sam.dataset_conversion.abdomenct1k import main

    tmp_path = nnunet_env
    images, masks = _abdomenct1k_download(tmp_path, (1, 2, 3, 4))
    listing = tmp_path / "nih_cases.txt"
    listing.write_text("# NIH Pancreas-CT scans in AbdomenCT-1K\nCase_00002\n\nCase_00003  # same scan as x\n")
    base = ["-i", str(images), "-l", str(masks)]
    assert main([*base, "-d", "513", "--exclude-cases", str(listing), "Case_00004"]) == 0
    assert "excluded 3 case(s)" in capsys.readouterr().out
    out = next((tmp_path / "raw").glob("Dataset513_*"))
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["Case_00001_0000.nii.gz"]
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["excluded"] == {
        "Case_00002": f"listed in {listing}",
        "Case_00003": f"listed in {listing}",
        "Case_00004": "listed",
    }
    assert record["splits"]["test"] == ["Case_00001"]
    assert main([*base, "-d", "514", "--exclude-cases", "Case_00009"]) == 2
    assert "1 case(s) to exclude are not in the download (Case_00009)" in capsys.readouterr().err
    listing.write_text("Case_00002\ncase 3\n")
    assert main([*base, "-d", "514", "--exclude-cases", str(listing)]) == 2
    assert "line 2: 'case 3' is not an AbdomenCT-1K case id" in capsys.readouterr().err
    assert main([*base, "-d", "514", "--exclude-cases", "nih.txt"]) == 2
    assert "'nih.txt' is neither a list file nor a case id" in capsys.readouterr().err
    assert not list((tmp_path / "raw").glob("Dataset514_*"))


# ---- ACDC paper protocol: the fixed patient lists of the papers' tables (issue 25, item 11) ------------------------
def test_acdc_paper_lists_are_masksam_public_split_and_the_baselines_test_patients():
    from nnunet_sam.dataset_conversion.acdc import PAPER_PATIENTS

    assert [len(PAPER_PATIENTS[k]) for k in ("train", "val", "test")] == [70, 10, 20]
    listed = sum(PAPER_PATIENTS.values(), [])
    assert sorted(listed) == [f"patient{n:03d}" for n in range(1, 101)]  # a partition of the 100 patients
    # The 20 test patients, checked against the public nnFormer repository (282857341/nnFormer,
    # dataset_json/ACDC_dataset.json, "test": both frames of each), the list TransUNet-style ACDC tables use.
    nnformer_test = [2, 3, 8, 9, 12, 14, 17, 24, 42, 48, 49, 53, 55, 64, 67, 79, 81, 88, 92, 95]
    assert PAPER_PATIENTS["test"] == [f"patient{n:03d}" for n in nnformer_test]
    assert PAPER_PATIENTS["val"] == [f"patient{n:03d}" for n in (89, 90, 91, 93, 94, 96, 97, 98, 99, 100)]


def test_acdc_paper_protocol_uses_the_lists_and_refuses_an_incomplete_download(nnunet_env, monkeypatch):
    from nnunet_sam.dataset_conversion import acdc

    src = make_acdc(nnunet_env / "database", per_group=2)  # patients 001-010
    with pytest.raises(ConversionError, match=r"90 patient\(s\) of the paper protocol.*--protocol random"):
        convert_acdc(src, dataset_id=27)
    lists = {
        "train": [f"patient{n:03d}" for n in range(1, 8)],
        "val": ["patient008"],
        "test": ["patient009", "patient010"],
    }
    monkeypatch.setattr(acdc, "PAPER_PATIENTS", lists)
    out = convert_acdc(src, dataset_id=29)
    split = json.loads((out / RECORD_FILE).read_text())["splits"]
    assert {k: sorted({c.split("_")[0] for c in v}) for k, v in split.items()} == lists
    assert _cases(out / "labelsTs") == split["test"]


# ---- damaged files (issue 29 item 4) ------------------------------------------------------------------------------
def _damage(path: Path, kind: str) -> None:
    """Cut ``path`` short (its gzip stream ends early; ITK reads the missing voxels as 0), or give a label map NaN
    voxels (stored as float32)."""
    if kind == "truncated":
        import gzip

        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 3]))  # a complete stream of a third of the voxels
        return
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[0, 0, :3] = np.nan
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    write(new, path)


def _converter_with(root: Path, converter: str, which: str, kind: str):
    """``converter`` on a download whose image or label file (``which``) of one case is damaged (``kind``)."""
    from nnunet_sam.dataset_conversion.tumour import convert_tumour

    if converter == "synapse":
        src = make_btcv(root / "btcv")
        _damage(src / ("img/img0005.nii.gz" if which == "image" else "label/label0005.nii.gz"), kind)
        return lambda: convert_synapse(src, dataset_id=120)
    if converter == "acdc":
        src = make_acdc(root / "database", per_group=1)
        name = "patient003_frame01" + ("" if which == "image" else "_gt")
        _damage(src / "training" / "patient003" / f"{name}.nii.gz", kind)
        return lambda: convert_acdc(src, dataset_id=27)
    if converter in ("msd_pancreas", "tumour"):
        task = make_msd_pancreas(root / "msd", n=10)
        _damage(task / ("imagesTr" if which == "image" else "labelsTr") / "pancreas_003.nii.gz", kind)
        if converter == "tumour":
            return lambda: convert_tumour("msd_pancreas", task, dataset_id=8, split_kind="random")
        return lambda: convert_msd_pancreas(task, dataset_id=7, num_processes=1)
    if converter == "amos":
        src = make_amos(root / "amos22")
        _damage(src / ("imagesTr" if which == "image" else "labelsTr") / "amos_0004.nii.gz", kind)
        return lambda: convert_amos(src, task=1, dataset_id=218)
    images, labels = make_nih_pancreas(root / "tcia", numbers=(1, 2, 3, 4))
    assert which == "label"  # NIH images are DICOM series
    _damage(labels / "label0002.nii.gz", kind)
    return lambda: convert_nih_pancreas(images, labels, dataset_id=82)


DAMAGED = [
    (converter, which, kind)
    for converter in CONVERTERS
    for which in ("image", "label")
    for kind in ("truncated", "nan")
    if not (kind == "nan" and which == "image") and not (converter == "nih_pancreas" and which == "image")
]


@pytest.mark.parametrize("converter,which,kind", DAMAGED)
def test_damaged_files_are_refused_by_every_converter(nnunet_env, converter, which, kind):
    """Before: a truncated image was copied as is, a truncated label relabelled (its missing voxels 0), NaN label
    voxels became background."""
    convert = _converter_with(nnunet_env, converter, which, kind)
    message = r"is truncated: it holds \d+ bytes" if kind == "truncated" else r"holds 3 non-finite label voxel"
    with pytest.raises(ConversionError, match=rf"case \S+: .*{message}"):
        convert()
    assert _leftovers(nnunet_env) == []


def test_too_few_cases_for_a_split_are_refused(nnunet_env):
    """Two cases gave the split [{"train": ["a"], "val": []}] with exit 0 (issue 29 item 11)."""
    task = make_msd_pancreas(nnunet_env / "msd", n=2)
    with pytest.raises(ConversionError, match=r"fold 0 would have 1 training and 0 validation case\(s\): too few"):
        convert_msd_pancreas(task, dataset_id=7, num_processes=1)
    assert _leftovers(nnunet_env) == []

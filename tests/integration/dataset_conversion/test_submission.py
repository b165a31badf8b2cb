"""Submission writers: raw download -> converter -> nnU-Net-style predictions -> submission gives back the original
case names, label values and the images' exact spacing, origin and direction."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conversion_testing import assert_unusable, make_acdc, make_amos, make_btcv, volume

from nnunet_sam.dataset_conversion.acdc import convert_acdc
from nnunet_sam.dataset_conversion.amos import convert_amos
from nnunet_sam.dataset_conversion.common import ConversionError
from nnunet_sam.dataset_conversion.submission import main, write_submission
from nnunet_sam.dataset_conversion.synapse import SYNAPSE_TEST_IDS, convert_synapse


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch) -> Path:
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    return tmp_path


def _as_prediction(label: Path, out: Path, jitter: float = 2e-4) -> None:
    """What nnU-Net writes: the case's labels with a header that is only close to the image's (float32 round-off)."""
    img = sitk.ReadImage(str(label))
    img.SetOrigin(tuple(o + jitter for o in img.GetOrigin()))
    img.SetSpacing(tuple(s + jitter for s in img.GetSpacing()))
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(out), True)


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("all_labels", [False, True], ids=["8-organs", "13-labels"])
def test_synapse_round_trip(nnunet_env, all_labels):
    src = make_btcv(nnunet_env / "btcv")
    dataset = convert_synapse(src, dataset_id=120, all_labels=all_labels)
    pred = nnunet_env / "pred"
    for f in (dataset / "labelsTs").iterdir():
        _as_prediction(f, pred / f.name)

    out = write_submission(pred, dataset, nnunet_env / "submission", subset="test")
    assert sorted(f.name for f in out.iterdir()) == [f"label{c}.nii.gz" for c in SYNAPSE_TEST_IDS]
    for case in SYNAPSE_TEST_IDS:
        original = _array(src / "label" / f"label{case}.nii.gz")
        written = _array(out / f"label{case}.nii.gz")
        if all_labels:
            np.testing.assert_array_equal(written, original)
        else:  # the 8 organs come back with their BTCV values (liver 6, pancreas 11 ...), the rest was dropped
            kept = np.isin(original, [1, 2, 3, 4, 6, 7, 8, 11])
            np.testing.assert_array_equal(written, np.where(kept, original, 0))
            assert set(np.unique(written)) == {0, 1, 2, 3, 4, 6, 7, 8, 11}
        _assert_same_geometry(
            sitk.ReadImage(str(out / f"label{case}.nii.gz")), sitk.ReadImage(str(src / "img" / f"img{case}.nii.gz"))
        )


@pytest.fixture
def synapse_predictions(nnunet_env) -> tuple[Path, Path]:
    dataset = convert_synapse(make_btcv(nnunet_env / "btcv"), dataset_id=120)
    pred = nnunet_env / "pred"
    for f in (dataset / "labelsTs").iterdir():
        _as_prediction(f, pred / f.name)
    return dataset, pred


def test_incomplete_submission_is_refused(nnunet_env, synapse_predictions):
    dataset, pred = synapse_predictions
    (pred / "synapse_0038.nii.gz").unlink()
    shutil.copy(dataset / "labelsTr" / "synapse_0005.nii.gz", pred / "synapse_0005.nii.gz")
    with pytest.raises(
        ConversionError, match=r"missing cases \['synapse_0038'\], cases outside test: \['synapse_0005'\]"
    ):
        write_submission(pred, dataset, nnunet_env / "submission", subset="test")
    assert not (nnunet_env / "submission").exists() and not list(nnunet_env.glob(".submission*"))


def test_unknown_case_and_bad_geometry_are_refused(nnunet_env, synapse_predictions):
    dataset, pred = synapse_predictions
    shutil.copy(pred / "synapse_0001.nii.gz", pred / "synapse_9999.nii.gz")
    with pytest.raises(ConversionError, match=r"predictions of cases not in the conversion record: \['synapse_9999'\]"):
        write_submission(pred, dataset, nnunet_env / "submission")
    (pred / "synapse_9999.nii.gz").unlink()
    _as_prediction(dataset / "labelsTs" / "synapse_0022.nii.gz", pred / "synapse_0022.nii.gz", jitter=0.5)
    with pytest.raises(ConversionError, match="geometry mismatch in case synapse_0022: image spacing"):
        write_submission(pred, dataset, nnunet_env / "submission")
    assert not (nnunet_env / "submission").exists() and not list(nnunet_env.glob(".submission*"))


def test_unexpected_label_value_is_refused(nnunet_env, synapse_predictions):
    dataset, pred = synapse_predictions
    sitk.WriteImage(volume(1, values=9), str(pred / "synapse_0001.nii.gz"))  # 9 is not a Synapse label
    with pytest.raises(ConversionError, match=r"case synapse_0001 has label values \[9\] not in the dataset"):
        write_submission(pred, dataset, nnunet_env / "submission")


def test_amos_leaderboard_folder_and_zip(nnunet_env, capsys):
    src = make_amos(nnunet_env / "amos22")
    dataset = convert_amos(src, task=1, dataset_id=218)
    pred = nnunet_env / "pred"
    pred.mkdir()
    for case in ("amos_0002", "amos_0003"):  # nnU-Net predictions of the official test images, labels 0-15
        sitk.WriteImage(volume(int(case[-4:]) + 50, values=15), str(pred / f"{case}.nii.gz"))
    out = nnunet_env / "results"
    main(["amos", "-p", str(pred), "-r", str(dataset), "-o", str(out), "--zip"])
    assert "wrote 2 files" in capsys.readouterr().out
    assert sorted(f.name for f in out.iterdir()) == ["amos_0002.nii.gz", "amos_0003.nii.gz"]
    with zipfile.ZipFile(f"{out}.zip") as z:
        assert sorted(n for n in z.namelist() if n.endswith(".gz")) == [
            "results/amos_0002.nii.gz",
            "results/amos_0003.nii.gz",
        ]
    for case in ("amos_0002", "amos_0003"):
        written = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        _assert_same_geometry(written, sitk.ReadImage(str(src / "imagesTs" / f"{case}.nii.gz")))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), _array(pred / f"{case}.nii.gz"))

    (pred / "amos_0003.nii.gz").unlink()
    assert_unusable(
        capsys,
        main(["amos", "-p", str(pred), "-r", str(dataset), "-o", str(nnunet_env / "results2")]),
        r"submission incomplete: missing cases \['amos_0003'\]",
    )


def test_acdc_challenge_names(nnunet_env, capsys):
    src = make_acdc(nnunet_env / "database", per_group=1, test_patients=2)
    dataset = convert_acdc(src, dataset_id=27, protocol="challenge")
    pred = nnunet_env / "pred"
    for f in (dataset / "imagesTs").iterdir():
        case = f.name[: -len("_0000.nii.gz")]
        _as_prediction(src / "training" / "patient001" / "patient001_frame01_gt.nii.gz", pred / f"{case}.nii.gz")
    out = nnunet_env / "acdc_submission"
    main(["acdc", "-p", str(pred), "-r", str(dataset), "-o", str(out)])
    # Info.cfg: patient101 ED 1 / ES 8, patient102 ED 1 / ES 9
    assert sorted(f.name for f in out.iterdir()) == [
        "patient101_ED.nii.gz",
        "patient101_ES.nii.gz",
        "patient102_ED.nii.gz",
        "patient102_ES.nii.gz",
    ]
    _assert_same_geometry(
        sitk.ReadImage(str(out / "patient102_ES.nii.gz")),
        sitk.ReadImage(str(src / "testing" / "patient102" / "patient102_frame09.nii.gz")),
    )
    assert_unusable(
        capsys,
        main(["amos", "-p", str(pred), "-r", str(dataset), "-o", str(nnunet_env / "x")]),
        "amos needs a dataset converted by its converter; this one is 'acdc",
    )


def test_record_is_required(nnunet_env, synapse_predictions):
    dataset, pred = synapse_predictions
    (dataset / "nnunet_sam_conversion.json").unlink()
    with pytest.raises(ConversionError, match="no conversion record nnunet_sam_conversion.json in"):
        write_submission(pred, dataset, nnunet_env / "submission")
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 18


def test_help(capsys):
    for command in ("from-nnunet", "amos", "acdc"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and "--raw-dataset" in capsys.readouterr().out


# ---- issue 17: incomplete, float and unwritable submissions -------------------------------------------------------
def test_submission_missing_a_case_of_its_subset_is_refused_unless_partial(nnunet_env, synapse_predictions, capsys):
    """Item 9: without --subset, 11 of the 12 test cases were written with exit code 0."""
    dataset, pred = synapse_predictions
    (pred / "synapse_0038.nii.gz").unlink()
    args = ["from-nnunet", "-p", str(pred), "-r", str(dataset), "-o", str(nnunet_env / "submission")]
    assert_unusable(capsys, main(args), r"submission incomplete: 1 case\(s\) of the subset\(s\) test .*synapse_0038")
    assert not (nnunet_env / "submission").exists() and not list(nnunet_env.glob(".submission*"))
    main([*args, "--partial"])
    assert len(list((nnunet_env / "submission").iterdir())) == len(SYNAPSE_TEST_IDS) - 1


def test_float_predictions_are_cast_and_fractional_ones_refused(nnunet_env, synapse_predictions):
    """Items 8 and 15: a float prediction file raised IndexError; integer values are fine, 1.5 is refused."""
    dataset, pred = synapse_predictions
    path = pred / "synapse_0001.nii.gz"
    from_integers = _array(write_submission(pred, dataset, nnunet_env / "s1") / "label0001.nii.gz")
    img = sitk.ReadImage(str(path))
    as_float = sitk.Cast(img, sitk.sitkFloat32)
    sitk.WriteImage(as_float, str(path), True)
    from_floats = _array(write_submission(pred, dataset, nnunet_env / "s2") / "label0001.nii.gz")
    assert from_floats.dtype == np.uint8 and from_integers.max() > 0
    np.testing.assert_array_equal(from_floats, from_integers)
    arr = sitk.GetArrayFromImage(as_float)
    arr[arr > 0] += 0.5
    fractional = sitk.GetImageFromArray(arr)
    fractional.CopyInformation(img)
    sitk.WriteImage(fractional, str(path), True)
    with pytest.raises(ConversionError, match=r"prediction of case synapse_0001: .* holds fractional label values"):
        write_submission(pred, dataset, nnunet_env / "s3")
    (pred / "synapse_0001.nii.gz").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConversionError, match=r"prediction of case synapse_0001: .* is damaged"):
        write_submission(pred, dataset, nnunet_env / "s3")
    assert not (nnunet_env / "s3").exists()


def test_unwritable_submission_folder_is_named(nnunet_env, synapse_predictions, monkeypatch):
    """Item 15: a read-only output folder (simulated: tests may run as root) gave a PermissionError traceback."""
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    dataset, pred = synapse_predictions
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(ConversionError, match=rf"cannot write the submission into {nnunet_env}: Permission denied"):
        write_submission(pred, dataset, nnunet_env / "submission")


@pytest.mark.parametrize("name", ["../../x.nii.gz", "/tmp/x.nii.gz", "sub/x.nii.gz", "..", "", 7])
def test_submission_name_outside_the_output_folder_is_refused(nnunet_env, synapse_predictions, name):
    """A conversion record naming a file outside -o (edited, or from elsewhere) writes nothing anywhere."""
    dataset, pred = synapse_predictions
    record_path = dataset / "nnunet_sam_conversion.json"
    record = json.loads(record_path.read_text())
    record["cases"]["synapse_0001"]["submission_name"] = name
    record_path.write_text(json.dumps(record))
    out = nnunet_env / "a" / "b" / "submission"
    with pytest.raises(ConversionError, match=r"case synapse_0001's submission file .* is not a plain file name"):
        write_submission(pred, dataset, out, subset="test")
    assert not (nnunet_env / "a").exists() and not (nnunet_env / "x.nii.gz").exists()


def test_zip_never_overwrites_an_existing_file(nnunet_env, synapse_predictions, capsys):
    dataset, pred = synapse_predictions
    out = nnunet_env / "submission"
    Path(f"{out}.zip").write_text("the user's own file")
    code = main(["from-nnunet", "-p", str(pred), "-r", str(dataset), "-o", str(out), "--zip"])
    assert_unusable(capsys, code, r".*submission.zip exists already; choose a new output name")
    assert Path(f"{out}.zip").read_text() == "the user's own file" and not out.exists()


def test_outputs_honour_the_umask(nnunet_env, synapse_predictions):
    """Converters, the phantom maker and the submission writer stage in a 0700 folder: the result gets the mode
    that the umask gives a new folder, as mkdir would."""
    import os

    from nnunet_sam.demo.phantoms import make_phantom_dataset

    dataset, pred = synapse_predictions
    old = os.umask(0o022)
    try:
        out = write_submission(pred, dataset, nnunet_env / "submission", subset="test")
        converted = convert_synapse(make_btcv(nnunet_env / "btcv2"), dataset_id=121)
        phantom = make_phantom_dataset(nnunet_env / "raw", 998, "Mode", num_train=1, num_test=0, shape=(16, 32, 32))
    finally:
        os.umask(old)
    for folder in (out, converted, Path(phantom)):
        assert oct(folder.stat().st_mode & 0o777) == oct(0o755), folder


def test_full_disk_while_writing_is_a_message_and_leaves_nothing(nnunet_env, synapse_predictions, capsys, monkeypatch):
    """A full disk while writing the submission or converting ended in a traceback (issue 29 item 13)."""
    import errno
    import os

    dataset, pred = synapse_predictions

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", lambda *a: (_ for _ in ()).throw(RuntimeError("nifti library failed")))
    code = main(["from-nnunet", "-p", str(pred), "-r", str(dataset), "-o", str(nnunet_env / "sub"), "--subset", "test"])
    assert_unusable(capsys, code, r"writing the submission into .* failed \(RuntimeError: nifti library failed\); is")
    assert not (nnunet_env / "sub").exists() and not list(nnunet_env.glob(".sub*"))
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(ConversionError, match=r"writing the dataset into .* failed \(OSError: .*No space left"):
        convert_synapse(make_btcv(nnunet_env / "btcv2"), dataset_id=121)
    assert not list((nnunet_env / "raw").glob("*121*"))

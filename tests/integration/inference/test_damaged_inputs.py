"""Damaged inputs, overwritten files and refusals (issue 17): prediction, evaluation and RadSAM's command line.

Item numbers refer to docs/bad_inputs.md. Prediction runs with nnU-Net's own predictor, preprocessing and export
around a one-layer network (:func:`_predictor`), so each case takes a fraction of a second; the command-line
refusals happen before any model is loaded, so they use a model folder that only has the files the checks read.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sam_testing import dataset_json, minimal_plans

from nnunet_sam.inference.predict import BadCaseError, read_and_check
from nnunet_sam.training import fault_tolerance
from nnunet_sam.training.synthetic_plans import nnunet_preprocessing

SHAPE = (16, 32, 32)  # (z, y, x)


# ---- helpers ------------------------------------------------------------------------------------------------------
def _predictor():
    """nnU-Net's predictor around a 1x1x1 convolution (1 channel 'CT', labels 0-2, patch 4x32x32, 3x1x1 mm)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = minimal_plans([4, 32, 32])
    plans["configurations"]["3d_fullres"].update(nnunet_preprocessing([3.0, 1.0, 1.0]))
    plans["configurations"]["3d_fullres"]["median_image_size_in_voxels"] = list(SHAPE)
    plans["foreground_intensity_properties_per_channel"] = {"0": {"mean": 0.0, "std": 1.0}}
    manager = PlansManager(plans)
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 3, 1)
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(
        network, manager, manager.get_configuration("3d_fullres"), [network.state_dict()], dataset_json(2), "x", None
    )
    return predictor


def _image(path: Path, seed: int = 0, spacing=(1.0, 1.0, 3.0)) -> Path:
    array = np.random.default_rng(seed).normal(0, 100, SHAPE).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _model_folder(root: Path, folds=("all",)) -> Path:
    """What the command-line checks read before a model is loaded: dataset.json, plans.json and intact fold
    checkpoints."""
    folder = root / "model"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(dataset_json(2)))
    (folder / "plans.json").write_text(json.dumps(minimal_plans([4, 32, 32])))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network_weights": {}}, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def _predict_main(capsys, *args: str) -> tuple[int, str]:
    from nnunet_sam.cli.predict import main

    with pytest.raises(SystemExit) as exit_:
        main([*args, "-f", "all", "-device", "cpu"])
    return exit_.value.code, capsys.readouterr().err


def _check(path: Path, case: str = "c") -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    read_and_check(case, [str(path)], SimpleITKIO(), ["CT"], model_is_3d=True)


# ---- 1. input and output folder the same ----------------------------------------------------------------------
def test_output_folder_that_would_overwrite_an_input_is_refused(tmp_path, capsys):
    from nnunet_sam.inference.predict import output_collisions

    folder = tmp_path / "x"
    _image(folder / "a_0000.nii.gz")  # case a_0000's mask would be a_0000.nii.gz: this file
    _image(folder / "a_0000_0000.nii.gz", seed=1)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, err = _predict_main(capsys, "-i", str(folder), "-o", str(folder), "-m", str(_model_folder(tmp_path)))
    assert code == 2
    assert "would overwrite input file(s) of this run" in err and f"{folder}/a_0000.nii.gz" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "an input changed"
    # a folder inside -i, or -i itself without colliding names, is fine
    from nnunet_sam.inference.predict import cases_in_folder

    cases, _ = cases_in_folder(str(folder), ".nii.gz")
    assert output_collisions(cases, str(folder / "out"), ".nii.gz", True) == []
    (folder / "a_0000_0000.nii.gz").unlink()
    cases, _ = cases_in_folder(str(folder), ".nii.gz")
    assert output_collisions(cases, str(folder), ".nii.gz", True) == []  # case 'a' writes a.nii.gz


# ---- 2. temporary files --------------------------------------------------------------------------------------
def test_checked_write_never_writes_through_a_planted_symlink(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_sam.inference.predict import write_checked

    reader = SimpleITKIO()
    _, properties = reader.read_images([str(_image(tmp_path / "ref.nii.gz"))])
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    out = tmp_path / "out"
    out.mkdir()
    for pid in range(os.getpid() - 5, os.getpid() + 5):  # the names older releases used
        os.symlink(victim, out / f".case.nii.gz.partial-{pid}.nii.gz")
    segmentation = np.random.default_rng(0).integers(0, 3, SHAPE).astype(np.uint8)
    write_checked("case", segmentation, reader, str(out / "case.nii.gz"), properties)
    assert victim.read_text() == "user data"
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz"))), segmentation)
    assert not [p for p in out.iterdir() if p.is_dir()], "temporary folder left"


def test_stale_partial_files_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    folder = tmp_path / "out"
    folder.mkdir()
    stale_dir = folder / f".a.nii.gz.partial-{dead.pid}-x1y2"
    stale_dir.mkdir()
    (stale_dir / "a.nii.gz").write_bytes(b"half")
    stale_file = folder / f".b.nii.gz.partial-{dead.pid}.nii.gz"
    stale_file.write_bytes(b"half")
    stale_link = folder / f".c.nii.gz.partial-{dead.pid}.nii.gz"
    os.symlink(victim, stale_link)
    live = folder / f".d.nii.gz.partial-{os.getpid()}-abcd"
    live.mkdir()
    user = folder / ".notes.partial"
    user.write_text("mine")
    # a user's files named like partial files, but not as this package names them (issue 29)
    user_files = [folder / f".notes.partial-{dead.pid}.txt", folder / f".a.nii.gz.partial-{dead.pid}-mine"]
    user_files[0].write_text("mine")
    user_files[1].mkdir()
    (user_files[1] / "other.txt").write_text("mine")
    removed = fault_tolerance.remove_stale_partial_files(folder)
    assert sorted(p.name for p in removed) == sorted([stale_dir.name, stale_file.name, stale_link.name])
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, user.name, *(p.name for p in user_files)])
    assert victim.read_text() == "user data"


# ---- 4, 7, 16. damaged NIfTI files ----------------------------------------------------------------------------
def _nibabel_variant(path: Path, kind: str) -> Path:
    image = nibabel.load(_image(path))
    data = np.asanyarray(image.dataobj)
    if kind == "zero_z_spacing":  # the header's pixdim[3] set to 0 in the file (nibabel would "fix" it when saving)
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[88:92] = np.float32(0).tobytes()  # pixdim[3]: bytes 76 + 3 * 4 of the NIfTI-1 header
        path.write_bytes(gzip.compress(bytes(raw)))
        return path
    elif kind == "nan_affine":
        affine = image.affine.copy()
        affine[0, 3] = np.nan
        out = nibabel.Nifti1Image(data, affine)
    elif kind == "integer_truncated":
        out = nibabel.Nifti1Image(data.astype(np.int16), image.affine)
    else:
        raise ValueError(kind)
    nibabel.save(out, path)
    return path


@pytest.mark.parametrize("kind", ["uncompressed_named_gz", "nifti2", "huge_finite"])
def test_readable_or_finite_files_get_the_right_message(tmp_path, kind):
    """Issue 29 item 14: an uncompressed NIfTI named .nii.gz was called cut short, a NIfTI-2 file "zero spacing",
    a finite 1e300 voxel NaN/inf."""
    path = tmp_path / "c_0000.nii.gz"
    image = nibabel.load(_image(tmp_path / "ref_0000.nii.gz"))
    data = np.asanyarray(image.dataobj)
    if kind == "uncompressed_named_gz":
        nibabel.save(nibabel.Nifti1Image(data, image.affine), tmp_path / "plain.nii")
        path.write_bytes((tmp_path / "plain.nii").read_bytes())
        with pytest.raises(BadCaseError, match=r"c_0000.nii.gz is named .gz but is not gzip-compressed"):
            _check(path)
    elif kind == "nifti2":
        nibabel.save(nibabel.Nifti2Image(data, image.affine), path)
        with pytest.raises(BadCaseError, match=r"c_0000.nii.gz is a NIfTI-2 file, which ITK .* cannot read"):
            _check(path)
    else:
        huge = data.astype(np.float64)
        huge[2, 3, 4] = 1e300
        nibabel.save(nibabel.Nifti1Image(huge, image.affine), path)
        with pytest.raises(BadCaseError, match=r"has 1 finite voxel\(s\) beyond float32's range \(up to 1e\+300"):
            _check(path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", r"c: .*c_0000.nii.gz is damaged: its compressed stream is incomplete"),
        ("integer_truncated", r"is damaged: its compressed stream is incomplete"),
        ("truncated_uncompressed", r"c_0000.nii is truncated: it holds \d+ bytes but its header describes \d+"),
        ("empty", r"c_0000.nii.gz is empty \(0 bytes\)"),
        ("zero_z_spacing", r"voxel spacing \[1.0, 1.0, 0.0\] \(pixdim\) .* zero"),
        ("nan_affine", r"non-finite \(NaN or inf\) affine"),
    ],
)
def test_damaged_nifti_is_refused_with_the_real_cause(tmp_path, kind, message):
    """Items 4, 7, 16: SimpleITK alone reads all of these: missing voxels as 0, zero spacing as 1 mm."""
    path = tmp_path / "c_0000.nii.gz"
    if kind == "truncated":
        _truncate(_image(path))
    elif kind == "integer_truncated":
        _truncate(_nibabel_variant(path, kind), 0.6)
    elif kind == "truncated_uncompressed":
        path = _truncate(_image(tmp_path / "c_0000.nii"), 0.7)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        _nibabel_variant(path, kind)
    with pytest.raises(BadCaseError, match=message):
        _check(path)


def test_gzip_stream_damaged_after_the_voxels_is_refused(tmp_path):
    """A cut in the gzip trailer (CRC and length) after every voxel: the stream is still incomplete."""
    path = _image(tmp_path / "c_0000.nii.gz")
    path.write_bytes(path.read_bytes()[:-4])
    with gzip.open(path) as f, pytest.raises(EOFError):
        f.read()
    with pytest.raises(BadCaseError, match="compressed stream is incomplete"):
        _check(path)


def test_zero_or_nan_spacing_from_a_reader_is_named(tmp_path):
    """Item 16 for readers other than NIfTI: the spacing, not 'a 2D image'."""
    from nnunet_sam.inference.predict import check_case

    image = np.zeros((1, *SHAPE), np.float32)
    for spacing in ([0.0, 1.0, 1.0], [float("nan"), 1.0, 1.0]):
        with pytest.raises(BadCaseError, match=r"c: the voxel spacing \[.*\] is zero, negative or not finite"):
            check_case("c", image, {"spacing": spacing}, ["CT"], model_is_3d=True)


# ---- 5, 13 (spacing 1e30), 18. per case in a folder ----------------------------------------------------------
def test_channel_numbers_spacing_and_probabilities_per_case(tmp_path, monkeypatch):
    """A lone CASE_0001 (item 5), spacing 1e30 (item 13), a full disk while saving probabilities (item 18)."""
    from nnunet_sam.inference.predict import cases_in_folder, predict_cases

    predictor = _predictor()
    folder, out = tmp_path / "in", tmp_path / "out"
    _image(folder / "good_0000.nii.gz")
    _image(folder / "lone_0001.nii.gz")
    _image(folder / "huge_0000.nii.gz", spacing=(1.0, 1.0, 1e30))
    cases, _ = cases_in_folder(str(folder), ".nii.gz")
    failures = predict_cases(predictor, cases, str(out), save_probabilities=True)
    assert sorted(failures) == ["huge", "lone"]
    assert "lone: channel file(s) _0001 but the model's dataset.json declares channel(s) 0000 (CT)" in failures["lone"]
    assert (
        "huge: the voxel spacing [1e+30, 1, 1] mm would resample the image of shape [16, 32, 32] to "
        "[5.33333e+30, 32, 32]" in failures["huge"]
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json",
        "good.nii.gz",
        "good.npz",
        "good.pkl",
        "plans.json",
    ]

    previous = (out / "good.npz").read_bytes()
    real_savez = np.savez_compressed

    def full_disk(file, **arrays):  # writes part of the file, then the disk is full
        real_savez(file, **arrays)
        with open(file, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    failures = predict_cases(predictor, {"good": cases["good"]}, str(out), save_probabilities=True)
    assert "good: the probabilities could not be written" in failures["good"] and "disk full" in failures["good"]
    assert (out / "good.npz").read_bytes() == previous, "the previous probabilities were damaged"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary file left"


def test_continue_with_probabilities_predicts_cases_that_have_none(tmp_path):
    """--continue_prediction --save_probabilities after a run without probabilities (issue 29, item 6): each case
    is predicted again for its .npz/.pkl, as nnU-Net does; with them all present it is skipped."""
    from nnunet_sam.inference.predict import cases_in_folder, predict_cases

    predictor = _predictor()
    folder, out = tmp_path / "in", tmp_path / "out"
    _image(folder / "a_0000.nii.gz")
    _image(folder / "b_0000.nii.gz", seed=1)
    cases, _ = cases_in_folder(str(folder), ".nii.gz")
    assert predict_cases(predictor, cases, str(out)) == {}
    assert predict_cases(predictor, cases, str(out), save_probabilities=True, overwrite=False) == {}
    assert {p.name for p in out.iterdir()} >= {"a.npz", "a.pkl", "b.npz", "b.pkl"}
    written = (out / "a.npz").stat().st_mtime_ns
    assert predict_cases(predictor, cases, str(out), save_probabilities=True, overwrite=False) == {}
    assert (out / "a.npz").stat().st_mtime_ns == written, "a complete case was predicted again"


def test_case_whose_segmentation_fails_leaves_no_probabilities(tmp_path, monkeypatch):
    """The segmentation is written first: when it fails, no .npz/.pkl is left either (issue 29, item 7)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_sam.inference.predict import cases_in_folder, predict_cases

    predictor = _predictor()
    folder, out = tmp_path / "in", tmp_path / "out"
    _image(folder / "a_0000.nii.gz")
    cases, _ = cases_in_folder(str(folder), ".nii.gz")

    def full_disk(self, seg, output_fname, properties):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SimpleITKIO, "write_seg", full_disk)
    failures = predict_cases(predictor, cases, str(out), save_probabilities=True)
    assert "a: the segmentation could not be written completely" in failures["a"]
    assert "Nothing was written for this case" in failures["a"]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "plans.json"]


# ---- 6. files of another format -----------------------------------------------------------------------------
def test_image_of_another_format_next_to_the_cases_is_reported(tmp_path):
    from nnunet_sam.inference.predict import other_format_files

    _image(tmp_path / "a_0000.nii.gz")
    _image(tmp_path / "a_0000.nii")
    (tmp_path / "notes.txt").write_text("x")
    assert other_format_files(str(tmp_path), ".nii.gz") == ["a_0000.nii"]


# ---- 12, 13. unusable arguments, before any model is loaded ----------------------------------------------------
def test_unusable_prediction_arguments_stop_with_exit_2(tmp_path, capsys):
    model = _model_folder(tmp_path)
    folder = tmp_path / "in"
    _image(folder / "a_0000.nii.gz")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")], "the input folder -i .*nowhere does not exist"),
        (["-i", str(folder), "-o", str(a_file)], "the output folder -o .*a_file is a file"),
        (["-i", str(folder), "-o", str(tmp_path / "o"), "-m", str(tmp_path)], "is not an nnU-Net model folder"),
    ]
    for args, message in cases:
        code, err = _predict_main(capsys, *args, *([] if "-m" in args else ["-m", str(model)]))
        assert code == 2 and re.search(message, err), err
    from nnunet_sam.cli.predict import main

    with pytest.raises(SystemExit) as exit_:
        main(["-i", str(folder), "-o", str(tmp_path / "o"), "-m", str(model), "-f", "3", "-device", "cpu"])
    assert exit_.value.code == 2
    assert "fold 3 was never trained" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_prediction_checkpoint_is_named_with_the_intact_ones(tmp_path, capsys, damage):
    model = _model_folder(tmp_path)
    fold = model / "fold_all"
    torch.save({"network_weights": {}}, fold / "checkpoint_best.pth")
    final = fold / "checkpoint_final.pth"
    final.write_bytes(b"") if damage == "empty" else _truncate(final)
    _image(tmp_path / "in" / "a_0000.nii.gz")
    code, err = _predict_main(capsys, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "-m", str(model))
    assert code == 2
    assert f"{final} is {'an empty (0-byte) file' if damage == 'empty' else 'damaged or truncated'}" in err
    assert "Intact checkpoints in" in err and "checkpoint_best.pth (choose one with -chk NAME)" in err


@pytest.mark.parametrize("error", [errno.EACCES, errno.ENOSPC])
def test_unwritable_output_folder_stops_before_anything_is_written(tmp_path, capsys, monkeypatch, error):
    """Read-only folder, 0 bytes free (simulated: the tests may run as root, who may write anywhere)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    _image(tmp_path / "in" / "a_0000.nii.gz")
    out = tmp_path / "o"
    code, err = _predict_main(capsys, "-i", str(tmp_path / "in"), "-o", str(out), "-m", str(_model_folder(tmp_path)))
    assert code == 2 and f"cannot write into the output folder -o {out}: {os.strerror(error)}" in err
    assert ("disk full" in err) == (error == errno.ENOSPC)
    assert list(out.iterdir()) == [], "something was left in the output folder"


def test_json_outputs_are_written_completely_or_not_at_all(tmp_path, monkeypatch):
    """0 bytes free when dataset.json is written: no 0-byte dataset.json is left behind."""
    path = tmp_path / "dataset.json"
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        fault_tolerance.write_text_file(path, "{}")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


# ---- 17. the real cause of a failed write ----------------------------------------------------------------------
def test_failed_write_names_its_real_cause(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_sam.inference.predict import write_checked

    class ReadOnly(SimpleITKIO):
        def write_seg(self, seg, output_fname, properties):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), output_fname)

    _, properties = SimpleITKIO().read_images([str(_image(tmp_path / "ref.nii.gz"))])
    with pytest.raises(BadCaseError, match=r"could not be written completely .*Permission denied") as error:
        write_checked("c", np.zeros(SHAPE, np.uint8), ReadOnly(), str(tmp_path / "c.nii.gz"), properties)
    assert "disk full" not in str(error.value)


# ---- 4, 10, 15. evaluation --------------------------------------------------------------------------------------
def _evaluation_folders(tmp_path: Path, prediction: np.ndarray, dtype=np.uint8) -> tuple[Path, Path, Path]:
    reference = np.zeros(SHAPE, np.uint8)
    reference[4:10, 8:20, 8:20] = 1
    for name, array in (("ref", reference), ("pred", prediction)):
        (tmp_path / name).mkdir()
        image = sitk.GetImageFromArray(array.astype(dtype))
        sitk.WriteImage(image, str(tmp_path / name / "a.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps(dataset_json(2)))
    return tmp_path / "ref", tmp_path / "pred", tmp_path / "dataset.json"


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("truncated", r"prediction: .*a.nii.gz is damaged: its compressed stream is incomplete"),
        ("empty", r"prediction: .*a.nii.gz is empty \(0 bytes\)"),
        ("nan", r"prediction .*a.nii.gz holds non-finite voxels \(NaN or inf\)"),
        ("fractional", r"prediction .*a.nii.gz holds fractional values \[0.5\]"),
        ("minus_one", r"prediction .*a.nii.gz contains label values \[-1\] that dataset.json does not define"),
    ],
)
def test_evaluation_refuses_damaged_and_non_label_predictions(tmp_path, problem, message):
    from nnunet_sam.evaluation.folders import EvaluationError, evaluate_folder

    prediction = np.zeros(SHAPE, np.float32)
    prediction[4:10, 8:20, 8:20] = 1
    dtype = np.int8 if problem == "minus_one" else np.float32
    if problem == "nan":
        prediction[0, 0, :5] = np.nan  # ITK reads NaN as 0, i.e. background
    elif problem == "fractional":
        prediction[0, 0, 0] = 0.5
    elif problem == "minus_one":
        prediction[0, 0, 0] = -1
    ref, pred, dataset = _evaluation_folders(tmp_path, prediction, dtype)
    if problem == "truncated":
        _truncate(pred / "a.nii.gz", 0.7)
    elif problem == "empty":
        (pred / "a.nii.gz").write_bytes(b"")
    with pytest.raises(EvaluationError, match=message):
        evaluate_folder(ref, pred, dataset)
    if problem == "nan":  # the whole pipeline agrees without the damage
        prediction[0, 0, :5] = 0
        (pred / "a.nii.gz").unlink()
        sitk.WriteImage(sitk.GetImageFromArray(prediction), str(pred / "a.nii.gz"))
        assert evaluate_folder(ref, pred, dataset)["mean"][1]["Dice"] == 1.0


# ---- 11, 14. RadSAM prompt files and arguments -----------------------------------------------------------------
@pytest.fixture
def geometry():
    from nnunet_sam.inference.radsam import Geometry

    properties = {
        "bbox_used_for_cropping": [[0, 10], [0, 32], [0, 32]],
        "shape_after_cropping_and_before_resampling": (10, 32, 32),
        "shape_before_cropping": (10, 32, 32),
        "sitk_stuff": {"spacing": (1.0, 1.0, 3.0), "origin": (0.0, 0.0, 0.0), "direction": np.eye(3).ravel()},
    }
    return Geometry(properties, (10, 32, 32))


POINT = {"kind": "point", "slice": 4, "point": [5, 5], "boundaries": [1, 8]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slice": 4.7}, r"the 'slice' of the point must be an integer slice index, got 4.7"),
        ({"slice": True}, r"the 'slice' of the point must be an integer slice index, got true"),
        ({"slice": float("nan")}, r"the 'slice' of the point must be an integer slice index, got NaN"),
        ({"point": ["5", 5]}, r"a voxel-space point \[y, x\] must be 2 finite numbers, got \[\"5\", 5\]"),
        ({"boundaries": ["1", 8]}, r"each of 'boundaries' must be an integer slice index, got \"1\""),
        ({"boundaries": [1.5, 8]}, r"each of 'boundaries' must be an integer slice index, got 1.5"),
        ({"corrections": {"point": [1, 1]}}, r"'corrections' must be a list of objects"),
        ({"corrections": [{"slice": 2, "point": [1, 1], "positive": "no"}]}, r"'positive' must be true or false"),
        ({"space": "world", "point": ["a", 0, 0]}, r"a world-space point \[x, y, z\] must be 3 finite numbers"),
        (
            {"corrections": [{"slice": 2, "point": [1, 1]}] * 100_000},
            r"100000 corrections; at most 40 are taken for a volume",
        ),
        # issue 29 item 15: the cost bound follows the volume (4 per slice: 40 for 10 slices, up to 4 x 10^2 decodes)
        (
            {"corrections": [{"slice": 2, "point": [1, 1]}] * 41},
            r"41 corrections; at most 40 are taken for a volume of 10 slices",
        ),
        # issue 29: a TypeError of numpy's isfinite before
        ({"slice": 10**30}, r"slice 1000000000000000000000000000000 lies outside the volume \(slices 0..9\)"),
        ({"slice": 10**400}, r"the 'slice' of the point must be an integer slice index, got 1000"),
        ({"point": [10**400, 5]}, r"a voxel-space point \[y, x\] must be 2 finite numbers"),
    ],
)
def test_bad_prompt_values_are_refused(tmp_path, geometry, change, message):
    from nnunet_sam.inference.radsam import PromptError, read_prompt_file

    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({**POINT, **change}))
    with pytest.raises(PromptError, match=message):
        read_prompt_file(str(path), geometry)


def test_corrections_up_to_four_per_slice_are_taken(tmp_path, geometry):
    from nnunet_sam.inference.radsam import read_prompt_file

    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({**POINT, "corrections": [{"slice": 2, "point": [1, 1]}] * 40}))
    assert len(read_prompt_file(str(path), geometry).corrections) == 40


def test_integral_float_slices_are_taken(tmp_path, geometry):
    from nnunet_sam.inference.radsam import read_prompt_file

    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({**POINT, "slice": 4.0, "boundaries": [1.0, 8]}))
    parsed = read_prompt_file(str(path), geometry)
    assert parsed.prompt.slice == 4 and parsed.boundaries == (1, 8)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label", "0"], r"--label 0 is the background"),
        (["--label", "300"], r"--label 300 is not a class of the model; its classes are \[1, 2\]"),
        (["--label", "-1"], r"--label -1 is not a class of the model"),
        (["-o", "IMAGE"], r"the output -o .* is an input of this run"),
        (["-o", "m.txt"], r"the output -o m.txt must end with .nii.gz: the mask is written in the image's format"),
    ],
)
def test_radsam_arguments_are_checked_before_the_model_is_loaded(tmp_path, capsys, args, message):
    from nnunet_sam.cli.segment_radsam import main

    image = _image(tmp_path / "c_0000.nii.gz")
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps(POINT))
    model = _model_folder(tmp_path, folds=(0,))
    args = [str(image) if a == "IMAGE" else a for a in args]
    output = [] if "-o" in args else ["-o", str(tmp_path / "mask.nii.gz")]
    with pytest.raises(SystemExit) as exit_:
        main(["-i", str(image), *output, "-m", str(model), "--prompt", str(prompt), *args])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert image.exists() and nibabel.load(image).shape == SHAPE[::-1]


# ---- RadSAM --start / --mask maps (issue 29 item 5) ----------------------------------------------------------------
def _radsam_map(path: Path, reference: Path, kind: str) -> Path:
    """A label map for ``reference`` (the liver box of the fixture's image), then damaged as ``kind`` says."""
    ref = sitk.ReadImage(str(reference))
    array = np.zeros(sitk.GetArrayFromImage(ref).shape, np.float32 if kind == "nan" else np.uint8)
    array[6:11, 24:40, 22:38] = 1
    if kind == "nan":
        array[8, 0, :4] = np.nan
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ref)
    if kind == "origin":
        image.SetOrigin(tuple(o + 25.0 for o in ref.GetOrigin()))
    sitk.WriteImage(image, str(path))
    if kind == "truncated":
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 4]))
    return path


@pytest.mark.parametrize(
    "kind,message",
    [
        ("truncated", r"start.nii.gz is truncated: it holds \d+ bytes but its header describes"),
        ("nan", r"start.nii.gz holds 4 non-finite voxel\(s\)"),
        ("origin", r"start.nii.gz: geometry of map and reference differ: .*origin"),
    ],
)
@pytest.mark.parametrize("option", ["--start", "--mask"])
def test_radsam_start_and_mask_maps_are_checked_like_evaluation_files(
    tmp_path, capsys, monkeypatch, kind, message, option
):
    """Before: a truncated map was read as zeros, NaN voxels accepted, a map with another origin accepted."""
    from nnunet_sam.cli.segment_radsam import main

    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    model = next((Path(__file__).parents[2] / "fixtures" / "saved_models").glob("*/RadSAMTrainer_tiny__*"))
    image = model / "image_0000.nii.gz"
    start = _radsam_map(tmp_path / "start.nii.gz", image, kind)
    prompt = tmp_path / "prompt.json"
    spec = {"boundaries": [4, 12]} if option == "--start" else {"kind": "mask", "slice": 8, "boundaries": [4, 12]}
    prompt.write_text(json.dumps(spec))
    output = tmp_path / "out.nii.gz"
    code = main(["-i", str(image), "-o", str(output), "-m", str(model), "--prompt", str(prompt), option, str(start)])
    assert code == 2
    assert re.search(rf"nnunet_sam_segment_radsam: error: .*{message}", capsys.readouterr().err)
    assert not output.exists()


@pytest.mark.parametrize("command", ["predict", "segment_radsam", "predict_prompted", "evaluate_pansam"])
def test_a_fold_that_is_no_number_is_a_usage_error(tmp_path, capsys, command):
    """``-f abc`` ended in a ValueError traceback (issue 29 item 13)."""
    import importlib

    main = importlib.import_module(f"nnunet_sam.cli.{command}").main
    args = {
        "predict": ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path)],
        "segment_radsam": ["-i", "x", "-o", "y", "-m", str(tmp_path), "--prompt", "p"],
        "predict_prompted": ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path), "--points", "p"],
        "evaluate_pansam": ["-m", str(tmp_path), "--data", "x", str(tmp_path), str(tmp_path), "-o", "o"],
    }[command]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "-f", "abc"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert re.search(r"argument -f.*'abc' is not a fold: give a number \(0, 1, \.\.\.\) or 'all'", err), err


def test_deeply_nested_prompt_and_points_files_are_refused(tmp_path, geometry):
    """JSON nested deeper than Python's stack ended in a RecursionError traceback (issue 29 item 13)."""
    from nnunet_sam.inference.prompted import UnusableInputError, read_points_file
    from nnunet_sam.inference.radsam import PromptError, read_prompt_file

    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PromptError, match=r"cannot read the prompt file .*deep.json: RecursionError"):
        read_prompt_file(str(path), geometry)
    with pytest.raises(UnusableInputError, match=r"the points file .*deep.json is not valid JSON"):
        read_points_file(str(path))


def test_huge_point_coordinates_are_named():
    """10**30 was a ufunc TypeError; it is a number (refused later as outside the image), 10**400 is not."""
    from nnunet_sam.inference.prompted import parse_case_points

    labels = {"background": 0, "organ": 1}
    positions, _ = parse_case_points("c", [{"position": [10**30, 1, 2], "label": 1}], labels)
    assert positions.tolist() == [[1e30, 1.0, 2.0]]
    with pytest.raises(BadCaseError, match=r"c: point 0: expected \{\"position\": \[three finite numbers\]"):
        parse_case_points("c", [{"position": [10**400, 1, 2], "label": 1}], labels)


def test_longest_case_name_is_predicted(tmp_path):
    """A 243-character case name (its channel file has 255, the file system's limit) was refused as "File name too
    long" because of the package's own staging folder name (issue 29 item 14)."""
    from nnunet_sam.inference.predict import cases_in_folder, predict_cases

    case = "c" * 243
    folder, out = tmp_path / "in", tmp_path / "out"
    _image(folder / f"{case}_0000.nii.gz")
    cases, _ = cases_in_folder(str(folder), ".nii.gz")
    assert predict_cases(_predictor(), cases, str(out), save_probabilities=True) == {}
    assert {p.name for p in out.iterdir()} == {
        "dataset.json",
        "plans.json",
        *(case + e for e in (".nii.gz", ".npz", ".pkl")),
    }
    # what a killed run leaves for such a name is still recognised as the package's own
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".{case[:200]}.partial-{dead.pid}-abcdefgh"
    stale.mkdir()
    (stale / f"{case}.nii.gz").write_bytes(b"half")
    assert fault_tolerance.remove_stale_partial_files(out) == [stale]


def test_unwritable_outputs_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """``nnunet_sam_evaluate -o FILE`` failed after the whole evaluation; ``make_phantom --raw FILE`` with a
    traceback (issue 29 item 13)."""
    from nnunet_sam.cli import evaluate, make_phantom

    reference, prediction, dataset = _evaluation_folders(tmp_path, np.zeros(SHAPE, np.uint8))
    taken = tmp_path / "taken.txt"
    taken.write_text("a file")
    ran = []
    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a: ran.append(a))
    code = evaluate.main(["-ref", str(reference), "-pred", str(prediction), "-djfile", str(dataset), "-o", str(taken)])
    assert code == 2 and not ran
    assert (
        f"nnunet_sam_evaluate: error: the output folder -o: {taken} is a file, not a folder" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_:
        make_phantom.main(["--raw", str(taken), "--id", "990"])
    assert exit_.value.code == 2 and f"--raw / $nnUNet_raw: {taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "a file"

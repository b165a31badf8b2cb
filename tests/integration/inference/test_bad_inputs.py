"""Bad inputs: each is predicted correctly or refused with a message naming the case and the problem.

The checks of every prediction case run by default on files written here; tests that predict (marked slow) use a
model folder: what nnU-Net's trainer writes (plans.json, dataset.json, fold_all/checkpoint_final.pth from
``save_checkpoint``) for ``MaskSAMTrainer_tiny`` on a 2-case phantom dataset, freshly initialised (0 epochs): the
segmentations are meaningless, but reading, checking, padding, cropping and geometry are what is tested. It is
built once in a subprocess, because nnU-Net reads its folder variables at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sam_testing import REPO, TESTS

DATASET = 991
PATCH = (4, 32, 32)  # what the tiny patch rule derives from this dataset's plans


def _build_model_folder(root: Path) -> None:
    """Phantom dataset -> fingerprint, plans, preprocessing -> trainer.initialize() -> checkpoint_final.pth."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    from nnunet_sam.demo.phantoms import make_phantom_dataset
    from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny

    make_phantom_dataset(root / "raw", DATASET, "Bad", num_train=2, num_test=0, shape=(16, 32, 32), num_organs=2)
    extract_fingerprints([DATASET], num_processes=1, check_dataset_integrity=True)
    plan_experiments([DATASET])
    preprocess([DATASET], configurations=("3d_fullres",), num_processes=(1,))
    preprocessed = root / "preprocessed" / "Dataset991_Bad"
    plans = load_json(preprocessed / "nnUNetPlans.json")
    plans["continue_training"] = False  # what nnUNetv2_train adds
    trainer = MaskSAMTrainer_tiny(
        plans, "3d_fullres", "all", load_json(preprocessed / "dataset.json"), torch.device("cpu")
    )
    trainer.initialize()
    trainer.get_tr_and_val_datasets()  # runs nnunet_sam.training.dataset_checks on the real preprocessed files
    os.makedirs(trainer.output_folder, exist_ok=True)
    # what nnUNetTrainer.on_train_start and the end of training write
    save_json(trainer.plans_manager.plans, os.path.join(trainer.output_folder_base, "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, os.path.join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, one training image) in a fresh nnU-Net workspace."""
    root = tmp_path_factory.mktemp("bad_inputs")
    env = dict(os.environ, OMP_NUM_THREADS="1", nnUNet_compile="f")
    env.update({var: str(root / var.split("_")[1]) for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    env.pop("nnUNet_SAM_checkpoints", None)
    # this file runs as a script below: its helpers (sam_testing) must be importable there too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, __file__, str(root)],
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    folder = root / "results" / "Dataset991_Bad" / "MaskSAMTrainer_tiny__nnUNetPlans__3d_fullres"
    image = root / "raw" / "Dataset991_Bad" / "imagesTr" / "case_000_0000.nii.gz"
    return folder, image


@pytest.fixture(scope="module")
def predictor(model):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model[0]), ("all",), "checkpoint_final.pth")
    return predictor


def _write(folder: Path, name: str, array: np.ndarray, like: sitk.Image, **geometry) -> Path:
    """Write ``array`` as ``folder/name`` with the geometry of ``like`` (overridden by spacing/origin/direction)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        image.SetSpacing(geometry.get("spacing", like.GetSpacing()))
        image.SetOrigin(geometry.get("origin", like.GetOrigin()))
        image.SetDirection(geometry.get("direction", like.GetDirection()))
    sitk.WriteImage(image, str(folder / name))
    return folder / name


def _cases(folder: Path) -> dict[str, list[str]]:
    from nnunet_sam.inference.predict import cases_in_folder

    cases, misnamed = cases_in_folder(str(folder), ".nii.gz")
    assert not misnamed
    return cases


def _bad_case(kind: str, array: np.ndarray, like: sitk.Image, folder: Path) -> None:
    """Write the case ``kind`` (its name) into ``folder``."""
    if kind == "two_channels":  # the model has one (CT)
        _write(folder, f"{kind}_0000.nii.gz", array, like)
        _write(folder, f"{kind}_0001.nii.gz", array, like)
    elif kind == "image_2d":
        _write(folder, f"{kind}_0000.nii.gz", array[5], like)
    elif kind == "nan_voxels":
        array = array.copy()
        array[3, 10:12, 10:12] = np.nan
        _write(folder, f"{kind}_0000.nii.gz", array, like)
    elif kind == "infinite_voxels":
        array = array.copy()
        array[1, 1, 1] = np.inf
        _write(folder, f"{kind}_0000.nii.gz", array, like)
    elif kind == "sheared_direction":  # SimpleITK cannot write one (it makes the matrix orthogonal): nibabel
        path = _write(folder, f"{kind}_0000.nii.gz", array, like)
        affine = nibabel.load(path).affine.copy()
        affine[0, 1] += 0.3
        sheared = nibabel.Nifti1Image(array.transpose(2, 1, 0), affine)
        sheared.set_sform(affine, 1)
        nibabel.save(sheared, path)
    else:
        raise ValueError(kind)


BAD_CASES = {
    "two_channels": "2 channel(s) but the model expects 1 (CT)",
    "image_2d": "a 2D image (one slice of 32x32) given to a 3D model",
    "nan_voxels": "non-finite voxels (NaN or inf): nan_voxels_0000.nii.gz: 4",  # SimpleITK alone would read 0s
    "infinite_voxels": "non-finite voxels (NaN or inf): infinite_voxels_0000.nii.gz: 1",
    "sheared_direction": "non-orthogonal (sheared) affine",
}


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_case_is_refused_naming_the_case_and_the_problem(kind, tmp_path):
    """The checks nnunet_sam_predict runs on every case, with nnU-Net's SimpleITK reader, for a 1-channel 3D model."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_sam.inference.predict import BadCaseError, read_and_check

    like = sitk.Image(32, 32, 16, sitk.sitkInt16)
    like.SetSpacing((1.0, 1.0, 3.0))
    array = np.random.default_rng(0).normal(0, 100, (16, 32, 32)).astype(np.float32)
    _bad_case(kind, array, like, tmp_path)
    files = _cases(tmp_path)[kind]
    with pytest.raises(BadCaseError) as error:
        read_and_check(kind, files, SimpleITKIO(), ["CT"], model_is_3d=True)
    assert str(error.value).startswith(f"{kind}: ") and BAD_CASES[kind] in str(error.value), str(error.value)
    _write(tmp_path / "good", "good_0000.nii.gz", array, like)
    image, _ = read_and_check("good", _cases(tmp_path / "good")["good"], SimpleITKIO(), ["CT"], model_is_3d=True)
    assert image.shape == (1, 16, 32, 32)


@pytest.mark.slow
def test_small_oblique_volume_is_padded_cropped_back_and_keeps_its_geometry(model, predictor, tmp_path):
    """2 x 20 x 20 voxels (patch 4 x 32 x 32), rotated axes, anisotropic spacing, far origin."""
    from nnunet_sam.inference.predict import predict_cases

    like = sitk.ReadImage(str(model[1]))
    small = sitk.GetArrayFromImage(like)[:2, :20, :20].astype(np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    geometry = {"spacing": (0.8, 0.9, 2.5), "origin": (-120.0, 33.0, 410.0), "direction": (1, 0, 0, 0, c, -s, 0, s, c)}
    _write(tmp_path / "in", "small_0000.nii.gz", small, like, **geometry)
    assert predict_cases(predictor, _cases(tmp_path / "in"), str(tmp_path / "out")) == {}
    seg = sitk.ReadImage(str(tmp_path / "out" / "small.nii.gz"))
    assert sitk.GetArrayFromImage(seg).shape == small.shape
    np.testing.assert_allclose(seg.GetSpacing(), geometry["spacing"], atol=1e-5)
    np.testing.assert_allclose(seg.GetOrigin(), geometry["origin"], atol=1e-4)
    np.testing.assert_allclose(seg.GetDirection(), geometry["direction"], atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}


@pytest.mark.slow
def test_extreme_intensities_are_clipped_by_ct_normalisation(model, predictor, tmp_path):
    """+-1e30 HU: nnU-Net's CT normalisation clips to the training percentiles, so the prediction is defined."""
    from nnunet_sam.inference.predict import predict_cases

    like = sitk.ReadImage(str(model[1]))
    array = sitk.GetArrayFromImage(like).astype(np.float32)
    array[0, :5] = 1e30
    array[1, :5] = -1e30
    _write(tmp_path / "in", "extreme_0000.nii.gz", array, like)
    assert predict_cases(predictor, _cases(tmp_path / "in"), str(tmp_path / "out"), save_probabilities=True) == {}
    probabilities = np.load(tmp_path / "out" / "extreme.npz")["probabilities"]
    assert np.isfinite(probabilities).all()
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "extreme.nii.gz"))).shape == array.shape


@pytest.mark.slow
def test_folder_with_bad_cases_predicts_the_others_and_exits_non_zero(model, tmp_path, capsys):
    from nnunet_sam.cli.predict import main

    like = sitk.ReadImage(str(model[1]))
    array = sitk.GetArrayFromImage(like).astype(np.float32)
    folder = tmp_path / "in"
    _write(folder, "a_good_0000.nii.gz", array, like)
    _bad_case("nan_voxels", array, like, folder)
    _write(folder, "z_good_0000.nii.gz", array[::-1].copy(), like)
    _write(folder, "no_channel_suffix.nii.gz", array, like)
    code = main(
        ["-i", str(folder), "-o", str(tmp_path / "out"), "-m", str(model[0]), "-f", "all"]
        + ["-device", "cpu", "--disable_tta"]
    )
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a_good.nii.gz", "z_good.nii.gz"]
    err = capsys.readouterr().err
    assert "2 case(s) failed" in err
    assert "nan_voxels: non-finite voxels" in err and "no_channel_suffix.nii.gz: not named CASE_XXXX" in err


# ---- training data ------------------------------------------------------------------------------------------------
class _Dataset:
    """nnU-Net's dataset interface (load_case -> data, seg, seg_prev, properties) over in-memory cases."""

    def __init__(self, **segs: np.ndarray) -> None:
        self.segs = segs
        self.identifiers = sorted(segs)

    def load_case(self, identifier: str):
        seg = self.segs[identifier]
        locations = {c: np.argwhere(seg == c)[:5] for c in (1, 2)}  # preprocessing samples declared classes only
        return None, seg, None, {"class_locations": locations}


LABELS = {"background": 0, "liver": 1, "spleen": 2}


def _seg(*values: int) -> np.ndarray:
    seg = np.zeros((1, 4, 8, 8), dtype=np.int8)
    seg[0, 0, 0, 0] = -1  # outside the nonzero mask: allowed
    for i, v in enumerate(values):
        seg[0, 1, i, :] = v
    return seg


def test_training_data_with_undeclared_label_values_is_refused():
    from nnunet_sam.training.dataset_checks import TrainingDataError, check_training_data

    with pytest.raises(TrainingDataError, match=r"2 case\(s\) \(b: \[7\]; c: \[3\]\)"):
        check_training_data(_Dataset(a=_seg(1, 2), b=_seg(1, 7)), _Dataset(c=_seg(2, 3)), LABELS)


def test_class_absent_everywhere_is_refused_and_absent_from_the_fold_is_a_warning():
    from nnunet_sam.training.dataset_checks import TrainingDataError, check_training_data

    with pytest.raises(TrainingDataError, match=r"spleen \(2\) of dataset.json never occur"):
        check_training_data(_Dataset(a=_seg(1)), _Dataset(b=_seg(1)), LABELS)
    warnings = check_training_data(_Dataset(a=_seg(1)), _Dataset(b=_seg(1, 2)), LABELS)
    assert warnings == [
        "Class spleen (2) does not occur in the training cases of this fold (only in its validation cases)"
    ]
    assert check_training_data(_Dataset(a=_seg(1, 2), b=_seg(2)), _Dataset(), LABELS) == []


# ---- loading ------------------------------------------------------------------------------------------------------
def test_package_never_unpickles_files():
    """Every torch.load of the package passes weights_only=True; no pickle, joblib or np.load(allow_pickle=True)."""
    import re

    root = REPO
    sources = [
        p
        for d in ("nnunet_sam", "trainers", "network_architectures", "dataset_conversion")
        for p in (root / d).rglob("*.py")
    ]
    assert len(sources) > 20
    loads = 0
    for path in sources:
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(", text):
            loads += 1
            args = text[call.end() : text.index("\n", call.end())]
            assert "weights_only=True" in args, f"{path.name}: torch.load without weights_only=True: {args}"
        for pattern in (
            r"^\s*import pickle",
            r"^\s*from pickle import (?!UnpicklingError\b)",  # its exception may be caught
            r"\bjoblib\b",
            r"allow_pickle\s*=\s*True",
            r"load_pickle",
        ):
            assert not re.search(pattern, text, re.M), f"{path.relative_to(root)} matches {pattern}"
    assert loads >= 1  # the SAM checkpoint loader


if __name__ == "__main__":
    _build_model_folder(Path(sys.argv[1]))


def _written_case(tmp_path: Path) -> tuple[np.ndarray, dict]:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image = sitk.GetImageFromArray(np.zeros((6, 8, 10), np.float32))
    image.SetSpacing((0.8, 0.7, 3.0))
    image.SetOrigin((1.0, -2.0, 5.0))
    sitk.WriteImage(image, str(tmp_path / "ref.nii.gz"))
    _, properties = SimpleITKIO().read_images([str(tmp_path / "ref.nii.gz")])
    segmentation = np.random.default_rng(0).integers(0, 4, size=(6, 8, 10)).astype(np.uint8)
    return segmentation, properties


def test_write_checked_writes_an_exact_copy_and_leaves_no_temporary_file(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_sam.inference.predict import write_checked

    segmentation, properties = _written_case(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    write_checked("case1", segmentation, SimpleITKIO(), str(out / "case1.nii.gz"), properties)
    assert os.listdir(out) == ["case1.nii.gz"]
    written = sitk.ReadImage(str(out / "case1.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(written), segmentation)
    assert written.GetSpacing() == pytest.approx((0.8, 0.7, 3.0)) and written.GetOrigin() == pytest.approx((1, -2, 5))


@pytest.mark.parametrize("failure", ["truncated", "raises"])
def test_write_checked_refuses_an_incomplete_write_and_keeps_the_old_file(failure, tmp_path):
    """A full disk: ITK's NIfTI writer prints an error but leaves a truncated file (or, for other writers, raises)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_sam.inference.predict import BadCaseError, write_checked

    class FullDiskIO(SimpleITKIO):
        def write_seg(self, seg, output_fname, properties):
            if failure == "raises":
                raise OSError(28, "No space left on device")
            super().write_seg(seg, output_fname, properties)
            size = os.path.getsize(output_fname)
            with open(output_fname, "r+b") as f:  # what a full disk leaves behind
                f.truncate(size // 2)

    segmentation, properties = _written_case(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "case1.nii.gz").write_bytes(b"previous prediction")
    with pytest.raises(BadCaseError, match=r"case1: the segmentation could not be written completely .* disk full"):
        write_checked("case1", segmentation, FullDiskIO(), str(out / "case1.nii.gz"), properties)
    assert os.listdir(out) == ["case1.nii.gz"]  # no temporary file left
    assert (out / "case1.nii.gz").read_bytes() == b"previous prediction"

"""Tests for the synthetic phantom dataset generator (nnunet_sam.demo.phantoms)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_sam.cli.make_phantom import main
from nnunet_sam.demo import phantoms
from nnunet_sam.demo.phantoms import (
    MAX_ORGANS,
    MIN_SHAPE,
    ORGAN_NAMES,
    generate_case,
    make_phantom_dataset,
    phantom_origin,
)

SMALL = {"num_train": 2, "num_test": 1, "shape": (16, 48, 48)}

# small datasets on purpose; the "fewer than 5 training cases" warning is tested once explicitly
pytestmark = pytest.mark.filterwarnings("ignore:num_train=.*:UserWarning")


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _all_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(folder)): _read(p)
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
        for p in sorted((folder / sub).glob("*.nii.gz"))
    }


def test_same_seed_identical_different_seed_differs(tmp_path: Path) -> None:
    a = make_phantom_dataset(tmp_path / "a", seed=3, num_channels=2, **SMALL)
    b = make_phantom_dataset(tmp_path / "b", seed=3, num_channels=2, **SMALL)
    c = make_phantom_dataset(tmp_path / "c", seed=4, num_channels=2, **SMALL)
    arrays_a, arrays_b, arrays_c = _all_arrays(a), _all_arrays(b), _all_arrays(c)
    assert len(arrays_a) == 3 * 3  # 3 cases x (2 channels + label)
    assert arrays_a.keys() == arrays_b.keys() == arrays_c.keys()
    for key in arrays_a:
        assert arrays_a[key].dtype == arrays_b[key].dtype
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key])
    images = [k for k in arrays_a if k.startswith("images")]
    assert all(not np.array_equal(arrays_a[k], arrays_c[k]) for k in images)
    labels = [k for k in arrays_a if k.startswith("labels")]
    assert any(not np.array_equal(arrays_a[k], arrays_c[k]) for k in labels)


def test_generate_case_deterministic_and_cases_differ() -> None:
    (img1,), lab1 = generate_case((16, 48, 48), 4, 1, seed=0, case_index=1)
    (img2,), lab2 = generate_case((16, 48, 48), 4, 1, seed=0, case_index=1)
    (img3,), lab3 = generate_case((16, 48, 48), 4, 1, seed=0, case_index=2)
    np.testing.assert_array_equal(img1, img2)
    np.testing.assert_array_equal(lab1, lab2)
    assert not np.array_equal(lab1, lab3)


@pytest.mark.parametrize("shape", [(24, 96, 96), MIN_SHAPE])
def test_every_organ_present_thick_and_mostly_kept(shape: tuple[int, int, int]) -> None:
    for seed in range(3):
        for case in range(8):
            channels, label = generate_case(shape, MAX_ORGANS, 2, seed=seed, case_index=case)
            assert label.dtype == np.uint8 and label.shape == shape
            assert set(np.unique(label)) == set(range(MAX_ORGANS + 1))
            for c in channels:
                assert c.shape == shape and np.isfinite(c).all()
            for organ in range(1, MAX_ORGANS + 1):
                slices = int((label == organ).any(axis=(1, 2)).sum())
                assert slices >= 3, (ORGAN_NAMES[organ - 1], seed, case, slices)


def test_organs_have_distinct_ct_intensities_and_ct_like_range() -> None:
    (ct,), label = generate_case((24, 96, 96), MAX_ORGANS, 1, seed=1, case_index=0)
    assert ct.dtype == np.int16
    assert -1100 < np.median(ct[label == 0]) < 100  # air and body
    assert ct.min() < -900  # air present
    means = [float(np.median(ct[label == i])) for i in range(1, MAX_ORGANS + 1)]
    assert all(50 <= m <= 270 for m in means), means
    assert len({round(m / 20) for m in means}) == len(means), means  # clearly different intensities
    corner_air = ct[:, :6, :6].astype(float)  # far from the body: pure air plus noise
    assert abs(corner_air.mean() - (-1000)) < 5
    assert 15 < corner_air.std() < 25


def test_dataset_layout_spacing_origin_and_json(tmp_path: Path) -> None:
    spacing = (2.5, 0.8, 0.7)
    shape = (16, 40, 48)
    folder = make_phantom_dataset(
        tmp_path,
        dataset_id=5,
        name="Tiny",
        num_train=3,
        num_test=2,
        shape=shape,
        spacing=spacing,
        num_organs=3,
    )
    assert folder == tmp_path / "Dataset005_Tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset005_Tiny"]  # no temporary leftovers
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"case_00{i}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"case_00{i}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [
        "case_003_0000.nii.gz",
        "case_004_0000.nii.gz",
    ]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["case_003.nii.gz", "case_004.nii.gz"]

    expected_origin = phantom_origin(shape, spacing)
    assert any(abs(o) > 1 for o in expected_origin)
    for path in sorted(folder.glob("*/*.nii.gz")):
        img = sitk.ReadImage(str(path))
        assert img.GetSize() == shape[::-1]
        np.testing.assert_allclose(img.GetSpacing(), spacing[::-1], rtol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), expected_origin, atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel())
        if path.parent.name.startswith("labels"):
            assert set(np.unique(sitk.GetArrayFromImage(img))) == {0, 1, 2, 3}

    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "liver": 1, "spleen": 2, "aorta": 3}
    assert dj["numTraining"] == 3
    assert dj["file_ending"] == ".nii.gz"


def test_second_channel(tmp_path: Path) -> None:
    folder = make_phantom_dataset(tmp_path, num_channels=2, **SMALL)
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT", "1": "T2"}
    for sub, n in (("imagesTr", 2), ("imagesTs", 1)):
        names = sorted(p.name for p in (folder / sub).iterdir())
        assert len(names) == 2 * n
        assert sum(name.endswith("_0001.nii.gz") for name in names) == n
    ct = _read(folder / "imagesTr" / "case_000_0000.nii.gz")
    mr = _read(folder / "imagesTr" / "case_000_0001.nii.gz")
    label = _read(folder / "labelsTr" / "case_000.nii.gz")
    assert ct.shape == mr.shape == label.shape
    assert mr.min() >= 0  # magnitude image, different contrast
    assert not np.allclose(np.corrcoef(ct.ravel(), mr.ravel())[0, 1], 1.0, atol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_organs": 0}, "num_organs"),
        ({"num_organs": MAX_ORGANS + 1}, "num_organs"),
        ({"shape": (8, 96, 96)}, "too small"),
        ({"shape": (24, 96)}, "shape"),
        ({"spacing": (3.0, 0.0, 1.0)}, "spacing"),
        ({"num_channels": 3}, "num_channels"),
        ({"num_train": 0}, "num_train"),
        ({"num_test": -1}, "num_test"),
        ({"dataset_id": 1000}, "dataset_id"),
        ({"name": "bad/name"}, "name"),
        ({"seed": -1}, "seed"),
    ],
)
def test_argument_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_phantom_dataset(tmp_path, **{**SMALL, **kwargs})
    assert not any(tmp_path.iterdir())


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    folder = make_phantom_dataset(tmp_path, seed=0, **SMALL)
    before = _read(folder / "imagesTr" / "case_000_0000.nii.gz")
    with pytest.raises(ValueError, match="--overwrite"):
        make_phantom_dataset(tmp_path, seed=1, **SMALL)
    np.testing.assert_array_equal(_read(folder / "imagesTr" / "case_000_0000.nii.gz"), before)
    again = make_phantom_dataset(tmp_path, seed=1, overwrite=True, **SMALL)
    assert again == folder
    assert not np.array_equal(_read(folder / "imagesTr" / "case_000_0000.nii.gz"), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_warns_about_too_few_training_cases(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="5-fold"):
        make_phantom_dataset(tmp_path, num_train=4, num_test=0, shape=(16, 32, 32))


def test_duplicate_id_with_other_name_rejected(tmp_path: Path) -> None:
    make_phantom_dataset(tmp_path, name="A", **SMALL)
    with pytest.raises(ValueError, match="unique"):
        make_phantom_dataset(tmp_path, name="B", **SMALL)


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = phantoms._write
    calls = {"n": 0}

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full (simulated)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(phantoms, "_write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        make_phantom_dataset(tmp_path, **SMALL)
    assert calls["n"] == 4
    assert list(tmp_path.iterdir()) == []


def test_failure_during_overwrite_keeps_old_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_phantom_dataset(tmp_path, seed=0, **SMALL)
    before = _all_arrays(folder)

    def broken_json(*args, **kwargs):
        raise RuntimeError("json writer broke (simulated)")

    import nnunetv2.dataset_conversion.generate_dataset_json as gdj

    monkeypatch.setattr(gdj, "generate_dataset_json", broken_json)
    with pytest.raises(RuntimeError, match="simulated"):
        make_phantom_dataset(tmp_path, seed=1, overwrite=True, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    after = _all_arrays(folder)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--raw", str(tmp_path), "--id", "7", "--name", "Cli", "--num-train", "2", "--num-test", "1",
                 "--shape", "16", "32", "40", "--spacing", "2", "1", "1", "--channels", "2", "--organs", "6",
                 "--seed", "5"]) == 0  # fmt: skip
    folder = tmp_path / "Dataset007_Cli"
    assert str(folder) in capsys.readouterr().out
    img = sitk.ReadImage(str(folder / "imagesTr" / "case_000_0001.nii.gz"))
    assert img.GetSize() == (40, 32, 16)
    assert img.GetSpacing() == (1.0, 1.0, 2.0)
    assert len(json.loads((folder / "dataset.json").read_text())["labels"]) == 7

    with pytest.raises(SystemExit):  # exists, no --overwrite
        main(["--raw", str(tmp_path), "--id", "7", "--name", "Cli", "--shape", "16", "32", "40"])
    assert "--overwrite" in capsys.readouterr().err

    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit):
        main([])
    assert "nnUNet_raw" in capsys.readouterr().err

    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "fromenv"))
    assert main(["--num-train", "1", "--num-test", "0", "--shape", "16", "32", "32"]) == 0
    assert (tmp_path / "fromenv" / "Dataset990_Phantom" / "labelsTr" / "case_000.nii.gz").is_file()

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--overwrite" in capsys.readouterr().out


@pytest.mark.e2e
def test_nnunet_plan_and_preprocess_accepts_dataset(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    if not exe.is_file():
        pytest.skip("nnUNetv2_plan_and_preprocess not installed next to the interpreter")
    raw = tmp_path / "raw"
    make_phantom_dataset(raw, dataset_id=991, num_train=3, num_test=1, shape=(16, 48, 48), num_channels=2)
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(raw),
        nnUNet_preprocessed=str(tmp_path / "preprocessed"),
        nnUNet_results=str(tmp_path / "results"),
    )
    cmd = [str(exe), "-d", "991", "-c", "3d_fullres", "--verify_dataset_integrity", "-np", "2", "-npfp", "2",
           "--no_pbar"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plans = json.loads((tmp_path / "preprocessed" / "Dataset991_Phantom" / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [3.0, 1.0, 1.0]
    assert cfg["normalization_schemes"] == ["CTNormalization", "ZScoreNormalization"]
    preprocessed = tmp_path / "preprocessed" / "Dataset991_Phantom" / "nnUNetPlans_3d_fullres"
    assert len(list(preprocessed.iterdir())) >= 3


def test_failed_swap_restores_old_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_phantom_dataset(tmp_path, seed=0, **SMALL)
    before = _all_arrays(folder)
    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # 1: old dataset moved aside, 2: new dataset moved into place
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(phantoms.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated"):
        make_phantom_dataset(tmp_path, seed=1, overwrite=True, **SMALL)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    after = _all_arrays(folder)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)

"""Tumour-protocol converters (KiTS21, LiTS17, MSD-Colon, MSD-Pancreas tumour only) on tiny synthetic downloads."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conversion_testing import assert_unusable, make_msd_pancreas, volume, write
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_sam.dataset_conversion import tumour
from nnunet_sam.dataset_conversion.common import RECORD_FILE, ConversionError, split_fractions
from nnunet_sam.dataset_conversion.tumour import PROTOCOLS, convert_tumour, main


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch) -> Path:
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    fork = multiprocessing.get_context("fork")  # nnU-Net's spawn pool re-imports torch per worker (slow)
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: fork)
    return tmp_path


def make_kits21(root: Path, n: int = 10) -> tuple[Path, dict[str, Path]]:
    """KiTS21 ``data/case_XXXXX/imaging.nii.gz`` + ``aggregated_MAJ_seg.nii.gz`` (1 kidney, 2 tumour, 3 cyst)."""
    labels = {}
    for k in range(n):
        case = root / f"case_{k * 3:05d}"
        write(volume(k), case / "imaging.nii.gz")
        labels[case.name] = write(volume(200 + k, values=3), case / "aggregated_MAJ_seg.nii.gz")
        write(volume(400 + k, values=3), case / "segmentations" / "kidney_instance-1_annotation-1.nii.gz")
    return root, labels


def make_lits17(root: Path, n: int = 10) -> tuple[Path, dict[str, Path]]:
    """LiTS ``Training Batch 1|2/volume-N.nii`` + ``segmentation-N.nii`` (1 liver, 2 tumour), uncompressed."""
    labels = {}
    for k in range(n):
        batch = root / ("Training Batch 1" if k < n // 2 else "Training Batch 2")
        write(volume(k), batch / f"volume-{k}.nii")
        labels[f"lits_{k:03d}"] = write(volume(200 + k, values=2), batch / f"segmentation-{k}.nii")
    return root, labels


def make_msd_colon(root: Path, n: int = 10) -> tuple[Path, dict[str, Path]]:
    """MSD ``Task10_Colon``: imagesTr/labelsTr (1 colon cancer), imagesTs, and the tar's macOS ``._`` files."""
    task = root / "Task10_Colon"
    labels = {}
    for k in range(n):
        case = f"colon_{k * 2 + 1:03d}"
        write(volume(k), task / "imagesTr" / f"{case}.nii.gz")
        labels[case] = write(volume(200 + k, values=1), task / "labelsTr" / f"{case}.nii.gz")
        (task / "labelsTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    write(volume(99), task / "imagesTs" / "colon_002.nii.gz")
    return task, labels


def make_pancreas(root: Path, n: int = 10) -> tuple[Path, dict[str, Path]]:
    task = make_msd_pancreas(root, n=n)
    return task, {p.name[: -len(".nii.gz")]: p for p in (task / "labelsTr").glob("pancreas_*.nii.gz")}


LAYOUTS = {"kits21": make_kits21, "lits17": make_lits17, "msd_colon": make_msd_colon, "msd_pancreas": make_pancreas}


@pytest.mark.parametrize("protocol", sorted(LAYOUTS))
def test_tumour_only_70_10_20(nnunet_env, protocol):
    source, labels = LAYOUTS[protocol](nnunet_env / "download")
    out = convert_tumour(protocol, source, seed=7, split_kind="random")
    spec = PROTOCOLS[protocol]
    assert out.name == f"Dataset{spec.dataset_id}_{spec.name}"
    verify_dataset_integrity(str(out), num_processes=1)
    split = json.loads((out / RECORD_FILE).read_text())["splits"]
    assert split == split_fractions(sorted(labels), (0.7, 0.1, 0.2), seed=7)
    assert [len(split[k]) for k in ("train", "val", "test")] == [7, 1, 2]
    splits_final = json.loads((nnunet_env / "preprocessed" / out.name / "splits_final.json").read_text())
    assert splits_final == [{"train": split["train"], "val": split["val"]}]
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in split["test"]]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in split["test"]]
    assert len(list((out / "labelsTr").iterdir())) == 8 and not list(out.rglob("._*"))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, spec.tumour_name: 1} and meta["numTraining"] == 8
    for case, original in labels.items():  # the tumour value becomes 1, every other label background
        folder = "labelsTs" if case in split["test"] else "labelsTr"
        converted = sitk.ReadImage(str(out / folder / f"{case}.nii.gz"))
        expected = (sitk.GetArrayFromImage(sitk.ReadImage(str(original))) == spec.tumour).astype(np.uint8)
        assert np.array_equal(sitk.GetArrayFromImage(converted), expected), case
        assert 0 < expected.sum() < expected.size
    image = sitk.ReadImage(str(out / "imagesTs" / f"{split['test'][0]}_0000.nii.gz"))
    assert np.allclose(image.GetDirection(), volume(0).GetDirection())  # LiTS .nii re-encoded keeps geometry


def splits(out: Path) -> dict:
    return json.loads((out / RECORD_FILE).read_text())["splits"]


def test_same_seed_same_split_other_seed_other_split(nnunet_env):
    source, _ = make_lits17(nnunet_env / "download")
    a = json.loads(
        (convert_tumour("lits17", source, dataset_id=11, seed=1, split_kind="random") / RECORD_FILE).read_text()
    )["splits"]
    b = json.loads(
        (convert_tumour("lits17", source, dataset_id=12, seed=1, split_kind="random") / RECORD_FILE).read_text()
    )["splits"]
    c = json.loads(
        (convert_tumour("lits17", source, dataset_id=13, seed=2, split_kind="random") / RECORD_FILE).read_text()
    )["splits"]
    assert a == b and a != c


@pytest.mark.parametrize(
    ("protocol", "damage", "message"),
    [
        (
            "kits21",
            lambda s: (s / "case_00003" / "aggregated_MAJ_seg.nii.gz").unlink(),
            "label missing: case case_00003 has no aggregated_MAJ_seg",
        ),
        ("lits17", lambda s: (s / "Training Batch 2" / "segmentation-7.nii").unlink(), "image without label"),
        ("msd_colon", lambda s: write(volume(5, values=2), s / "labelsTr" / "colon_003.nii.gz"), r"outside .* \[2\]"),
        ("msd_pancreas", lambda s: s.rename(s.parent / "Task10_Colon"), "expected the MSD folder Task07_Pancreas"),
    ],
)
def test_bad_downloads_are_refused_and_leave_nothing(nnunet_env, protocol, damage, message):
    source, _ = LAYOUTS[protocol](nnunet_env / "download")
    damage(source)
    if protocol == "msd_pancreas":
        source = source.parent / "Task10_Colon"
    with pytest.raises(ConversionError, match=message):
        convert_tumour(protocol, source, split_kind="random")
    assert not (nnunet_env / "raw").exists() or not list((nnunet_env / "raw").iterdir())


def test_command_line(nnunet_env, capsys):
    source, _ = make_msd_colon(nnunet_env / "download")
    main(["msd_colon", "-i", str(source), "-d", "42", "--split", "random"])
    assert "Dataset042_MSDColonTumour: 7 train, 1 val, 2 test" in capsys.readouterr().out
    assert_unusable(
        capsys,
        main(["msd_colon", "-i", str(source), "-d", "42", "--split", "random"]),
        "dataset id 42 is already taken",
    )


# ---- the paper protocol: 3DSAM-adapter's published case lists (issue 25, item 9) -----------------------------------
def test_published_lists_are_the_public_codes_fold_0():
    counts = {p: tuple(len(s[k]) for k in ("train", "val", "test")) for p, s in tumour.PUBLISHED_SPLITS.items()}
    assert counts == {
        "kits21": (209, 30, 61),
        "lits17": (83, 11, 24),
        "msd_colon": (89, 11, 26),
        "msd_pancreas": (196, 28, 57),
    }
    for protocol, split in tumour.PUBLISHED_SPLITS.items():
        listed = [c for k in ("train", "val", "test") for c in split[k]]
        assert len(set(listed)) == len(listed), protocol  # disjoint, no repeats
    assert "case_00125" in tumour.PUBLISHED_SPLITS["kits21"]["test"]  # spot checks against split.pkl, fold 0
    assert "pancreas_299" in tumour.PUBLISHED_SPLITS["msd_pancreas"]["test"]
    assert "lits_097" in tumour.PUBLISHED_SPLITS["lits17"]["test"]  # volume-97


def test_published_split_names_missing_cases_and_leaves_out_unlisted_ones():
    split = tumour.PUBLISHED_SPLITS["msd_colon"]
    cases = {c: (Path(c), Path(c)) for k in split for c in split[k]}
    got, unlisted = tumour.published_split("msd_colon", {**cases, "colon_999": (Path("x"), Path("x"))})
    assert got == split and unlisted == ["colon_999"]
    del cases[split["test"][0]]
    with pytest.raises(ConversionError, match=f"1 case.* not in the download \\({split['test'][0]}\\).*--split random"):
        tumour.published_split("msd_colon", cases)


def test_published_split_is_the_default_conversion(nnunet_env, monkeypatch):
    """The converter uses the lists as given: test cases to imagesTs, train/val to splits_final, others left out."""
    source, labels = make_msd_colon(nnunet_env / "download")
    ids = sorted(labels)
    lists = {"train": ids[:6], "val": ids[6:7], "test": ids[7:9]}  # ids[9] is named by no list
    monkeypatch.setitem(tumour.PUBLISHED_SPLITS, "msd_colon", lists)
    out = convert_tumour("msd_colon", source)
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["splits"] == lists and record["unlisted"] == [ids[9]]
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in lists["test"]]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in ids[:7]]
    splits_final = json.loads((nnunet_env / "preprocessed" / out.name / "splits_final.json").read_text())
    assert splits_final == [{"train": lists["train"], "val": lists["val"]}]

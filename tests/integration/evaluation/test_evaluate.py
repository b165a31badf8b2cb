"""Folder evaluation, tables and error cases on small synthetic NIfTI cases written with SimpleITK."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_sam.cli.evaluate import main
from nnunet_sam.evaluation.folders import (
    PROTOCOLS,
    EvaluationError,
    check_protocol_labels,
    evaluate_folder,
    results_table,
    run_evaluation,
)

SHAPE = (8, 16, 16)  # numpy (z, y, x)
SPACING_XYZ = (0.8, 0.8, 2.5)  # SimpleITK order: z is the coarse axis
ORIGIN = (-10.0, 5.0, 30.0)


def _write(path: Path, array: np.ndarray, spacing=SPACING_XYZ, origin=ORIGIN) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), True)


def _labels(liver: tuple | None = (slice(2, 6), slice(4, 10), slice(4, 10)), spleen: tuple | None = None):
    seg = np.zeros(SHAPE, dtype=np.uint8)
    if liver is not None:
        seg[liver] = 1
    if spleen is not None:
        seg[spleen] = 2
    return seg


SPLEEN = (slice(2, 6), slice(11, 14), slice(11, 14))
LIVER_SHIFTED = (slice(3, 7), slice(4, 10), slice(4, 10))  # one slice = 2.5 mm along z


def _dataset_json(folder: Path, labels: dict | None = None) -> Path:
    path = folder / "dataset.json"
    labels = labels or {"background": 0, "liver": 1, "spleen": 2}
    path.write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2, "file_ending": ".nii.gz"})
    )
    return path


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """Reference case A (liver + spleen) and B (liver only); run 'exact' and run 'shifted'.

    'shifted': case A's liver moved by one slice (Dice 3/4, all surface distances <= 2.5 mm) and its spleen
    missed (Dice 0, HD95 inf); case B exact, with the spleen absent from both (NaN, left out of the means).
    """
    ref, exact, shifted = (tmp_path / n for n in ("labelsTs", "exact", "shifted"))
    for f in (ref, exact, shifted):
        f.mkdir()
    _write(ref / "case_A.nii.gz", _labels(spleen=SPLEEN))
    _write(ref / "case_B.nii.gz", _labels())
    _write(exact / "case_A.nii.gz", _labels(spleen=SPLEEN))
    _write(exact / "case_B.nii.gz", _labels())
    _write(shifted / "case_A.nii.gz", _labels(liver=LIVER_SHIFTED))
    _write(shifted / "case_B.nii.gz", _labels())
    return {"ref": ref, "exact": exact, "shifted": shifted, "dj": _dataset_json(tmp_path), "root": tmp_path}


def test_folder_metrics_per_case_and_means(folders):
    result = evaluate_folder(folders["ref"], folders["shifted"], folders["dj"])
    per_case = {c["case"]: c["metrics"] for c in result["metric_per_case"]}
    assert set(per_case) == {"case_A", "case_B"}
    a, b = per_case["case_A"], per_case["case_B"]
    assert a[1]["Dice"] == pytest.approx(0.75)
    assert a[1]["HD95"] == pytest.approx(2.5)  # the shift along z, in mm (spacing read from the files)
    assert a[1]["NSD"] == 1.0  # every distance <= 2.5 mm < 5 mm default tolerance
    assert a[2]["Dice"] == 0.0 and a[2]["NSD"] == 0.0 and a[2]["HD95"] == math.inf
    assert b[1]["Dice"] == 1.0 and b[1]["HD95"] == 0.0
    assert math.isnan(b[2]["Dice"]) and math.isnan(b[2]["HD95"])
    mean = result["mean"]
    assert mean[1]["Dice"] == pytest.approx(0.875) and mean[1]["n_cases"] == 2
    assert mean[2]["Dice"] == 0.0 and mean[2]["n_cases"] == 1  # case B's NaN left out
    assert mean[1]["HD95"] == pytest.approx(1.25) and mean[2]["HD95"] == math.inf
    assert result["foreground_mean"]["Dice"] == pytest.approx(0.4375)
    # a tighter NSD tolerance than the 2.5 mm shift lowers the liver's NSD in case A
    tight = evaluate_folder(folders["ref"], folders["shifted"], folders["dj"], tolerance_mm=2.4)
    assert tight["metric_per_case"][0]["metrics"][1]["NSD"] < 1.0


def test_cli_writes_json_markdown_and_csv_tables(folders, capsys):
    out = folders["root"] / "eval"
    args = ["-ref", str(folders["ref"]), "-djfile", str(folders["dj"]), "-o", str(out)]
    args += ["-pred", str(folders["exact"]), str(folders["shifted"]), "--names", "exact run", "shifted run"]
    assert main(args) == 0
    tables = (out / "tables.md").read_text()
    assert tables in capsys.readouterr().out
    dice_table = tables.split("## Dice (%)\n\n")[1].split("\n\n")[0].splitlines()
    assert dice_table == [
        "| Method | liver | spleen | Mean |",
        "|---|---:|---:|---:|",
        "| exact run | 100.00 | 100.00 | 100.00 |",
        "| shifted run | 87.50 | 0.00 | 43.75 |",
    ]
    hd_table = tables.split("## HD95 (mm)\n\n")[1].splitlines()
    assert hd_table[2:4] == ["| exact run | 0.00 | 0.00 | 0.00 |", "| shifted run | 1.25 | inf | inf |"]
    assert "## NSD (%) at 5 mm" in tables
    with open(out / "table_Dice.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Method", "liver", "spleen", "Mean", "Source"]
    assert rows[2] == ["shifted run", "87.50", "0.00", "43.75", ""]
    summary = json.loads((out / "evaluation.json").read_text())  # NaN / Infinity as in nnU-Net's summary.json
    assert summary["labels"] == {"1": "liver", "2": "spleen"}
    assert summary["settings"]["nsd_tolerance_mm"] == 5.0
    shifted = summary["runs"]["shifted run"]
    assert shifted["mean"]["1"]["Dice"] == pytest.approx(0.875)
    assert shifted["metric_per_case"][0]["metrics"]["2"]["HD95"] == math.inf
    assert math.isnan(shifted["metric_per_case"][1]["metrics"]["2"]["Dice"])


def test_published_rows_are_appended_with_sources(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[2:6, 2:6, 2:6], seg[2:6, 7:10, 7:10], seg[2:6, 11:14, 2:6] = 1, 2, 3
    _write(ref / "patient101_frame01.nii.gz", seg)
    _write(pred / "patient101_frame01.nii.gz", seg)
    dj = _dataset_json(tmp_path, {"background": 0, "RV": 1, "MLV": 2, "LVC": 3})  # nnU-Net Dataset027 names
    run_evaluation(ref, [pred], dj, tmp_path / "out", names=["ours"], protocol_name="acdc")
    tables = (tmp_path / "out" / "tables.md").read_text()
    dice_part = tables.split("## NSD")[0]
    assert "| Method | RV | MLV | LVC | Mean |" in dice_part
    assert "| ours | 100.00 | 100.00 | 100.00 | 100.00 |" in dice_part
    assert "| MaskSAM (published) | 92.30 | 91.37 | 96.49 | 93.39 |" in dice_part
    assert "| nnU-Net (published) | 90.24 | 89.24 | 95.36 | 91.61 |" in dice_part
    assert "| Self-Prompt-SAM (published) | 92.20 | 91.22 | 96.36 | 93.26 |" in dice_part
    assert "- MaskSAM (published): MaskSAM paper, Table 3 (ACDC, DSC %)" in dice_part
    assert "published" not in tables.split("## NSD")[1]  # the papers report no NSD / HD95 for ACDC
    with open(tmp_path / "out" / "table_Dice.csv", newline="") as f:
        rows = {r[0]: r for r in csv.reader(f)}
    assert rows["MaskSAM (published)"][-1].startswith("MaskSAM paper, Table 3")


def test_published_rows_refuse_a_dataset_with_other_classes(folders):
    with pytest.raises(EvaluationError, match="does not match protocol 'synapse'"):
        run_evaluation(
            folders["ref"], [folders["exact"]], folders["dj"], folders["root"] / "o", protocol_name="synapse"
        )


def test_missing_prediction_is_an_error_naming_the_case(folders, capsys):
    (folders["shifted"] / "case_B.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="1 of 2 reference cases have no prediction.*case_B"):
        evaluate_folder(folders["ref"], folders["shifted"], folders["dj"])
    out = folders["root"] / "eval"
    argv = [
        "-ref",
        str(folders["ref"]),
        "-pred",
        str(folders["shifted"]),
        "-djfile",
        str(folders["dj"]),
        "-o",
        str(out),
    ]
    assert main(argv) == 2  # unusable inputs: nothing evaluated
    assert "case_B" in capsys.readouterr().err
    assert not (out / "evaluation.json").exists()
    # several runs: checked before the first run is evaluated; nothing is written
    with pytest.raises(EvaluationError, match="case_B"):
        run_evaluation(folders["ref"], [folders["exact"], folders["shifted"]], folders["dj"], out)
    assert not out.exists()


def test_extra_predictions_are_ignored_and_listed(folders):
    _write(folders["exact"] / "case_C.nii.gz", _labels())
    result = evaluate_folder(folders["ref"], folders["exact"], folders["dj"])
    assert [c["case"] for c in result["metric_per_case"]] == ["case_A", "case_B"]
    assert result["ignored_predictions"] == ["case_C"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"spacing": (0.8, 0.8, 3.0)}, "spacing"),
        ({"origin": (-10.0, 5.0, 31.0)}, "origin"),
    ],
)
def test_geometry_mismatch_is_an_error(folders, change, message):
    _write(folders["shifted"] / "case_B.nii.gz", _labels(), **change)
    with pytest.raises(EvaluationError, match=f"case_B: geometry .*{message}"):
        evaluate_folder(folders["ref"], folders["shifted"], folders["dj"])


def test_shape_mismatch_is_an_error(folders):
    image = sitk.GetImageFromArray(np.zeros((8, 16, 15), dtype=np.uint8))
    image.SetSpacing(SPACING_XYZ), image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(folders["shifted"] / "case_B.nii.gz"))
    with pytest.raises(EvaluationError, match="case_B: prediction shape"):
        evaluate_folder(folders["ref"], folders["shifted"], folders["dj"])


@pytest.mark.parametrize("which", ["prediction", "reference"])
def test_unknown_label_values_are_an_error(folders, which):
    seg = _labels()
    seg[0, 0, 0] = 7
    _write(folders["shifted" if which == "prediction" else "ref"] / "case_B.nii.gz", seg)
    with pytest.raises(EvaluationError, match=rf"{which} .*case_B.nii.gz contains label values \[7\]"):
        evaluate_folder(folders["ref"], folders["shifted"], folders["dj"])


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"background": 0, "liver": 1, "ignore": 2}, "ignore label"),
        ({"background": 0, "liver": 1, "liver and tumour": [1, 2]}, "region-based"),
        ({"background": 0, "liver": 1, "spleen": 1}, "'liver' and 'spleen' share the value 1"),
    ],
)
def test_unsupported_dataset_json_is_refused(folders, labels, message):
    dj = _dataset_json(folders["root"], labels)
    with pytest.raises(EvaluationError, match=message):
        evaluate_folder(folders["ref"], folders["exact"], dj)


def test_run_names_must_match_and_be_unique(folders):
    root = folders["root"]
    with pytest.raises(EvaluationError, match="2 names for 1 prediction folders"):
        run_evaluation(folders["ref"], [folders["exact"]], folders["dj"], root / "o", names=["a", "b"])
    with pytest.raises(EvaluationError, match="unique"):
        run_evaluation(
            folders["ref"], [folders["exact"], folders["exact"]], folders["dj"], root / "o", names=["a", "a"]
        )


def test_two_dimensional_images_use_two_dimensional_surfaces(tmp_path):
    # nnU-Net's reader returns 2D images as (1, 1, y, x); the dummy axis is dropped before the surface metrics
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    a, b = np.zeros((12, 12), np.uint8), np.zeros((12, 12), np.uint8)
    a[2:8, 2:8], b[2:8, 4:10] = 1, 1  # shifted by 2 pixels = 1 mm along x
    for folder, arr in ((ref, a), (pred, b)):
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((0.5, 0.5))
        sitk.WriteImage(image, str(folder / "img.nii.gz"))
    dj = _dataset_json(tmp_path, {"background": 0, "polyp": 1})
    metrics = evaluate_folder(ref, pred, dj, tolerance_mm=0.6)["metric_per_case"][0]["metrics"][1]
    assert metrics["HD95"] == pytest.approx(1.0)
    # 2D rings of 20 pixels: 12 of each within 0.6 mm (every pixel would count as surface in a 1-slice volume)
    assert metrics["NSD"] == pytest.approx(24 / 40)


@pytest.mark.parametrize(
    "protocol, names",
    [
        # the Synapse converter's names (DESIGN.md section 7 ids)
        ("synapse", ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"]),
        # AMOS22's own dataset.json names, as nnU-Net's Dataset218 converter copies them
        (
            "amos",
            [
                "spleen",
                "right kidney",
                "left kidney",
                "gall bladder",
                "esophagus",
                "liver",
                "stomach",
                "arota",
                "postcava",
                "pancreas",
                "right adrenal gland",
                "left adrenal gland",
                "duodenum",
                "bladder",
                "prostate/uterus",
            ],
        ),
        ("msd_pancreas", ["pancreas", "cancer"]),  # MSD Task07 / nnU-Net's MSD conversion
    ],
)
def test_protocol_label_names_of_the_converters_are_accepted(protocol, names):
    labels = dict(enumerate(names, start=1))
    assert check_protocol_labels(protocol, labels) is PROTOCOLS[protocol]
    with pytest.raises(EvaluationError, match="label 1 is 'kidney'"):
        check_protocol_labels(protocol, {**labels, 1: "kidney"})


def test_tumour_only_published_rows_leave_other_columns_empty():
    result = {"mean": {1: {"Dice": 0.8}, 2: {"Dice": 0.5}}, "foreground_mean": {"Dice": 0.65}}
    header, rows, sources = results_table(
        {"ours": result}, {1: "pancreas", 2: "cancer"}, "Dice", PROTOCOLS["msd_pancreas"]
    )
    assert header == ["Method", "pancreas", "cancer", "Mean"]
    assert rows[0] == ["ours", "80.00", "50.00", "65.00"]
    assert ["MaskSAM (published)", "-", "42.60", "-"] in rows
    _, nsd_rows, _ = results_table(
        {"ours": result | {"mean": {1: {"NSD": 1.0}, 2: {"NSD": 1.0}}, "foreground_mean": {"NSD": 1.0}}},
        {1: "pancreas", 2: "cancer"},
        "NSD",
        PROTOCOLS["msd_pancreas"],
    )
    assert ["MaskSAM (published)", "-", "68.60", "-"] in nsd_rows


def test_console_script_is_registered():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "nnunet_sam_evaluate"]
    assert script.value == "nnunet_sam.cli.evaluate:main"
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_dice_and_nan_convention_agree_with_nnunets_own_evaluation(folders):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ours = evaluate_folder(folders["ref"], folders["shifted"], folders["dj"])
    for case in ours["metric_per_case"]:
        theirs = compute_metrics(case["reference_file"], case["prediction_file"], SimpleITKIO(), [1, 2])["metrics"]
        for label in (1, 2):
            np.testing.assert_equal(case["metrics"][label]["Dice"], theirs[label]["Dice"])  # NaN == NaN here
            assert case["metrics"][label]["n_ref"] == theirs[label]["n_ref"]


def test_published_rows_are_consistent_with_their_protocols():
    # guards the transcription: ids belong to the protocol, and the published means equal the column means up to
    # the papers' rounding (AMOS is published as 3-decimal fractions)
    for name, protocol in PROTOCOLS.items():
        for row in protocol.rows:
            assert row.metric in ("Dice", "NSD") and row.source, (name, row.method)
            assert set(row.values) <= set(protocol.labels), (name, row.method)
            if row.mean is not None:
                assert set(row.values) == set(protocol.labels), (name, row.method)
                assert abs(np.mean(list(row.values.values())) - row.mean) <= 0.06, (name, row.method)

"""Point-prompt evaluation: simulated click positions and the simulate -> predict -> evaluate run."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
from prompted_testing import SHAPE, _predictor, _write_case
from scipy import ndimage

import nnunet_sam.inference.prompted as predict_prompted
from nnunet_sam.cli.evaluate_prompted import main
from nnunet_sam.evaluation.prompted import click_region, run_prompted_evaluation, simulate_clicks


def _box() -> np.ndarray:
    reference = np.zeros((12, 14, 16), dtype=np.uint8)
    reference[1:10, 2:11, 3:12] = 2  # a 9^3 cube centred at (5, 6, 7)
    return reference


def test_centre_click_is_the_deepest_voxel_and_regions_are_nested_shells():
    reference = _box()
    clicks = simulate_clicks(reference, (1.0, 1.0, 1.0), 1, "centre", np.random.default_rng(0))
    assert clicks == [{"position": [5, 6, 7], "label": 2}]
    mask = reference == 2
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]  # cube centre: depth 5 voxels
    assert depth.max() == 5
    for position, low, high in [("centre", 3.75, 5), ("surrounding", 1.25, 3.75), ("margin", 0, 1.25)]:
        _, region = click_region(mask, (1.0, 1.0, 1.0), position)
        values = depth[tuple(region.T)]
        assert values.min() >= low and values.max() <= high and mask[tuple(region.T)].all(), position
        clicks = simulate_clicks(reference, (1.0, 1.0, 1.0), 10, position, np.random.default_rng(1))
        assert len(clicks) == 10 and all(c["label"] == 2 for c in clicks)
        assert all(low <= depth[tuple(c["position"])] <= high for c in clicks), position
    _, margin = click_region(mask, (1.0, 1.0, 1.0), "margin")
    assert len(margin) == 9**3 - 7**3  # depth 1 = the surface layer of the cube


def test_spacing_decides_depth_and_cases_without_foreground_get_a_background_click():
    reference = np.zeros((5, 5, 40), dtype=np.uint8)
    reference[:, :, 10:30] = 1  # thin in z, y at 1 mm; spacing 4 mm along x makes x the deep axis
    deepest, _ = click_region(reference == 1, (1.0, 1.0, 4.0), "centre")
    assert deepest.tolist()[:2] == [2, 2]
    empty = simulate_clicks(np.zeros((4, 6, 8), np.uint8), (1, 1, 1), 3, "margin", np.random.default_rng(0))
    assert empty == [{"position": [2, 3, 4], "label": 0}]


def test_same_seed_same_clicks_and_one_click_set_per_class():
    reference = _box()
    reference[10:12, 0:3, 0:3] = 1
    a = simulate_clicks(reference, (2.0, 1.0, 1.0), 3, "surrounding", np.random.default_rng(5))
    b = simulate_clicks(reference, (2.0, 1.0, 1.0), 3, "surrounding", np.random.default_rng(5))
    assert a == b and [c["label"] for c in a] == [1, 1, 1, 2, 2, 2]


def test_simulate_predict_evaluate(tmp_path, monkeypatch):
    """With the point-painting stand-in network of test_predict_prompted: every setting is predicted and scored,
    and a click on the object gives a Dice well above 0."""
    image = _write_case(tmp_path / "images", "case")
    reference = np.zeros(SHAPE, dtype=np.uint8)
    reference[3:6, 18:25, 5:10] = 1
    label = sitk.GetImageFromArray(reference)
    label.CopyInformation(image)
    (tmp_path / "labels").mkdir()
    sitk.WriteImage(label, str(tmp_path / "labels" / "case.nii.gz"))
    predictor = _predictor(mirroring=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "dataset.json").write_text(json.dumps(predictor.dataset_json))
    monkeypatch.setattr(predict_prompted, "initialize_predictor", lambda *a, **k: predictor)
    summary = run_prompted_evaluation(
        model, tmp_path / "images", tmp_path / "labels", tmp_path / "out", (1, 3), ("centre", "margin")
    )
    assert list(summary["runs"]) == ["1pt_centre", "1pt_margin", "3pt_centre", "3pt_margin"]
    points = json.loads((tmp_path / "out" / "1pt_centre" / "points.json").read_text())
    assert points == {"coordinates": "voxel", "points": {"case": [{"position": [4, 21, 7], "label": 1}]}}
    dice = summary["runs"]["1pt_centre"]["mean"][1]["Dice"]
    assert 0.3 < dice <= 1, dice
    assert (tmp_path / "out" / "tables.md").read_text().count("1pt_centre") == 3  # Dice, NSD, HD95 tables


def test_reference_without_image_is_named_before_any_prediction(tmp_path, monkeypatch, capsys):
    """Issue 29 item 14: a reference whose image is missing was reported, after the other cases were predicted, as
    "b: the points file has points for this case but IMAGES has no image of it" (a points file the user never
    wrote). Now the command names the missing image before anything is predicted; likewise an image without its
    reference, which was "no points given"."""
    image = _write_case(tmp_path / "images", "a")
    (tmp_path / "labels").mkdir()
    label = sitk.GetImageFromArray(np.ones(SHAPE, dtype=np.uint8))
    label.CopyInformation(image)
    for case in ("a", "b"):
        sitk.WriteImage(label, str(tmp_path / "labels" / f"{case}.nii.gz"))
    predictor = _predictor(mirroring=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "dataset.json").write_text(json.dumps(predictor.dataset_json))
    monkeypatch.setattr(predict_prompted, "initialize_predictor", lambda *a, **k: predictor)
    args = ["-m", str(model), "-i", str(tmp_path / "images"), "-ref", str(tmp_path / "labels"), "-device", "cpu"]
    assert main([*args, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"1 reference case(s) have no image in {tmp_path / 'images'}: b (expected b_0000.nii.gz" in err, err
    assert not (tmp_path / "out" / "1pt_uniform" / "predictions").exists()
    (tmp_path / "labels" / "b.nii.gz").unlink()
    (tmp_path / "labels" / "a.nii.gz").unlink()
    assert main([*args, "-o", str(tmp_path / "out2")]) == 2
    assert "1 image case(s) have no reference in" in capsys.readouterr().err


def test_command_reports_a_missing_model(tmp_path, capsys):
    assert main(["-m", str(tmp_path / "no_model"), "-i", "x", "-ref", "y", "-o", str(tmp_path / "o")]) == 2
    assert "no_model is not an nnU-Net model folder (no dataset.json)" in capsys.readouterr().err


def test_uniform_clicks_are_the_public_test_scripts_draw_and_the_default():
    """3DSAM-adapter's test script: clicks drawn uniformly with replacement from the object's voxels (issue 25, item
    10). Seeded here; every voxel of the object can be clicked, not only the deepest."""
    from nnunet_sam.cli.evaluate_prompted import build_parser

    reference = np.zeros((12, 14, 16), np.uint8)
    reference[1:10, 2:11, 3:12] = 1
    mask = reference == 1
    clicked = set()
    for seed in range(200):
        clicks = simulate_clicks(reference, (1.0, 1.0, 1.0), 1, "uniform", np.random.default_rng(seed))
        assert len(clicks) == 1 and mask[tuple(clicks[0]["position"])]
        clicked.add(tuple(clicks[0]["position"]))
    assert len(clicked) > 150  # spread over the cube (729 voxels), not the deepest voxel each time
    again = simulate_clicks(reference, (1.0, 1.0, 1.0), 10, "uniform", np.random.default_rng(7))
    assert again == simulate_clicks(reference, (1.0, 1.0, 1.0), 10, "uniform", np.random.default_rng(7))
    args = build_parser().parse_args(["-m", "m", "-i", "i", "-ref", "r", "-o", "o"])
    assert args.position == ["uniform"]

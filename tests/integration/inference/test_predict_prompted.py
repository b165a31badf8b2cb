"""Prompted prediction (nnunet_sam_predict_prompted): points through nnU-Net's preprocessing, sliding window,
mirroring and export, and the bad points-file cases.

The network is a stand-in that paints a ball of class k around every point of label k it is given (patch
coordinates), so a prediction shows exactly where each click arrived: the clicked voxel of the original image must
come back with the clicked class, through a transpose, a crop to non-zero, anisotropic resampling, padding, several
overlapping windows and mirroring.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from prompted_testing import DIRECTION, ORIGIN, SPACING, Painter, _image, _predictor, _write_case
from sam_testing import dataset_json

from nnunet_sam.cli.predict_prompted import main
from nnunet_sam.inference.predict import BadCaseError
from nnunet_sam.inference.prompted import (
    parse_case_points,
    points_in_patch,
    predict_prompted,
    to_preprocessed,
    world_to_voxel,
)


def _points_file(path: Path, points: dict, coordinates: str = "voxel") -> str:
    path.write_text(json.dumps({"coordinates": coordinates, "points": points}))
    return str(path)


# ---- coordinates ----------------------------------------------------------------------------------------------
def test_world_coordinates_map_to_sitk_indices():
    image = _image()
    index_xyz = (7, 21, 4)
    world = np.asarray([image.TransformIndexToPhysicalPoint(index_xyz)])
    props = {"sitk_stuff": {"spacing": SPACING, "origin": ORIGIN, "direction": DIRECTION}}
    np.testing.assert_allclose(world_to_voxel("c", world, props), [[4, 21, 7]], atol=1e-9)
    with pytest.raises(BadCaseError, match="world coordinates need the image geometry"):
        world_to_voxel("c", world, {})


def test_points_follow_nnunet_preprocessing_of_a_marker():
    """A box marked in the label and preprocessed by nnU-Net (transpose, crop, resampling) is centred where
    to_preprocessed maps the box's centre."""
    predictor = _predictor()
    plans, config = predictor.plans_manager, predictor.configuration_manager
    image = sitk.GetArrayFromImage(_image())[None]
    for z, y, x in [(4, 21, 7), (5, 10, 20), (2, 5, 12)]:
        seg = np.zeros_like(image, dtype=np.int16)
        seg[0, z - 1 : z + 2, y - 2 : y + 3, x - 2 : x + 3] = 1
        props = {"spacing": list(SPACING[::-1])}
        data, pre_seg, props = config.preprocessor_class(verbose=False).run_case_npy(
            image.copy(), seg, props, plans, config, dataset_json(2)
        )
        mapped, inside = to_preprocessed(np.asarray([[z, y, x]], float), props, plans.transpose_forward, data.shape[1:])
        assert inside.all() and data.shape[1:] == pre_seg.shape[1:]
        centre = np.argwhere(pre_seg[0] == 1).mean(0)
        assert np.abs(mapped[0] - centre).max() <= 0.5, ((z, y, x), mapped, centre)
    # the zero band x < 3 is cropped: a point there is outside the crop box
    _, inside = to_preprocessed(np.asarray([[4.0, 10, 1]]), props, plans.transpose_forward, data.shape[1:])
    assert not inside.any()


def test_points_in_patch_are_shifted_and_outside_ones_padded():
    points = torch.tensor([[0.0, 0, 0], [20, 5, 5], [15.4, 15.5, 3], [-0.5, 3, 3]])
    local, labels = points_in_patch(points, torch.tensor([1, 2, 1, 2]), [0, 0, 0], [16, 16, 16])
    assert labels.tolist() == [1, -1, -1, 2]  # 15.5 is in voxel 16, outside; -0.5 is the edge of voxel 0, inside
    local, labels = points_in_patch(points, torch.tensor([1, 2, 1, 2]), [8, 0, 0], [16, 16, 16])
    torch.testing.assert_close(local[1], torch.tensor([12.0, 5, 5]))
    assert labels.tolist() == [-1, 2, -1, -1]


def test_parse_case_points_messages():
    labels = {"background": 0, "organ1": 1, "organ2": 2}
    positions, classes = parse_case_points("c", [{"position": [1, 2, 3], "label": "organ2"}], labels)
    assert positions.tolist() == [[1, 2, 3]] and classes.tolist() == [2]
    for entries, message in [
        ([], "no points given"),
        (None, "no points given"),
        ([{"position": [1, 2], "label": 1}], "point 0: expected"),
        ([{"position": [1, 2, "a"], "label": 1}], "point 0: expected"),
        ([{"position": [1, 2, 3], "label": 1}, {"position": [1, 2, 3], "label": 7}], "point 1: unknown class 7"),
        ([{"position": [1, 2, 3], "label": "liver"}], "unknown class label 'liver'.*1 \\(organ1\\)"),
        ([[1, 2, 3]], "point 0: expected"),
    ]:
        with pytest.raises(BadCaseError, match=message.replace("class 7", "class label 7")):
            parse_case_points("c", entries, labels)


# ---- prediction ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coordinates", ["voxel", "world"])
def test_clicked_voxels_come_back_with_their_class(tmp_path, coordinates):
    image = _write_case(tmp_path / "in", "case")
    clicks = {(1, 4, 21, 7), (2, 8, 3, 24), (1, 0, 29, 12)}  # class, z, y, x; the last is at the image border
    points = []
    for label, *voxel in clicks:
        position = voxel if coordinates == "voxel" else list(image.TransformIndexToPhysicalPoint(voxel[::-1]))
        points.append({"position": position, "label": label})
    predictor = _predictor()
    predictor.crop_to_clicks = False  # clicks further apart than a patch: every window (--whole-volume)
    failures = predict_prompted(
        predictor, str(tmp_path / "in"), _points_file(tmp_path / "p.json", {"case": points}, coordinates),
        str(tmp_path / "out"),
    )  # fmt: skip
    assert failures == {}
    out = sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz"))
    assert out.GetSize() == image.GetSize() and np.allclose(out.GetDirection(), DIRECTION)
    seg = sitk.GetArrayFromImage(out)
    for label, *voxel in clicks:
        assert seg[tuple(voxel)] == label, (label, voxel)
    assert set(np.unique(seg)) == {0, 1, 2} and (seg > 0).mean() < 0.2
    calls = predictor.network.calls
    assert len(calls) > 8 and len(calls) % 8 == 0  # several windows, 8 mirrorings each
    assert any((labels == -1).any() for _, labels in calls), "windows without a click get padding labels"


def test_bad_cases_are_reported_and_the_good_one_predicted(tmp_path):
    for case in ("good", "empty", "outside", "unknown", "malformed", "missing"):
        _write_case(tmp_path / "in", case)
    click = {"position": [4, 21, 7], "label": 1}
    points = {
        "good": [click],
        "empty": [],
        "outside": [click, {"position": [4, 30, 7], "label": 2}],
        "unknown": [{"position": [4, 21, 7], "label": 3}],
        "malformed": [{"pos": [4, 21, 7], "label": 1}],
        "no_image": [click],
    }
    file = _points_file(tmp_path / "p.json", points)
    failures = predict_prompted(_predictor(mirroring=False), str(tmp_path / "in"), file, str(tmp_path / "out"))
    assert sorted(failures) == ["empty", "malformed", "missing", "no_image", "outside", "unknown"]
    assert "no points given" in failures["empty"]
    assert "1 point(s) outside the image of (10, 30, 26) voxels" in failures["outside"]
    assert "point 1 at [4.0, 30.0, 7.0]" in failures["outside"]
    assert "unknown class label 3" in failures["unknown"]
    assert 'expected {"position"' in failures["malformed"]
    assert "missing from" in failures["missing"]
    # issue 29 item 14: the missing image leads, not the points file
    assert (
        failures["no_image"].startswith("no_image: no image of this case in ")
        and "no_image_0000.nii.gz" in (failures["no_image"])
    )
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["good.nii.gz"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"case": []}', 'must be a JSON object with "points"'),
        ('{"coordinates": "mm", "points": {}}', '"coordinates" .* must be "voxel" or "world"'),
    ],
)
def test_unusable_points_file_stops_before_predicting(tmp_path, capsys, content, message):
    (tmp_path / "p.json").write_text(content)
    assert main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-points", str(tmp_path / "p.json"), "-m", "x"]) == 2
    assert re.search(message, capsys.readouterr().err)  # before the (here missing) model folder is read
    assert not (tmp_path / "out").exists()


# ---- 3DSAM-adapter's test protocol: one patch centred on the clicks ----------------------------------------------
class Flood(Painter):
    """Paints its whole patch with the class of its first click (logit 5), so a prediction shows which patches ran."""

    def forward(self, x: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, points, labels)
        for b in range(x.shape[0]):
            clicked = labels[b][labels[b] > 0]
            if len(clicked):
                out[b, int(clicked[0])] = 5
        return out


def test_default_predicts_one_patch_centred_on_the_clicks_and_nothing_outside(tmp_path):
    predictor = _predictor()
    predictor.network = Flood(3)
    assert predictor.crop_to_clicks, "the crop is the default protocol"
    image = torch.rand(1, 40, 36, 44)
    predictor.points = torch.tensor([[20.0, 10, 30], [24, 16, 26]])
    predictor.point_labels = torch.tensor([1, 2])
    seg = predictor.predict_sliding_window_return_logits(image).argmax(0)
    inside = torch.zeros(40, 36, 44, dtype=torch.bool)
    inside[15:31, 6:22, 21:37] = True  # 16^3 centred on the clicks' box centre (22, 13, 28): its voxel 7.5
    assert bool((seg[inside] > 0).all()) and not bool((seg[~inside] > 0).any()), "exactly the crop, nothing outside"
    assert len(predictor.network.calls) == 8, "one patch, 8 mirrorings"
    assert all(labels[0].tolist() == [1, 2] for _, labels in predictor.network.calls), "both clicks in the crop"
    torch.testing.assert_close(predictor.network.calls[0][0][0, 0], torch.tensor([5.0, 4, 9]))

    # a click at the border: the crop moves inside the image
    predictor.network.calls.clear()
    predictor.points, predictor.point_labels = torch.tensor([[1.0, 34, 2]]), torch.tensor([1])
    seg = predictor.predict_sliding_window_return_logits(image).argmax(0)
    assert bool((seg[:16, 20:, :16] == 1).all()) and int((seg > 0).sum()) == 16**3

    # --whole-volume: every sliding window, each with the clicks inside it, so windows beyond the crop paint too
    predictor.network.calls.clear()
    predictor.crop_to_clicks = False
    predictor.points, predictor.point_labels = torch.tensor([[20.0, 10, 30], [24, 16, 26]]), torch.tensor([1, 2])
    seg = predictor.predict_sliding_window_return_logits(image).argmax(0)
    assert len(predictor.network.calls) > 8 and bool((seg[~inside] > 0).any())


def test_clicks_that_do_not_fit_the_crop_are_reported(capsys):
    predictor = _predictor(mirroring=False)
    predictor.network = Flood(3)
    predictor.points = torch.tensor([[2.0, 2, 2], [37, 33, 41]])
    predictor.point_labels = torch.tensor([1, 2])
    predictor.predict_sliding_window_return_logits(torch.rand(1, 40, 36, 44))
    assert "2 of 2 click(s) lie outside the [16, 16, 16] patch" in capsys.readouterr().err

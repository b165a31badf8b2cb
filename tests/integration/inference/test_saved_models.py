"""Models trained with earlier versions of the package still load and predict the same.

``tests/fixtures/saved_models/`` holds model folders written by ``tests/fixtures/make_saved_models.py`` with
version 0.1.0 (before options were saved in the record: format 1), each with a held-out image and what that version
predicted for it. Never regenerate these folders to make this test pass: a difference means that a model a user
trained earlier now predicts differently. A later version adds its own folders beside them.

What is guaranteed on any CPU: every logit equals the stored one within the rounding bound below, and the
segmentation is identical at every voxel whose two best classes lie further apart than twice that bound (at the
few others, a near tie, the class found must be one of those within the bound of the best). Bit-identical logits are
not guaranteed: another CPU's float32 kernels (AVX2 against AVX-512, another blocking) sum in another order, and
nnU-Net adds the tiles' logits into a float16 array, where a last-bit float32 difference can round to the
neighbouring float16 value.

The bound (:func:`logit_bound`), per voxel and channel, for a sliding window whose sums are kept in a float type
with relative spacing ``eps`` (float16: 2**-10, nnU-Net's predictor; float32: 2**-23, the prompted predictor's own
loop):

* each tile t covering the voxel gives a float32 logit p_t; two CPUs' p_t differ by at most ``delta``. This is not
  derived (a deep network's float32 error has no useful a-priori bound) but an allowance, :data:`NETWORK_ALLOWANCE`
  = 2**-8 of the largest logit magnitude of all tiles: 4.6 times the largest difference seen between two machines
  (3DSAM-adapter's fixture, 0.0029 with tiles up to 3.47: 8.4e-4);
* the running sum of g_t * p_t (Gaussian weights g_t > 0, the same on both CPUs, total n) never exceeds n * A in
  magnitude, A = max_t |p_t|; each of the T tile additions rounds both CPUs' sums to a nearest representable value,
  so their difference grows by at most g_t * delta plus one spacing of n * A, eps * n * A;
* dividing by n (the same on both) and rounding the quotient (|quotient| <= A) once more gives

      |logit - stored logit| <= delta + (T + 1) * (eps * A + 2**-24)   (2**-24: float16's subnormal spacing).

For these fixtures that is at most about 1 % of the largest logit; a change of the network, its record or the
preprocessing moves logits by more (:func:`test_bound_catches_a_changed_model`).

PanSAM's network takes discrete steps inside: CLAHE puts each pixel into one of 256 bins, and its prompts are points
picked from its own stage-1 map. A last-bit difference can move one pixel to the neighbouring bin or pick another
point on one slice, which changes a few logits by more than rounding (seen: on an AVX-512 CPU, 1 of the fixture's
131 072 logits moved by 0.005, bound 0.0029, segmentation identical). For it, at most
:data:`DISCRETE_STEP_SHARE` of the logits may leave the bound; the segmentation rule is unchanged, and a changed
model still fails (:func:`test_bound_catches_a_changed_model`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sam_testing import TESTS

sys.path.insert(0, str(TESTS / "fixtures"))
from make_saved_models import radsam_seed_logits  # noqa: E402  (how the fixtures computed it)

FIXTURES = TESTS / "fixtures" / "saved_models"
FOLDERS = sorted(p.parent for p in FIXTURES.glob("*/*/plans.json"))
FLOAT16_EPS = 2.0**-10  # spacing of float16 numbers relative to their value (nnU-Net's tile sums)
FLOAT32_EPS = 2.0**-23  # the same for float32 (the prompted predictor's tile sums)
FLOAT16_TINY = 2.0**-24  # float16's subnormal spacing (values near zero)
NETWORK_ALLOWANCE = 2.0**-8  # two CPUs' float32 network outputs, relative to the largest logit magnitude
DISCRETE_STEP_SHARE = 1e-3  # networks with discrete steps (PanSAM): share of logits allowed outside the bound


@pytest.fixture(autouse=True)
def _one_thread_no_checkpoint_folder(monkeypatch):
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)  # inference needs no SAM checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as when the fixtures were made (not needed for the bound; fewer differences)
    yield
    torch.set_num_threads(threads)


def test_fixtures_exist():
    names = {f.name.split("__")[0] for f in FOLDERS}
    assert {
        "MaskSAMTrainer_tiny",
        "SelfPromptSAMTrainer_tiny",
        "SAM3DAdapterTrainer_tiny",
        "SAM3DAdapterTrainer_prompted_tiny",
        "PanSAMTrainer_tiny",
        "RadSAMTrainer_tiny",
    } <= names


def _preprocessed(predictor, folder: Path) -> np.ndarray:
    reader = predictor.plans_manager.image_reader_writer_class()
    image, properties = reader.read_images([str(folder / "image_0000.nii.gz")])
    data, _, _ = predictor.configuration_manager.preprocessor_class(verbose=False).run_case_npy(
        image, None, properties, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    )
    return data


def logit_bound(shape: tuple[int, ...], slicers: list, tiles: list[torch.Tensor], eps: float) -> np.ndarray:
    """Per-voxel bound (C, Z, Y, X) on how far another CPU's logits may lie from these (module docstring).

    ``slicers`` and ``tiles`` are the sliding window's slicers and the float32 logits (C, *patch) of each tile, in
    the order they were summed; ``eps`` the relative spacing of the float type the sums are kept in.
    """
    largest = torch.zeros(shape)
    count = torch.zeros(shape[1:])
    for slicer, tile in zip(slicers, tiles, strict=True):
        largest[slicer] = torch.maximum(largest[slicer], tile.abs())
        count[slicer[1:]] += 1
    delta = NETWORK_ALLOWANCE * max(float(t.abs().max()) for t in tiles)
    return (delta + (count + 1) * (eps * largest + FLOAT16_TINY)).numpy()


def _record_tiles(predictor, method: str) -> tuple[list, list]:
    """Make ``predictor`` keep its sliding-window slicers and each tile's float32 logits (C, *patch)."""
    slicers, tiles = [], []
    get_slicers, predict = predictor._internal_get_sliding_window_slicers, getattr(predictor, method)

    def recording_slicers(*args, **kwargs):
        slicers.extend(get_slicers(*args, **kwargs))
        return slicers

    def recording_predict(*args, **kwargs):
        prediction = predict(*args, **kwargs)
        tiles.append(prediction[0].detach().float().cpu().clone())
        return prediction

    predictor._internal_get_sliding_window_slicers = recording_slicers
    setattr(predictor, method, recording_predict)
    return slicers, tiles


def assert_same_segmentation_within(
    logits: np.ndarray, expected: np.ndarray, bound: np.ndarray, outside_share: float = 0.0
) -> None:
    """Logits (C, Z, Y, X) within ``bound`` of the stored ones (all but ``outside_share`` of them); segmentation
    (argmax over channels, as nnU-Net's label manager) identical wherever the stored two best classes are more than
    twice the bound apart."""
    excess = np.abs(logits - expected) - bound
    worst = np.unravel_index(excess.argmax(), excess.shape)
    outside = int((excess > 0).sum())
    assert outside <= outside_share * excess.size, (
        f"{outside} logits differ by more than float rounding allows; worst at {worst}: "
        f"{logits[worst]} instead of {expected[worst]} (bound {bound[worst]:.3g})"
    )
    found, stored = logits.argmax(0), expected.argmax(0)
    best = np.take_along_axis(expected, found[None], 0)[0]
    near_tie = best >= expected.max(0) - 2 * bound.max(0)  # the class found is within rounding of the best
    changed = found != stored
    assert not (changed & ~near_tie).any(), f"the segmentation changed at {int((changed & ~near_tie).sum())} voxels"


@pytest.mark.parametrize("folder", [f for f in FOLDERS if not f.name.startswith("RadSAM")], ids=lambda f: f.name)
def test_saved_model_predicts_as_when_it_was_trained(folder: Path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_sam.inference.prompted import PromptedPredictor

    prompted = (folder / "points.json").is_file()
    predictor_class = PromptedPredictor if prompted else nnUNetPredictor
    predictor = predictor_class(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), [0], "checkpoint_final.pth")
    if prompted:
        points = torch.tensor(json.loads((folder / "points.json").read_text()))
        predictor.points, predictor.point_labels = points[:, :3], points[:, 3].long()
        predictor.crop_to_clicks = False  # the fixture's protocol: every sliding-window patch (0.1.0's only one)
    slicers, tiles = _record_tiles(predictor, "_predict_patch" if prompted else "_internal_maybe_mirror_and_predict")
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(_preprocessed(predictor, folder)))
    expected = np.load(folder / "expected_logits.npy")
    assert logits.dtype == (torch.float32 if prompted else torch.float16), "the sums' float type changed: see eps"
    logits = logits.float().numpy()
    bound = logit_bound(expected.shape, slicers, tiles, FLOAT32_EPS if prompted else FLOAT16_EPS)
    assert_same_segmentation_within(logits, expected, bound, _outside_share(folder))


def _outside_share(folder: Path) -> float:
    return DISCRETE_STEP_SHARE if folder.name.startswith("PanSAM") else 0.0


@pytest.mark.parametrize("folder", [f for f in FOLDERS if f.name.startswith("RadSAM")], ids=lambda f: f.name)
def test_saved_radsam_model_segments_as_when_it_was_trained(folder: Path):
    from nnunet_sam.inference.radsam import Prompt, RadSAMModel, SliceModel, segment_from_prompt

    model = RadSAMModel(str(folder), 0)
    image, properties = model.read([str(folder / "image_0000.nii.gz")])
    data, _, _ = model.preprocess(image, properties)
    prompt = json.loads((folder / "prompt.json").read_text())
    slices = SliceModel(model.network, data)
    mask = segment_from_prompt(
        slices, Prompt("point", prompt["slice"], point=tuple(prompt["point"])), (0, data.shape[1] - 1)
    ).mask
    np.testing.assert_array_equal(mask, np.load(folder / "expected_mask.npy"))
    # float32 throughout (no tile sums): only the network's own rounding, as in logit_bound
    expected = np.load(folder / "expected_seed_logits.npy")
    logits = radsam_seed_logits(slices, prompt).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=NETWORK_ALLOWANCE * float(np.abs(expected).max()))


def test_bound_catches_a_changed_model():
    """Real changes leave the bound (the test is not blind): the last layer's weights 1 % larger (18 times the
    bound), or the preprocessed image shifted by 1 % of its standard deviation (1.9 times); PanSAM's changed weights
    also with its share of logits allowed outside the bound."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    masksam = next(f for f in FOLDERS if f.name.startswith("MaskSAM"))
    pansam = next(f for f in FOLDERS if f.name.startswith("PanSAM"))
    # PanSAM min-max normalises each slice before and after CLAHE: a shifted image is the same image to it
    cases = [(masksam, "weights"), (masksam, "image"), (pansam, "weights")]
    for folder, change in cases:
        expected = np.load(folder / "expected_logits.npy")
        predictor = nnUNetPredictor(
            tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False
        )
        predictor.initialize_from_trained_model_folder(str(folder), [0], "checkpoint_final.pth")
        data = torch.from_numpy(_preprocessed(predictor, folder))
        if change == "weights":  # the predictor loads these into the network for every fold
            weights = predictor.list_of_parameters[0]
            if folder == pansam:  # its last layer is the aggregator's, unused by the final output
                names = [k for k in weights if k.startswith("refine_decoder.output_hyper") and "layers.2.w" in k]
            else:  # the last layer
                names = [k for k, v in weights.items() if v.is_floating_point() and v.ndim > 1][-1:]
            for name in names:
                weights[name].mul_(1.01)
        else:
            data = data + 0.01
        slicers, tiles = _record_tiles(predictor, "_internal_maybe_mirror_and_predict")
        logits = predictor.predict_logits_from_preprocessed_data(data).float().numpy()
        bound = logit_bound(expected.shape, slicers, tiles, FLOAT16_EPS)
        with pytest.raises(AssertionError, match="float rounding allows"):
            assert_same_segmentation_within(logits, expected, bound, _outside_share(folder))

"""RadSAM: prompt generators, 3D propagation and editing, prompt files, trainer, and (slow) end to end on CPU."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sam_testing import dataset_json, minimal_plans, nnunet_env, run_tool

from nnunet_sam.inference.radsam import (
    Correction,
    Geometry,
    Prompt,
    PromptError,
    SliceModel,
    edit,
    follow,
    from_mask,
    read_prompt_file,
    segment_from_prompt,
)
from nnunet_sam.losses.segmentation import RadSAMLoss
from nnunet_sam.mask_geometry import pixel_boxes
from nnunet_sam.network_architectures.radsam import RadSAMNetwork, RadSAMOptions, intensity_windows
from nnunet_sam.prompting.radsam_prompts import (
    Prompts,
    SimulatedInteraction,
    correction_points,
    interior_points,
    noisy_masks,
    perturbed_boxes,
)
from nnunet_sam.trainers.radsam import RadSAMTrainer_AMOS_noEdit, RadSAMTrainer_AMOS_noMask, RadSAMTrainer_tiny

CPU = torch.device("cpu")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _square(size: int, top: int, left: int, side: int, rows: int = 1) -> torch.Tensor:
    masks = torch.zeros(rows, size, size, dtype=torch.bool)
    masks[:, top : top + side, left : left + side] = True
    return masks


# ---- 1. prompt generators against hand-made masks ---------------------------------------------------------------
def test_interior_point_is_more_than_two_pixels_inside_and_uniform():
    masks = _square(32, 5, 8, 11, rows=400)  # rows 5..15, columns 8..18
    points, labels = interior_points(masks, generator=_gen())
    assert (labels == 1).all()
    x, y = points[:, 0], points[:, 1]
    # pixel distance to the outside: 1 on the border ring, 2 on the next; > 2 leaves rows 7..13, columns 10..16
    assert x.min() == 10 and x.max() == 16 and y.min() == 7 and y.max() == 13
    assert len({(int(a), int(b)) for a, b in points.tolist()}) > 40, "not spread over the 49 allowed pixels"


def test_interior_point_of_a_thin_or_empty_mask():
    thin = torch.zeros(2, 16, 16, dtype=torch.bool)
    thin[0, 4:7, 2:14] = True  # 3 rows thick: no pixel is more than 2 px inside -> the middle row
    points, labels = interior_points(thin, generator=_gen())
    assert labels.tolist() == [1, -1]
    assert points[0, 1] == 5 and 3 <= points[0, 0] <= 12


def test_box_sides_move_by_minus_5_to_plus_20_pixels():
    masks = _square(128, 40, 40, 20, rows=2000)  # tight box (40, 40, 59, 59)
    boxes, nonempty = perturbed_boxes(masks, generator=_gen())
    assert nonempty.all()
    outward = torch.stack([40 - boxes[:, 0], 40 - boxes[:, 1], boxes[:, 2] - 59, boxes[:, 3] - 59], -1)
    assert outward.min() == -5 and outward.max() == 20
    assert set(outward.flatten().long().tolist()) == set(range(-5, 21)), "every offset in [-5, 20] should occur"
    tight, _ = pixel_boxes(masks[:1])
    assert tight.tolist() == [[40.0, 40.0, 59.0, 59.0]]


def test_box_is_clipped_to_the_image():
    boxes, _ = perturbed_boxes(_square(32, 0, 0, 10, rows=200), generator=_gen())
    assert boxes[:, :2].min() == 0 and boxes[:, 2:].max() <= 31


def test_noisy_mask_differs_from_the_reference_but_overlaps_it():
    masks = _square(64, 10, 30, 16, rows=50)
    noisy = noisy_masks(masks, generator=_gen())
    inter = (noisy & masks).flatten(1).sum(1).float()
    union = (noisy | masks).flatten(1).sum(1).float()
    iou = inter / union
    assert (noisy != masks).flatten(1).any(1).float().mean() > 0.9, "noise should change almost every mask"
    # 16 px square, shifts up to 4 px and 2 px erosion: still overlapping, IoU 0.35..0.8 with this seed
    assert inter.min() > 0 and iou.min() > 0.25 and iou.max() < 1.0 and 0.4 < iou.mean() < 0.9


def test_noisy_mask_without_noise_is_the_reference_and_morphology_is_exact():
    masks = _square(40, 5, 22, 9, rows=30)  # off-centre, so a transform about the image centre would move it
    same = noisy_masks(masks, _gen(), max_rotation_deg=0, scale_range=(1, 1), max_shift=0, max_morph_radius=0)
    assert torch.equal(same, masks)
    morph = noisy_masks(masks, _gen(), max_rotation_deg=0, scale_range=(1, 1), max_shift=0, max_morph_radius=1)
    dilated, eroded = _square(40, 4, 21, 11)[0], _square(40, 6, 23, 7)[0]
    kinds = {
        (
            "same"
            if torch.equal(m, masks[0])
            else "dil"
            if torch.equal(m, dilated)
            else "ero"
            if torch.equal(m, eroded)
            else "?"
        )
        for m in morph
    }
    assert kinds == {"same", "dil", "ero"}


def test_noisy_mask_rotates_about_the_structure():
    masks = _square(64, 8, 40, 12, rows=40)
    rotated = noisy_masks(masks, _gen(), max_rotation_deg=15, scale_range=(1, 1), max_shift=0, max_morph_radius=0)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for m in rotated:
        assert abs((ys * m).sum() / m.sum() - 13.5) < 1 and abs((xs * m).sum() / m.sum() - 45.5) < 1


def test_correction_points_lie_in_the_error_region_with_the_right_sign():
    reference = _square(32, 4, 4, 12, rows=300)
    prediction = _square(32, 8, 8, 12, rows=300)
    points, labels = correction_points(prediction, reference, _gen())
    for (x, y), label in zip(points.long().tolist(), labels.tolist()):
        fn, fp = (
            bool(reference[0, y, x] and not prediction[0, y, x]),
            bool(prediction[0, y, x] and not reference[0, y, x]),
        )
        assert (label == 1 and fn) or (label == 0 and fp), f"click ({x}, {y}) label {label}"
    # uniform: FN and FP regions have 80 pixels each
    assert 0.35 < labels.float().mean() < 0.65
    points, labels = correction_points(reference[:1], reference[:1], _gen())
    assert labels.tolist() == [-1]


def test_generators_are_seeded():
    masks = _square(48, 10, 12, 15, rows=8)
    for fn in (interior_points, perturbed_boxes, noisy_masks):
        a, b = fn(masks, generator=_gen(3)), fn(masks, generator=_gen(3))
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(x, y)


def test_simulated_interaction_rounds_add_a_click_and_the_previous_mask():
    reference = _square(32, 5, 5, 10, rows=60)
    interaction = SimulatedInteraction(reference, rounds=1, generator=_gen())
    first = interaction.initial()
    kinds = (first.labels[:, -1] == 1).long() + 2 * first.has_box.long() + 4 * first.has_mask.long()
    assert set(kinds.tolist()) == {1, 2, 4}, "exactly one initial prompt kind per row, all kinds used"
    prediction = torch.zeros(60, 32, 32)
    prediction[:, 5:10, 5:15] = 5.0  # the upper half: the error is the missed lower half
    second = interaction.correct(prediction)
    assert second.points.shape[1] == first.points.shape[1] + 1
    assert (second.labels[:, -1] == 1).all(), "corrections in a missed region are positive"
    assert torch.equal(second.masks, (prediction > 0).expand_as(second.masks)) and second.has_mask.all()


# ---- network and loss ---------------------------------------------------------------------------------------
def test_ct_window_recovers_hounsfield_units():
    props = {"0": {"mean": 80.0, "std": 120.0}}
    (scale, shift), (zscale, zshift) = intensity_windows(["CTNormalization", "ZScoreNormalization"], props)
    hu = torch.tensor([-500.0, 0.0, 250.0, 1000.0])
    np.testing.assert_allclose(((hu - 80) / 120 * scale + shift).numpy(), [0, 1 / 3, 0.5, 1], atol=1e-6)
    np.testing.assert_allclose(np.array([-3.0, 0.0, 3.0]) * zscale + zshift, [0, 0.5, 1])


def test_loss_skips_structures_under_15_pixels():
    target = torch.zeros(1, 1, 32, 32)
    target[0, 0, :2, :7] = 1  # 14 pixels of class 1
    logits = torch.randn(1, 2, 32, 32, requires_grad=True)
    loss = RadSAMLoss()(logits, target)
    assert loss.item() == 0
    target[0, 0, 10:14, 10:14] = 2  # 16 pixels of class 2: only row 1 counts
    loss = RadSAMLoss()(logits, target)
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0


def test_network_decodes_one_mask_per_prompt_row():
    torch.manual_seed(0)
    net = RadSAMNetwork("tiny", 1, [32, 32], 32).eval()
    prompts = Prompts.empty(4, 32, 32).with_points(torch.full((4, 2), 10.0), torch.tensor([1, 0, -1, 1]))
    prompts = prompts.with_masks(_square(32, 2, 2, 8, rows=4) & torch.tensor([0, 0, 1, 1]).bool()[:, None, None])
    with torch.no_grad():
        out = net(torch.randn(2, 1, 32, 32), prompts)
    assert out.shape == (2, 2, 32, 32)
    with pytest.raises(ValueError, match="no prompt-free output"):
        net(torch.randn(1, 1, 32, 32))


def test_trainer_refuses_3d_configurations(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    with pytest.raises(ValueError, match="2d configuration"):
        RadSAMTrainer_tiny(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(2), CPU)
    trainer = RadSAMTrainer_tiny(minimal_plans([96, 96], "2d"), "2d", 0, dataset_json(2), CPU)
    assert trainer.plans_manager.plans["configurations"]["2d"]["patch_size"] == [96, 96], "whole 96 px slices"


# ---- 2. propagation and editing ---------------------------------------------------------------------------------
class FakeSlices:
    """Stands in for SliceModel: slice z -> ``truth[z]`` when prompted at all, minus pixels of negative clicks'
    columns; records every call."""

    def __init__(self, truth: np.ndarray) -> None:
        self.truth = truth
        self.shape = truth.shape
        self.calls: list[tuple[int, tuple]] = []

    def predict(self, z, clicks=(), box=None, mask=None):
        self.calls.append((z, tuple(clicks)))
        out = self.truth[z].copy()
        for _, x, positive in clicks:
            if not positive:
                out[:, int(x)] = False
        return out


def _cylinder(z: int = 12) -> np.ndarray:
    truth = np.zeros((z, 16, 16), dtype=bool)
    truth[:, 4:12, 4:12] = True
    return truth


def test_propagation_stops_at_the_boundaries():
    model = FakeSlices(_cylinder())
    seg = segment_from_prompt(model, Prompt("point", 5, point=(8, 8)), (3, 8))
    assert sorted(z for z, _ in model.calls) == [3, 4, 5, 6, 7, 8]
    assert seg.mask[3:9].any(axis=(1, 2)).all() and not seg.mask[:3].any() and not seg.mask[9:].any()
    assert [z for z, _ in model.calls][:4] == [5, 6, 7, 8], "upward from the prompt slice first"


def test_edit_changes_only_from_the_edited_slice_outward():
    model = FakeSlices(_cylinder())
    seg = segment_from_prompt(model, Prompt("box", 5, box=(4, 4, 11, 11)), (1, 10))
    model.calls.clear()
    edited = edit(model, seg, [Correction(7, 6, 9, positive=False)])
    # both ways (down to the prompt slice 5), each way only as far as the first slice the edit leaves unchanged
    assert sorted(z for z, _ in model.calls) == [6, 7, 8]
    np.testing.assert_array_equal(edited.mask[:7], seg.mask[:7])
    assert not edited.mask[7, :, 9].any() and seg.mask[7, :, 9].any()
    assert edited.mask[8:11].any() and not edited.mask[11:].any()
    # below the seed: only slices 3 .. 1 change
    model.calls.clear()
    below = edit(model, edited, [Correction(3, 6, 5, positive=False)])
    assert sorted(z for z, _ in model.calls) == [2, 3, 4]
    np.testing.assert_array_equal(below.mask[4:], edited.mask[4:])
    assert not below.mask[3, :, 5].any() and below.mask[3, :, 9].all() == edited.mask[3, :, 9].all()


class MaskFollowingSlices(FakeSlices):
    """FakeSlices that also keeps out what its mask prompt leaves out, so a correction continues to the next slice
    (edits spread only as far as the change continues)."""

    def predict(self, z, clicks=(), box=None, mask=None):
        out = super().predict(z, clicks, box, mask)
        return out & mask if mask is not None and mask.any() else out


def test_earlier_corrections_are_reused_when_their_slice_is_reached_again():
    model = MaskFollowingSlices(_cylinder())
    seg = segment_from_prompt(model, Prompt("point", 5, point=(8, 8)), (0, 11))
    seg = edit(model, seg, [Correction(8, 6, 10, positive=False)])
    model.calls.clear()
    stopped = edit(model, seg, [Correction(6, 6, 4, positive=False)])
    assert sorted(z for z, _ in model.calls) == [6, 7], "stops before slice 8 (a click) and the prompt slice 5"
    assert not stopped.mask[8, :, 10].any()
    model.calls.clear()
    seg = edit(model, seg, [Correction(6, 6, 4, positive=False)], through_clicks=True)
    assert (8, ((6, 10, False),)) in model.calls, "slice 8 must be re-segmented with its earlier click"
    assert not seg.mask[8, :, 10].any() and not seg.mask[6, :, 4].any()
    assert len(seg.corrections) == 2


def test_an_edit_on_the_seed_slice_repropagates_both_ways():
    model = FakeSlices(_cylinder())
    seg = segment_from_prompt(model, Prompt("point", 5, point=(8, 8)), (2, 9))
    model.calls.clear()
    edit(model, seg, [Correction(5, 6, 6, positive=False)])
    assert sorted(z for z, _ in model.calls) == [4, 5, 6], "both ways, each to the first slice it leaves unchanged"


class DyingPropagation(FakeSlices):
    """A structure that moves one column per slice; propagating upward loses it at slice ``dies`` (the mask prompt
    from slice dies - 1 gives an empty mask there), downward and with a click it is found."""

    def __init__(self, depth: int = 30, dies: int = 15) -> None:
        truth = np.zeros((depth, 16, 40), dtype=bool)
        for z in range(depth):
            truth[z, 4:12, z : z + 8] = True
        super().__init__(truth)
        self.dies = dies

    def predict(self, z, clicks=(), box=None, mask=None):
        came_from_below = mask is not None and np.array_equal(mask, self.truth[z - 1])
        if z == self.dies and came_from_below and not clicks:
            self.calls.append((z, ()))
            return np.zeros_like(self.truth[z])
        return super().predict(z, clicks, box, mask)


def test_a_click_beyond_a_gap_fills_it_back_to_the_prompt_slice():
    model = DyingPropagation()
    seg = segment_from_prompt(model, Prompt("point", 10, point=(8, 12)), (0, 29))
    present = seg.mask.any(axis=(1, 2))
    assert present[:15].all() and not present[15:].any(), "the stand-in's propagation dies at slice 15"
    model.calls.clear()
    edited = edit(model, seg, [Correction(20, 8, 22, positive=True)])
    np.testing.assert_array_equal(edited.mask, model.truth)  # 15-19 filled downward from 20, 21-29 upward
    # down to slice 14, the first one the fill leaves unchanged (never through the prompt slice 10)
    assert sorted(z for z, _ in model.calls) == list(range(14, 30))


def test_propagation_towards_a_fixed_slice_stops_where_it_dies():
    model = DyingPropagation(dies=16)
    seg = segment_from_prompt(model, Prompt("point", 10, point=(8, 12)), (0, 29))
    seg = edit(model, seg, [Correction(25, 8, 27, positive=True)])  # fills 16-29 (downward from 25 reaches 17..11)
    np.testing.assert_array_equal(seg.mask, model.truth)
    # negative clicks on 13 that finally empty it: going up (towards the click on 25) propagation stops at once
    # and 14-24 keep their masks; going down (towards the prompt slice) it stops too and 11-12 keep theirs
    model.dies = None
    removed = edit(model, seg, [Correction(13, 8, x, positive=False) for x in range(13, 21)])
    assert not removed.mask[13].any()
    np.testing.assert_array_equal(removed.mask[14:], model.truth[14:])
    np.testing.assert_array_equal(removed.mask[:13], model.truth[:13])


class FakeBoxSlices:
    """A box model (never trained with clicks or masks): everything of ``anatomy`` inside the box."""

    propagation = "box"

    def __init__(self, anatomy: np.ndarray) -> None:
        self.anatomy, self.shape = anatomy, anatomy.shape

    def predict(self, z, clicks=(), box=None, mask=None):
        y0, x0, y1, x1 = box
        out = np.zeros_like(self.anatomy[z])
        rows, cols = slice(int(np.ceil(y0)), int(y1) + 1), slice(int(np.ceil(x0)), int(x1) + 1)
        out[rows, cols] = self.anatomy[z][rows, cols]
        return out


def test_a_click_changes_only_its_own_error_region_and_edits_never_spread_beyond_it():
    target = np.zeros((6, 32, 32), dtype=bool)
    target[:, 10:20, 10:16] = True
    other = np.zeros_like(target)
    other[:, 10:12, 18:20] = True  # a separate structure the box model also finds
    model = FakeBoxSlices(target | other)
    mask = target.copy()
    mask[2] |= other[2]  # an earlier slice took the other structure in
    mask[3] = False  # the structure was lost on slice 3
    seg = from_mask(mask, (0, 5))
    edited = edit(model, seg, [Correction(3, 15, 12, positive=True)])
    # the box of slice 2's mask finds both structures on slice 3: only the part holding the click is added
    np.testing.assert_array_equal(edited.mask[3], target[3])
    np.testing.assert_array_equal(np.delete(edited.mask, 3, 0), np.delete(mask, 3, 0))
    # a negative click on the other structure removes it on slice 2 and nowhere it does not continue
    edited = edit(model, edited, [Correction(2, 10, 18, positive=False)])
    np.testing.assert_array_equal(edited.mask, target)


def test_seeding_from_an_existing_mask():
    auto = _cylinder()
    auto[:2] = False
    seg = from_mask(auto)
    assert seg.boundaries == (2, 11) and 2 <= seg.seed <= 11
    model = FakeSlices(_cylinder())
    edited = edit(model, seg, [Correction(11, 5, 5, positive=False)])
    # no slice of a given mask is fixed: from 11 downwards up to the first slice the click leaves unchanged
    assert sorted(z for z, _ in model.calls) == [10, 11]
    with pytest.raises(PromptError, match="empty"):
        from_mask(np.zeros((3, 4, 4), dtype=bool))
    np.testing.assert_array_equal(edited.mask[:11], auto[:11])


def test_real_network_is_deterministic_and_shrinks_large_slices():
    torch.manual_seed(0)
    net = RadSAMNetwork("tiny", 1, [32, 32], 32)
    volume = np.random.default_rng(0).normal(size=(1, 6, 48, 40)).astype(np.float32)
    prompt = Prompt("box", 2, box=(10, 8, 30, 30))
    results = []
    for _ in range(2):
        model = SliceModel(net, volume)
        seg = segment_from_prompt(model, prompt, (1, 4))
        seg = edit(model, seg, [Correction(3, 20, 20, True), Correction(2, 12, 12, False)])
        results.append(seg.mask)
    assert results[0].shape == (6, 48, 40)
    np.testing.assert_array_equal(results[0], results[1])
    assert not results[0][[0, 5]].any()


@pytest.mark.parametrize("propagation", ["mask", "box"])
def test_kept_slice_masks_change_no_result_and_spare_the_decodes_of_unchanged_prompts(propagation):
    torch.manual_seed(0)
    net = RadSAMNetwork("tiny", 1, [32, 32], 32, RadSAMOptions(input_contract=False, propagation=propagation))
    rng = np.random.default_rng(0)
    volume = np.zeros((1, 10, 32, 32), np.float32)
    volume[:, 1:9, 8:24, 8:24] = 3.0
    volume += rng.normal(scale=0.3, size=volume.shape).astype(np.float32)
    steps = [[Correction(6, 12, 12, True)], [Correction(3, 20, 20, False)], [Correction(6, 15, 10, True)]]
    plain, kept = SliceModel(net, volume), SliceModel(net, volume, cache_bytes=2**20)
    segmentations = []
    for model in (plain, kept):
        seg = segment_from_prompt(model, Prompt("box", 4, box=(8, 8, 23, 23)), (0, 9))
        for step in steps:
            seg = edit(model, seg, step)
        segmentations.append(seg)
    np.testing.assert_array_equal(segmentations[0].mask, segmentations[1].mask)
    assert segmentations[1].mask.any()
    assert kept.decoded < plain.decoded, "no slice prediction was taken from the kept masks"
    before = kept.decoded
    again = edit(kept, segmentations[1], steps[-1])  # the same click once more (e.g. after an undo)
    np.testing.assert_array_equal(again.mask, edit(plain, segmentations[0], steps[-1]).mask)
    assert kept.decoded - before < plain.decoded, "kept masks were not used"
    tiny = SliceModel(net, volume, cache_bytes=1)  # a budget under one mask keeps none and still answers
    np.testing.assert_array_equal(tiny.predict(4, box=(8, 8, 23, 23)), plain.predict(4, box=(8, 8, 23, 23)))
    assert not tiny._masks


@pytest.mark.parametrize("transpose", [[0, 1, 2], [2, 0, 1]])
def test_a_mask_goes_back_to_the_image_as_nnunets_export_puts_it(transpose, monkeypatch):
    """mask_to_original without resampling (it skips the logits) equals nnU-Net's export of the logits it stood
    for; with resampling it is that export."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_sam.inference import geometry as geometry_module
    from nnunet_sam.inference.geometry import mask_to_original
    from nnunet_sam.training.synthetic_plans import nnunet_preprocessing, plans_for_patch

    plans = plans_for_patch([16, 16, 16], "3d_fullres", **nnunet_preprocessing([2.0, 1.0, 1.5]))
    plans["transpose_forward"] = transpose
    plans["transpose_backward"] = [int(i) for i in np.argsort(transpose)]
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    labels = manager.get_label_manager(dataset_json(2))
    rng = np.random.default_rng(0)
    spacing = [float(configuration.spacing[i]) for i in manager.transpose_backward]
    for grid, shape_after in (((6, 10, 12), (6, 10, 12)), ((6, 10, 12), (5, 12, 9))):
        mask = rng.random(grid) > 0.6
        properties = {
            "spacing": spacing,
            "shape_before_cropping": [8, 13, 15],
            "bbox_used_for_cropping": [[1, 1 + shape_after[0]], [2, 2 + shape_after[1]], [0, shape_after[2]]],
            "shape_after_cropping_and_before_resampling": list(shape_after),
        }
        properties["shape_before_cropping"] = [
            properties["shape_before_cropping"][i] for i in manager.transpose_backward
        ]
        logits = torch.full((3, *grid), -10.0)
        logits[0] = 0
        logits[1] = torch.from_numpy(np.where(mask, 10.0, -10.0))
        expected = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, manager, configuration, labels, properties
        )
        with monkeypatch.context() as patched:
            if grid == shape_after:  # the direct way, not the export
                patched.setattr(geometry_module, "convert_predicted_logits_to_segmentation_with_correct_shape", None)
            result = mask_to_original(mask, manager, configuration, labels, properties)
        assert result.dtype == np.uint8 and result.any()
        np.testing.assert_array_equal(result, expected)


# ---- 4. bad prompts and prompt files ----------------------------------------------------------------------------
@pytest.fixture
def geometry() -> Geometry:
    properties = {
        "bbox_used_for_cropping": [[0, 10], [0, 32], [0, 32]],
        "shape_after_cropping_and_before_resampling": (10, 32, 32),
        "shape_before_cropping": (10, 32, 32),
        "sitk_stuff": {"spacing": (1.0, 1.0, 3.0), "origin": (-5.0, 0.0, 100.0), "direction": np.eye(3).ravel()},
    }
    return Geometry(properties, (10, 64, 64))  # in-plane resampled x2


def _prompt_file(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "point", "slice": 10, "point": [5, 5], "boundaries": [0, 9]}, r"slice 10 lies outside the volume"),
        ({"kind": "box", "slice": 3, "box": [2, 2, 40, 9], "boundaries": [0, 9]}, r"outside the image \(32 rows"),
        ({"kind": "point", "slice": 3, "point": [5, 5], "boundaries": [7, 2]}, r"boundaries reversed: lower slice 7"),
        ({"kind": "mask", "slice": 3, "boundaries": [0, 9]}, r"mask prompt is empty on slice 3"),
        ({"kind": "circle", "slice": 3}, r"unknown prompt kind 'circle'"),
        ({"kind": "point", "space": "world", "point": [0.0, 0.0, 200.0]}, r"slice 33 lies outside the volume"),
    ],
)
def test_bad_prompt_files_give_clear_messages(tmp_path, geometry, spec, message):
    with pytest.raises(PromptError, match=message):
        read_prompt_file(_prompt_file(tmp_path, spec), geometry, np.zeros((10, 64, 64), dtype=bool))


def test_prompt_file_voxel_and_world_coordinates(tmp_path, geometry):
    spec = {
        "kind": "point",
        "slice": 4,
        "point": [10, 6],
        "boundaries": [1, 8],
        "corrections": [{"slice": 5, "point": [3, 7], "positive": False}],
    }
    parsed = read_prompt_file(_prompt_file(tmp_path, spec), geometry)
    assert parsed.prompt == Prompt("point", 4, point=(20.5, 12.5)) and parsed.boundaries == (1, 8)
    assert parsed.corrections == (Correction(5, 6.5, 14.5, False),)
    world = {"kind": "point", "space": "world", "point": [1.0, 10.0, 112.0], "boundaries": [1, 8]}
    assert read_prompt_file(_prompt_file(tmp_path, world), geometry).prompt == Prompt("point", 4, point=(20.5, 12.5))


def test_api_refuses_bad_prompts():
    model = FakeSlices(_cylinder(6))
    with pytest.raises(PromptError, match="prompt slice 5 lies outside the boundaries"):
        segment_from_prompt(model, Prompt("point", 5, point=(3, 3)), (0, 3))
    with pytest.raises(PromptError, match="box .* reversed"):
        segment_from_prompt(model, Prompt("box", 2, box=(9, 9, 3, 3)), (0, 5))
    with pytest.raises(PromptError, match="mask prompt is empty"):
        segment_from_prompt(model, Prompt("mask", 2, mask=np.zeros((16, 16), dtype=bool)), (0, 5))
    seg = segment_from_prompt(model, Prompt("point", 2, point=(8, 8)), (1, 4))
    with pytest.raises(PromptError, match="outside the boundaries"):
        edit(model, seg, [Correction(5, 8, 8, True)])


# ---- 3. end to end ------------------------------------------------------------------------------------------
DATASET = 993


@pytest.mark.slow
def test_trained_tiny_radsam_segments_from_one_prompt_and_edits_improve_dice(tmp_path):
    from nnunet_sam.demo.phantoms import make_phantom_dataset

    bin_dir, env = Path(sys.executable).parent, nnunet_env(tmp_path, OMP_NUM_THREADS="1")
    # 64 px slices (organs of 26 to 900 pixels per slice) keep the CPU training short
    raw = make_phantom_dataset(tmp_path / "raw", DATASET, num_train=10, num_test=4, shape=(24, 64, 64), seed=0)
    run_tool([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "2d", "-np", "2"], env)
    trainer = "RadSAMTrainer_tiny_demo"
    run_tool([str(bin_dir / "nnUNetv2_train"), str(DATASET), "2d", "0", "-tr", trainer, "-device", "cpu"], env)
    model = tmp_path / "results" / raw.name / f"{trainer}__nnUNetPlans__2d"
    log = sorted((model / "fold_0").glob("training_log_*.txt"))[-1].read_text()
    assert "validation is skipped" in log  # the demo trainer's skip (CPUDemo) or RadSAM's prompt-free one

    volume_edits, slice_edits = (0, 4, 10), (0, 1, 3)
    bench = [sys.executable, "-m", "nnunet_sam.cli.benchmark_radsam", "-m", str(model), "-i", str(raw / "imagesTs")]
    bench += ["-l", str(raw / "labelsTs"), "--json", str(tmp_path / "bench.json")]
    bench += ["--edits", *map(str, volume_edits), "--slice-edits", *map(str, slice_edits)]
    out = run_tool(bench, env)
    print(out)
    mean = json.loads((tmp_path / "bench.json").read_text())["mean"]
    for kind in ("point", "box"):
        names = [f"volume {kind} +{n} edits" for n in volume_edits] + [f"slice {kind} +{n}/slice" for n in slice_edits]
        assert all(re.search(re.escape(n), out) for n in names), f"{names} missing from the table"
    gains = [mean[f"volume {k} +10 edits"] - mean[f"volume {k} +0 edits"] for k in ("point", "box")]
    gains += [mean[f"slice {k} +3/slice"] - mean[f"slice {k} +0/slice"] for k in ("point", "box")]
    print("mean Dice gain from editing:", [round(g, 3) for g in gains])
    assert np.mean(gains) > 0, f"editing did not improve Dice on average: {mean}"
    # chance level (a random mask with the organ's prevalence) is below 0.03 Dice on the phantom
    assert min(mean.values()) > 0.15, f"the trained model should segment the phantom organs: {mean}"

    # the console command: one prompt file -> a 3D mask with the image's geometry
    import SimpleITK as sitk

    image = sorted((raw / "imagesTs").glob("*.nii.gz"))[0]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / image.name.replace("_0000", ""))))
    liver = label == 1
    zs = np.flatnonzero(liver.any((1, 2)))
    z = int(zs[len(zs) // 2])
    ys, xs = np.nonzero(liver[z])
    spec = {
        "kind": "box",
        "slice": z,
        "box": [int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())],
        "boundaries": [int(zs[0]), int(zs[-1])],
        "corrections": [{"slice": z, "point": [int(ys.mean()), int(xs.mean())]}],
    }
    prompt = _prompt_file(tmp_path, spec)
    output = tmp_path / "liver.nii.gz"
    run_tool(
        [
            sys.executable,
            "-m",
            "nnunet_sam.cli.segment_radsam",
            "-i",
            str(image),
            "-o",
            str(output),
            "-m",
            str(model),
            "--prompt",
            prompt,
            "--label",
            "1",
        ],
        env,
    )
    written, reference = sitk.ReadImage(str(output)), sitk.ReadImage(str(image))
    assert written.GetSize() == reference.GetSize() and written.GetOrigin() == reference.GetOrigin()
    assert written.GetSpacing() == reference.GetSpacing()
    mask = sitk.GetArrayFromImage(written) > 0
    assert not mask[: zs[0]].any() and not mask[zs[-1] + 1 :].any(), "the mask left the boundaries"

    # editing an existing 3D mask (here the reference): a click on the top slice re-propagates from there, within
    # the boundaries (no slice of a given mask is fixed)
    top = int(zs[-1])
    ys, xs = np.nonzero(liver[top])
    click = {"corrections": [{"slice": top, "point": [int(ys[0]), int(xs[0])], "positive": False}]}
    edited_file = tmp_path / "liver_edited.nii.gz"
    start = ["--start", str(raw / "labelsTs" / image.name.replace("_0000", "")), "--start-label", "1"]
    cmd = [
        sys.executable,
        "-m",
        "nnunet_sam.cli.segment_radsam",
        "-i",
        str(image),
        "-o",
        str(edited_file),
        "-m",
        str(model),
    ]
    run_tool(cmd + start + ["--prompt", _prompt_file(tmp_path, click)], env)
    edited = sitk.GetArrayFromImage(sitk.ReadImage(str(edited_file))) > 0
    assert not edited[top + 1 :].any() and not edited[: zs[0]].any(), "the edit left the boundaries"
    print("Dice of the edited reference vs the reference:", 2 * (edited & liver).sum() / (edited.sum() + liver.sum()))


# ---- the paper's training recipe: oracle multi-mask loss, random HU windows, AdamW -------------------------------
def test_oracle_loss_is_the_primary_plus_the_best_of_the_other_three():
    from nnunet_sam.losses.segmentation import dice_bce_per_mask, oracle_multimask_loss

    target = torch.zeros(1, 1, 16, 16)
    target[0, 0, 4:12, 4:12] = 1
    good = torch.where(target[0, 0] > 0, 8.0, -8.0)  # right everywhere
    bad = -good  # wrong everywhere
    half = good.clone()
    half[:8] = -8.0  # right in the lower half only
    # primary = half; others: bad, good, bad -> primary's loss + the good one's
    logits = torch.stack([half, bad, good, bad])[None, None, None].clone().requires_grad_(True)  # (S, B, K, 4, ...)
    loss = RadSAMLoss()(logits, target)
    ref = target[0, 0].flatten()
    per_mask = dice_bce_per_mask(torch.stack([half, bad, good, bad]).flatten(1), ref)
    assert per_mask[2] < per_mask[0] < per_mask[1] == per_mask[3]
    assert loss.item() == pytest.approx((per_mask[0] + per_mask[2]).item(), rel=1e-6)
    loss.backward()
    grads = logits.grad[0, 0, 0].flatten(1).abs().sum(1)
    assert grads[0] > 0 and grads[2] > 0 and grads[1] == 0 and grads[3] == 0, "only primary and best get gradient"
    torch.testing.assert_close(oracle_multimask_loss(torch.tensor([[1.0, 5.0, 2.0, 3.0]])), torch.tensor([3.0]))
    # single-mask logits keep the old loss (Dice + BCE of the one mask)
    single = RadSAMLoss()(half[None, None, None], target)
    assert single.item() == pytest.approx(per_mask[0].item(), rel=1e-6)


def test_training_forward_returns_sams_four_masks_and_old_models_one():
    import dataclasses

    from nnunet_sam.network_architectures.radsam import RadSAMOptions

    torch.manual_seed(0)
    reference = torch.zeros(2, 32, 32, dtype=torch.bool)
    reference[:, 8:24, 8:24] = True
    for multimask, shape in ((True, (3, 2, 1, 4, 32, 32)), (False, (3, 2, 1, 32, 32))):
        net = RadSAMNetwork("tiny", 1, [32, 32], 32, options=RadSAMOptions(multimask_training=multimask)).train()
        out = net(torch.randn(2, 1, 32, 32), interaction=SimulatedInteraction(reference, rounds=2))
        assert out.shape == shape
    # the primary of the four masks is exactly the single-mask output of the same prompts
    net.eval()
    prompts = Prompts.empty(2, 32, 32).with_points(torch.full((2, 2), 12.0), torch.tensor([1, 1]))
    with torch.no_grad():
        embedding = net.embed(torch.randn(2, 1, 32, 32))
        four, one = net.decode_prompts(embedding, prompts, True), net.decode_prompts(embedding, prompts)
    torch.testing.assert_close(four[:, :, 0], one)
    legacy = {f.name: f.metadata["legacy"] for f in dataclasses.fields(RadSAMOptions) if "legacy" in f.metadata}
    assert legacy == {  # models saved before: primary mask only, the stem and prompts they were trained with
        "multimask_training": False,
        "input_contract": False,
        "prompt_tokens": "padded",
        "propagation": "mask",
        "native_spacing": False,
    }


def test_random_hu_windows_differ_between_batches_and_hit_their_window():
    from nnunet_sam.network_architectures.radsam import apply_windows, random_ct_windows

    props = {"0": {"mean": 80.0, "std": 120.0}}
    schemes = ["CTNormalization", "ZScoreNormalization"]
    windows = intensity_windows(schemes, props)
    generator = torch.Generator().manual_seed(0)
    first = random_ct_windows(windows, schemes, props, (-500.0, 1000.0), 0.1, 4, generator)
    second = random_ct_windows(windows, schemes, props, (-500.0, 1000.0), 0.1, 4, generator)
    assert not torch.equal(first, second) and len({tuple(r) for r in first[:, 0].tolist()}) == 4
    assert torch.equal(first[:, 1], torch.tensor([[1.0, 0.0]] * 4)), "non-CT channels are left alone"
    # what the network then sees: clip((HU - low') / (high' - low')) with bounds within 10 % of the width (150 HU)
    hu = torch.tensor([-700.0, -650.0, -350.0, 850.0, 1150.0, 1200.0])
    x = torch.stack([(hu - 80) / 120, torch.zeros_like(hu)])[None].expand(4, -1, -1)  # (B, M, N)
    seen = apply_windows(x, first)[:, 0] * windows[0][0] + windows[0][1]
    assert bool((seen[:, 0] < 0).all() and (seen[:, 2] > 0).all() and (seen[:, 3] < 1).all() and (seen[:, 5] > 1).all())
    total_scale = windows[0][0] * first[:, 0, 0]
    total_shift = windows[0][0] * first[:, 0, 1] + windows[0][1]
    low, high = 80 - 120 * total_shift / total_scale, 80 + 120 * (1 - total_shift) / total_scale  # seen 0 and 1
    assert bool(((low + 500).abs() <= 150 + 1e-3).all() and ((high - 1000).abs() <= 150 + 1e-3).all())
    assert len({round(v, 3) for v in low.tolist()}) == 4
    identity = random_ct_windows(windows, schemes, props, (-500.0, 1000.0), 0.0, 2)
    assert torch.equal(identity, torch.tensor([[[1.0, 0.0]] * 2] * 2))


def test_full_fine_tune_uses_adamw_by_default_and_sgd_by_name():
    """AdamW 1e-5 is the default (chosen from nnunet_sam.benchmarking.finetune_drift); the earlier SGD by name."""
    from nnunet_sam.trainers.radsam import (
        RadSAMTrainer,
        RadSAMTrainer_AdamW,
        RadSAMTrainer_LiteMedSAM,
        RadSAMTrainer_SGD,
        RadSAMTrainer_tiny,
    )

    for cls in (RadSAMTrainer, RadSAMTrainer_AdamW, RadSAMTrainer_LiteMedSAM):
        assert (cls.optimizer_name, cls.learning_rate) == ("adamw", 1e-5)
    assert (RadSAMTrainer_SGD.optimizer_name, RadSAMTrainer_SGD.learning_rate) == ("sgd", None)  # nnU-Net's 1e-2
    assert (RadSAMTrainer_tiny.optimizer_name, RadSAMTrainer_tiny.learning_rate) == ("adamw", 1e-3)  # from scratch


def test_trainer_varies_the_ct_window_of_each_training_slice(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    plans = minimal_plans([32, 32], "2d")
    plans["configurations"]["2d"]["normalization_schemes"] = ["CTNormalization"]
    plans["foreground_intensity_properties_per_channel"] = {"0": {"mean": 80.0, "std": 120.0}}
    trainer = RadSAMTrainer_tiny(plans, "2d", 0, dataset_json(2), torch.device("cpu"))
    data = torch.linspace(-5, 5, 32 * 32).reshape(1, 1, 32, 32).repeat(2, 1, 1, 1)  # two identical slices
    first, second = trainer.random_hu_windows(data), trainer.random_hu_windows(data)
    assert not torch.equal(first, second) and not torch.equal(first[0], first[1]), "per slice and per batch"
    trainer.hu_window_jitter = 0.0
    torch.testing.assert_close(trainer.random_hu_windows(data), data)


# ---- the paper's protocol and slice sampling (issue 25, item 13) ---------------------------------------------------
def test_training_slices_are_drawn_at_labelled_voxels(tmp_path, monkeypatch):
    """nnU-Net's default draws two thirds of the slices anywhere; slices without a structure give RadSAM no loss."""
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    trainer = RadSAMTrainer_tiny(minimal_plans([64, 64], "2d"), "2d", 0, dataset_json(2), torch.device("cpu"))
    assert trainer.oversample_foreground_percent == 1.0


def test_volume_level_edits_pass_clicked_slices_by_default(monkeypatch):
    """The paper's reading of editing: re-propagation passes slices that hold earlier clicks (through_clicks)."""
    from nnunet_sam.evaluation import radsam as bench

    seen = []
    real_edit = bench.edit
    monkeypatch.setattr(bench, "edit", lambda *a, **k: seen.append(k.get("through_clicks")) or real_edit(*a, **k))
    truth = _cylinder(8)
    reference = truth.copy()
    reference[:, 4:12, 11] = False  # the fake model over-segments one column: an error to click on
    args = (FakeSlices(truth), reference, "point", (0, 2), np.random.default_rng(0), torch.Generator().manual_seed(0))
    bench.volume_level(*args)
    assert seen and all(seen)
    seen.clear()
    bench.volume_level(*args, through_clicks=False)
    assert seen and not any(seen)


def test_dice_in_the_original_grid_maps_the_mask_back_first():
    """3D Dice in the image grid: the model-grid mask goes through the model's export mapping, then meets the
    reference as read (here the model grid is the image grid subsampled 2x in-plane)."""
    from nnunet_sam.evaluation.radsam import original_grid_score

    class Model:
        def to_original(self, mask, properties):
            return mask.repeat(2, axis=1).repeat(2, axis=2).astype(np.uint8)

    original = np.zeros((4, 16, 16), dtype=bool)
    original[:, 4:12, 4:12] = True
    model_grid = original[:, ::2, ::2]
    score = original_grid_score(Model(), {}, original)
    assert score(model_grid) == 1.0
    shifted = np.roll(model_grid, 1, axis=2)
    assert score(shifted) == pytest.approx(2 * (4 * 8 * 6) / (2 * 4 * 8 * 8))


def test_training_without_mask_prompts_uses_clicks_and_boxes_only():
    """RadSAM's Table 9 row "without mask": no noisy-mask initial prompt and no mask prompt in the edit rounds."""
    reference = torch.zeros(64, 32, 32, dtype=torch.bool)
    reference[:, 8:24, 8:24] = True
    for mask_prompts in (True, False):
        interaction = SimulatedInteraction(reference, 1, torch.Generator().manual_seed(0), mask_prompts=mask_prompts)
        first = interaction.initial()
        corrected = interaction.correct(torch.randn(64, 32, 32))
        assert bool(first.has_mask.any()) == mask_prompts  # 64 rows: about a third draw a mask prompt
        assert bool(corrected.has_mask.any()) == mask_prompts
    assert (RadSAMTrainer_AMOS_noMask.training_mask_prompts, RadSAMTrainer_AMOS_noEdit.correction_rounds) == (False, 0)


# ---- evaluation rows of the paper's Tables 5 and 6 and PanSAM's "SAM" row (issue 25, item 8) ----------------------
def test_slice_model_gives_sams_four_masks_with_the_primary_first():
    """RadSAM's oracle (Table 6) picks among SAM's multimask outputs: both input paths return them, primary first."""
    torch.manual_seed(0)
    volume = np.random.default_rng(0).normal(size=(1, 3, 48, 40)).astype(np.float32)
    for options in (RadSAMOptions(), RadSAMOptions(input_contract=False)):
        model = SliceModel(RadSAMNetwork("tiny", 1, [32, 32], 32, options=options), volume)
        every = model.predict(1, [(20.0, 18.0, True)], box=(10, 8, 30, 30), all_masks=True)
        assert every.shape == (4, 48, 40) and every.dtype == bool
        np.testing.assert_array_equal(every[0], model.predict(1, [(20.0, 18.0, True)], box=(10, 8, 30, 30)))


class MultimaskSlices(FakeSlices):
    """FakeSlices whose primary mask misses a column of the truth; its second multimask output is the truth."""

    def predict(self, z, clicks=(), box=None, mask=None, all_masks=False):
        self.calls.append((z, tuple(clicks)))
        primary = self.truth[z].copy()
        primary[:, 5] = False
        if not all_masks:
            return primary
        return np.stack([primary, np.zeros_like(primary), self.truth[z], primary])


def test_oracle_setting_scores_each_slices_best_multimask_output():
    from nnunet_sam.evaluation.radsam import slice_level

    truth = _cylinder(6)
    args = (MultimaskSlices(truth), truth, "box", (0,), np.random.default_rng(0), torch.Generator().manual_seed(0))
    plain = slice_level(*args)
    scores = slice_level(*args, oracle=True)
    assert set(plain) == {0} and set(scores) == {0, "oracle"}
    assert scores[0] == plain[0] < 1.0 and scores["oracle"] == 1.0


def test_box_propagation_is_an_evaluation_setting_of_any_model():
    """RadSAM's Table 5: a mask-propagation model evaluated with the box of the neighbour's mask instead."""
    torch.manual_seed(0)
    net = RadSAMNetwork("tiny", 1, [32, 32], 32).eval()
    volume = np.random.default_rng(0).normal(size=(1, 5, 32, 32)).astype(np.float32)
    assert SliceModel(net, volume).propagation == "mask"
    model = SliceModel(net, volume, propagation="box")
    assert model.propagation == "box"
    previous = np.zeros((32, 32), dtype=bool)
    previous[8:20, 8:20] = True
    for propagation, wants_mask in ((None, True), ("box", False)):
        model = SliceModel(net, volume, propagation=propagation)
        prompts = []

        def recording(z, clicks=(), box=None, mask=None, real=model.predict, seen=prompts, **k):
            seen.append((box, mask))
            return real(z, clicks, box, mask, **k)

        model.predict = recording
        follow(model, 3, previous, [])  # slice 3 from its neighbour's mask
        (box, mask), *_ = prompts
        assert (mask is not None, box is not None) == (wants_mask, not wants_mask)
    with pytest.raises(ValueError, match="propagation must be one of"):
        SliceModel(net, volume, propagation="points")


def test_point_prompts_take_several_points_at_slice_level():
    """PanSAM's "SAM" row: un-tuned SAM prompted with 5 points per slice drawn inside the reference."""
    from nnunet_sam.cli.benchmark_radsam import main
    from nnunet_sam.evaluation.radsam import slice_level, slice_prompt

    truth = _cylinder(3)
    drawn = slice_prompt("point", truth[0], torch.Generator().manual_seed(0), points=5)
    assert len(drawn["points"]) == 5 and drawn["point"] == drawn["points"][0]
    assert all(truth[0][round(y), round(x)] for y, x in drawn["points"])
    model = FakeSlices(truth)
    slice_level(model, truth, "point", (0,), np.random.default_rng(0), torch.Generator().manual_seed(0), points=5)
    assert [len(clicks) for _, clicks in model.calls] == [5, 5, 5]
    assert all(positive for _, clicks in model.calls for *_, positive in clicks)
    with pytest.raises(SystemExit) as exit_info:  # the volume level takes one prompt: refused before any loading
        main(["-m", "none", "-i", "none", "-l", "none", "--points", "5"])
    assert exit_info.value.code == 2


class _BenchModel:
    """Stands in for RadSAMModel in run_benchmark: a tiny RadSAM network on a given volume and label, model grid =
    image grid (nothing to read, preprocess or map back)."""

    def __init__(self, volume: np.ndarray, label: np.ndarray) -> None:
        torch.manual_seed(0)
        self.network = RadSAMNetwork("tiny", 1, [32, 32], 32).eval()
        self.device = "cpu"
        self.dataset_json = {"file_ending": ".nii.gz", "labels": {"background": 0, "organ": 1}}
        self.volume, self.label = volume, label
        self.reader = type("Reader", (), {"read_seg": lambda _, path: (self.label[None], {})})()

    def read(self, files):
        return self.volume, {}

    def preprocess(self, image, properties, seg):
        return image, seg, properties

    def to_original(self, mask, properties):
        return mask.astype(np.uint8)


def test_benchmark_runs_the_tables_evaluation_settings(tmp_path):
    """``run_benchmark`` wiring of the Tables 5/6 and the 5-point settings: the settings named in the table, the
    propagation recorded, refusals for settings that do not go together."""
    from nnunet_sam.evaluation.radsam import run_benchmark

    (tmp_path / "case_0000.nii.gz").touch()
    (tmp_path / "case.nii.gz").touch()
    label = _cylinder(4).astype(np.int16)
    model = _BenchModel(np.random.default_rng(0).normal(size=(1, 4, 16, 16)).astype(np.float32), label)
    run = dict(images=str(tmp_path), labels=str(tmp_path), volume_edits=(0,), slice_edits=(0,))
    table5 = run_benchmark(model, kinds=("box", "point"), levels=("volume",), propagation="box", **run)
    assert table5["settings"] == ["volume box +0 edits", "volume point +0 edits"] and table5["propagation"] == "box"
    assert run_benchmark(model, kinds=("box",), levels=("volume",), **run)["propagation"] == "mask"  # the model's
    table6 = run_benchmark(model, kinds=("box",), levels=("slice",), oracle=True, **run)
    assert table6["settings"] == ["slice box +0/slice", "slice box oracle"]
    assert all(0.0 <= value <= 1.0 for value in table6["mean"].values())
    sam_row = run_benchmark(model, kinds=("point",), levels=("slice",), points=5, **run)
    assert sam_row["settings"] == ["slice point +0/slice"] and sam_row["points"] == 5
    with pytest.raises(ValueError, match="5 points per prompt"):
        run_benchmark(model, kinds=("point",), points=5, **run)  # the volume level takes one prompt
    with pytest.raises(ValueError, match="levels must be among"):
        run_benchmark(model, levels=("3d",), **run)

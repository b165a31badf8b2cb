"""Tests for nnunet_sam.losses (pairwise costs, GIoU, MaskSetCriterion)."""

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_sam.losses import segmentation
from nnunet_sam.losses import set_criterion as losses
from nnunet_sam.losses.mask_classification import segments_from_labels, semantic_log_probs
from nnunet_sam.losses.set_criterion import (
    MaskSetCriterion,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    pairwise_bce,
    pairwise_dice,
    pairwise_l1,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_weight_constants():
    assert losses.CLASS_WEIGHT == 0.2
    assert losses.NO_OBJECT_WEIGHT == 0.1
    assert losses.MASK_BCE_WEIGHT == 1.2
    assert losses.MASK_DICE_WEIGHT == 1.2
    assert losses.AUX_MASK_WEIGHT == 0.5
    assert losses.BOX_L1_WEIGHT == 0.5
    assert losses.BOX_GIOU_WEIGHT == 0.2


def test_giou_hand_computed():
    identical = torch.tensor([0.1, 0.2, 0.5, 0.9])
    assert float(elementwise_generalized_box_iou(identical, identical)) == pytest.approx(1.0, abs=1e-6)
    # Disjoint: union 0.04 + 0.04 = 0.08, enclosing box 0.6 x 0.6 = 0.36 -> 0 - 0.28 / 0.36.
    a, b = torch.tensor([0.0, 0.0, 0.2, 0.2]), torch.tensor([0.4, 0.4, 0.6, 0.6])
    assert float(elementwise_generalized_box_iou(a, b)) == pytest.approx(-0.28 / 0.36, abs=1e-6)
    # Overlap: intersection 0.0625, union 0.4375, enclosing 0.5625.
    a, b = torch.tensor([0.0, 0.0, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.75, 0.75])
    expected = 0.0625 / 0.4375 - (0.5625 - 0.4375) / 0.5625
    assert float(elementwise_generalized_box_iou(a, b)) == pytest.approx(expected, abs=1e-6)
    # Pairwise agrees with elementwise, shape (S, N, M).
    boxes1 = torch.stack([identical, a]).unsqueeze(0)
    boxes2 = torch.stack([identical, b, torch.tensor([0.4, 0.4, 0.6, 0.6])]).unsqueeze(0)
    pairwise = generalized_box_iou(boxes1, boxes2)
    assert pairwise.shape == (1, 2, 3)
    for i in range(2):
        for j in range(3):
            assert float(pairwise[0, i, j]) == pytest.approx(
                float(elementwise_generalized_box_iou(boxes1[0, i], boxes2[0, j])), abs=1e-6
            )
    assert float(pairwise[0, 1, 1]) == pytest.approx(expected, abs=1e-6)


def test_giou_degenerate_boxes_finite():
    zero = torch.zeros(4)
    assert torch.isfinite(elementwise_generalized_box_iou(zero, zero))
    half = torch.tensor([0.1, 0.1, 0.4, 0.4], dtype=torch.float16)
    out = elementwise_generalized_box_iou(half, half)
    assert out.dtype == torch.float32


def test_pairwise_costs_equal_naive_loops():
    gen = torch.Generator().manual_seed(0)
    s, n, c, p = 2, 3, 4, 17
    logits = torch.randn(s, n, p, generator=gen) * 3
    targets = (torch.rand(s, c, p, generator=gen) > 0.5).float()
    boxes1 = torch.rand(s, n, 4, generator=gen)
    boxes2 = torch.rand(s, c, 4, generator=gen)
    bce, dice, l1 = pairwise_bce(logits, targets), pairwise_dice(logits, targets), pairwise_l1(boxes1, boxes2)
    assert bce.shape == dice.shape == l1.shape == (s, n, c)
    for i in range(s):
        for j in range(n):
            for k in range(c):
                x, t = logits[i, j], targets[i, k]
                assert float(bce[i, j, k]) == pytest.approx(float(F.binary_cross_entropy_with_logits(x, t)), rel=1e-5)
                sig = x.sigmoid()
                naive_dice = 1 - (2 * (sig * t).sum() + 1) / (sig.sum() + t.sum() + 1)
                assert float(dice[i, j, k]) == pytest.approx(float(naive_dice), rel=1e-5, abs=1e-6)
                naive_l1 = (boxes1[i, j] - boxes2[i, k]).abs().sum()
                assert float(l1[i, j, k]) == pytest.approx(float(naive_l1), rel=1e-5)


def _target() -> torch.Tensor:
    """(B=1, 1, D=2, 16, 16) label map with C = 4 classes (slice 0: 0, 1, 2; slice 1: 0, 1, 3)."""
    labels = torch.zeros(1, 1, 2, 16, 16)
    labels[0, 0, 0, 2:7, 3:12] = 1
    labels[0, 0, 0, 9:14, 5:9] = 2
    labels[0, 0, 1, 4:12, 4:10] = 3
    labels[0, 0, 1, 12:15, 1:15] = 1
    return labels


def _perfect_outputs(target: torch.Tensor, num_classes: int, num_queries: int) -> dict:
    b, _, d, h, w = target.shape
    masks, present, boxes = segments_from_labels(target.reshape(b * d, h, w), num_classes)
    s = b * d
    logits = torch.full((s, num_queries, num_classes + 1), -10.0)
    pred_masks = torch.full((s, num_queries, h, w), -10.0)
    pred_boxes = torch.zeros(s, num_queries, 4)
    for i in range(s):
        classes = torch.nonzero(present[i]).flatten().tolist()
        for q in range(num_queries):
            if q < len(classes):
                logits[i, q, classes[q]] = 10.0
                pred_masks[i, q] = masks[i, classes[q]].float() * 20 - 10
                pred_boxes[i, q] = boxes[i, classes[q]]
            else:
                logits[i, q, num_classes] = 10.0
                pred_boxes[i, q] = torch.tensor([0.4, 0.4, 0.6, 0.6])
    return {
        "pred_logits": logits.reshape(b, d, num_queries, -1),
        "pred_masks": pred_masks.reshape(b, d, num_queries, h, w),
        "aux_masks": pred_masks.reshape(b, d, num_queries, h, w).clone(),
        "pred_boxes": pred_boxes.reshape(b, d, num_queries, 4),
    }


def _random_outputs(b: int, d: int, n: int, c: int, h: int, w: int, requires_grad: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1)
    lo = torch.rand(b, d, n, 2, generator=gen) * 0.5
    outputs = {
        "pred_logits": torch.randn(b, d, n, c + 1, generator=gen),
        "pred_masks": torch.randn(b, d, n, h, w, generator=gen),
        "aux_masks": torch.randn(b, d, n, h, w, generator=gen),
        "pred_boxes": torch.cat([lo, lo + 0.4], dim=-1),
    }
    return {k: v.requires_grad_(requires_grad) for k, v in outputs.items()}


def test_criterion_finite_and_differentiable():
    criterion = MaskSetCriterion(num_classes=4)
    outputs = _random_outputs(1, 2, 5, 4, 16, 16, requires_grad=True)
    loss = criterion(outputs, _target())
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for key, value in outputs.items():
        assert value.grad is not None and torch.isfinite(value.grad).all(), key
        assert value.grad.abs().sum() > 0, key
    assert set(criterion.last_components) >= {"class", "mask_bce", "mask_dice", "box_l1", "box_giou", "total"}
    assert criterion.last_components["total"] == pytest.approx(loss.item(), rel=1e-6)


def test_criterion_point_sampling_half_and_2d_target():
    criterion = MaskSetCriterion(num_classes=4, num_points=50)
    outputs = {k: v.half() for k, v in _random_outputs(2, 1, 5, 4, 16, 16).items()}
    target = _target()[:, :, 0].repeat(2, 1, 1, 1)  # (B=2, 1, H, W)
    loss = criterion(outputs, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_criterion_shape_errors():
    criterion = MaskSetCriterion(num_classes=3)
    with pytest.raises(AssertionError, match="num_classes"):
        criterion(_random_outputs(1, 2, 5, 4, 16, 16), _target())
    criterion = MaskSetCriterion(num_classes=4)
    with pytest.raises(AssertionError, match="target must have shape"):
        criterion(_random_outputs(1, 3, 5, 4, 16, 16), _target())
    with pytest.raises(ValueError, match="number of queries must be raised"):
        criterion(_random_outputs(1, 2, 2, 4, 16, 16), _target())


def test_perfect_prediction_beats_random():
    criterion = MaskSetCriterion(num_classes=4)
    target = _target()
    perfect = criterion(_perfect_outputs(target, 4, 5), target)
    random = criterion(_random_outputs(1, 2, 5, 4, 16, 16), target)
    assert float(perfect) < 0.05 * float(random)
    assert float(perfect) < 0.05


def test_optimising_free_tensors_fits_target():
    torch.manual_seed(0)
    b, d, n, c, h, w = 1, 2, 5, 4, 16, 16
    target = _target()
    init = _random_outputs(b, d, n, c, h, w)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    criterion = MaskSetCriterion(num_classes=c)
    optimizer = torch.optim.Adam(params.values(), lr=0.1)
    first = criterion(params, target).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = criterion(params, target)
        loss.backward()
        optimizer.step()
    final = criterion(params, target).item()
    assert final < first / 10
    with torch.no_grad():
        prediction = semantic_log_probs(params["pred_logits"], params["pred_masks"]).argmax(dim=1)
    accuracy = (prediction == target[:, 0].long()).float().mean()
    assert accuracy > 0.95


def test_class_loss_and_total_match_hand_computation():
    target = _target()
    num_classes, num_queries = 4, 5
    outputs = _perfect_outputs(target, num_classes, num_queries)
    # Random class logits: the +/-10 masks and exact boxes still force the "perfect" matching.
    outputs["pred_logits"] = torch.randn(1, 2, num_queries, num_classes + 1, generator=torch.Generator().manual_seed(3))
    outputs["aux_masks"] = outputs["aux_masks"] * 0.2  # softer auxiliary masks: distinct aux terms
    outputs["pred_boxes"] = outputs["pred_boxes"] + torch.tensor([0.01, -0.02, -0.01, 0.02])  # L1 = 0.06
    criterion = MaskSetCriterion(num_classes=num_classes, num_points=256, point_sampling="pixels")  # all pixels
    loss = criterion(outputs, target)

    gt_masks, present, _ = segments_from_labels(target.reshape(2, 16, 16), num_classes)
    log_probs = outputs["pred_logits"].reshape(2, num_queries, -1).log_softmax(-1)
    weighted_nll, weight_sum = 0.0, 0.0
    for s in range(2):
        classes = torch.nonzero(present[s]).flatten().tolist()
        for q in range(num_queries):
            cls = classes[q] if q < len(classes) else num_classes
            weight = 1.0 if cls < num_classes else losses.NO_OBJECT_WEIGHT
            weighted_nll += -weight * float(log_probs[s, q, cls])
            weight_sum += weight
    parts = criterion.last_components
    # Matched masks have |logit| = 10 (final) and 2 (auxiliary) with the correct sign everywhere.
    assert parts["mask_bce"] == pytest.approx(math.log1p(math.exp(-10.0)), abs=1e-6)
    assert parts["aux_bce"] == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-4)
    areas = gt_masks.flatten(2).sum(-1)[present]  # (K,) pixels per ground-truth segment
    inside, outside = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-2.0))
    aux_dice = 1 - (2 * areas * inside + 1) / (areas * inside + (256 - areas) * outside + areas + 1)
    assert parts["aux_dice"] == pytest.approx(float(aux_dice.mean()), rel=1e-4)
    assert parts["class"] == pytest.approx(weighted_nll / weight_sum, rel=1e-5)
    expected_total = (
        losses.CLASS_WEIGHT * parts["class"]
        + losses.MASK_BCE_WEIGHT * parts["mask_bce"]
        + losses.MASK_DICE_WEIGHT * parts["mask_dice"]
        + losses.AUX_MASK_WEIGHT * (parts["aux_bce"] + parts["aux_dice"])
        + losses.BOX_L1_WEIGHT * parts["box_l1"]
        + losses.BOX_GIOU_WEIGHT * parts["box_giou"]
    )
    assert loss.item() == pytest.approx(expected_total, rel=1e-5)
    assert parts["box_l1"] == pytest.approx(0.06, abs=1e-5)
    assert 0.0 < parts["box_giou"] < 0.2


@pytest.mark.parametrize("size", [14, 28])
def test_deep_supervision_targets_are_nnunets_cell_centres(size):
    """224 -> 14 / 28 picks the label at each cell's centre, exactly as nnU-Net's own deep-supervision targets."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 1, 3, 224, 224)).float()
    ours = segmentation.downsample_target(target, (3, size, size))
    scale = (1.0, size / 224, size / 224)
    nnunet = torch.stack([DownsampleSegForDSTransform([scale])(segmentation=t)["segmentation"][0] for t in target])
    assert torch.equal(ours, nnunet.float())
    assert not torch.equal(ours, F.interpolate(target, (3, size, size))), "plain nearest differs (first pixel)"

    # the loss supervises each level with those targets: logits that fit them give (almost) no loss
    logits = F.one_hot(ours[:, 0].long(), 4).permute(0, 4, 1, 2, 3).float() * 30
    assert segmentation.DeepSupervisedSegLoss()({"aux": [logits]}, target).item() < 1e-3


def test_importance_sampling_is_denser_where_the_mask_is_uncertain():
    """Fixed logit map: an uncertain band (logit 0) over 1/8 of the slice, confident (+-10) elsewhere."""
    torch.manual_seed(0)
    logits = torch.full((64, 64), 10.0)
    logits[:, 32:] = -10.0
    logits[:, 28:36] = 0.0  # the band: 8 of 64 columns
    num_points, masks = 2000, 8
    idx = losses.uncertain_pixels(logits.flatten()[None].expand(masks, -1), num_points)
    assert idx.shape == (masks, num_points)
    in_band = ((idx % 64 >= 28) & (idx % 64 < 36)).float().mean().item()
    # Uniform points would put 1/8 in the band (std 0.0026 over 16000 points). Here the 4000 candidates per mask hold
    # ~500 band pixels, all among the 1500 most uncertain, plus 1/8 of the 500 uniform points: 0.28 of all points.
    assert in_band == pytest.approx(0.25 + 0.25 / 8, abs=0.02)
    uniform = losses.uncertain_pixels(logits.flatten()[None].expand(masks, -1), num_points, importance_sample_ratio=0)
    assert ((uniform % 64 >= 28) & (uniform % 64 < 36)).float().mean().item() == pytest.approx(1 / 8, abs=0.01)


def test_importance_sampling_density_falls_with_confidence():
    """A ramp of logits: the closer a column's logit is to 0, the more points it gets."""
    torch.manual_seed(1)
    logits = torch.linspace(-8, 8, 64).expand(64, 64)  # logit varies along columns
    idx = losses.uncertain_pixels(logits.flatten()[None].expand(8, -1), 2000)
    distance = (logits.flatten()[idx]).abs()  # |logit| at every sampled point
    counts = torch.histc(distance, bins=4, min=0, max=8).tolist()
    # expected per mask: 1125, 625, 125, 125 (the 1500 most uncertain of 4000 candidates have |logit| < 3)
    assert counts[0] > 1.5 * counts[1] > 1.5 * 3 * counts[2], f"points per |logit| bin should fall: {counts}"


def test_importance_sampled_loss_is_finite_and_near_zero_for_a_perfect_prediction():
    target = _target()
    criterion = MaskSetCriterion(num_classes=4)
    assert criterion.point_sampling == "importance"
    perfect = criterion(_perfect_outputs(target, 4, 5), target)
    assert perfect.item() < 0.05
    assert criterion.last_components["mask_bce"] < 1e-3


def test_public_per_dataset_mask_weights_reach_the_criterion(tmp_path, monkeypatch):
    from sam_testing import dataset_json, minimal_plans

    from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny

    assert losses.PUBLIC_MASK_WEIGHTS == {"ACDC": (1.5, 1.5), "Synapse": (1.5, 1.5), "AMOS": (1.2, 1.2)}
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)

    class ACDCWeights(MaskSAMTrainer_tiny):  # what a dataset preset sets
        mask_bce_weight, mask_dice_weight = losses.PUBLIC_MASK_WEIGHTS["ACDC"]

    for cls, expected in ((MaskSAMTrainer_tiny, (1.2, 1.2)), (ACDCWeights, (1.5, 1.5))):
        trainer = cls(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(3), torch.device("cpu"))
        criterion = trainer._build_loss()
        assert (criterion.mask_bce_weight, criterion.mask_dice_weight) == expected
        assert criterion.point_sampling == "importance" and criterion.oversample_ratio == 2.0
        assert criterion.importance_sample_ratio == 0.75

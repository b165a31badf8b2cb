"""Tests for nnunet_sam.losses.mask_classification (dataset mapping, boxes, semantic output)."""

import pytest
import torch

from nnunet_sam.losses.mask_classification import boxes_from_masks, segments_from_labels, semantic_log_probs


def _labels() -> torch.Tensor:
    """Two 4x6 slices, 4 classes; slice 0 lacks class 3, slice 1 is all class 2."""
    slice0 = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 1, 1, 0, 2, 0],
            [0, 0, 0, 0, 2, 2],
        ]
    )
    slice1 = torch.full((4, 6), 2)
    return torch.stack([slice0, slice1])


def test_segments_from_labels_masks_presence_boxes():
    labels = _labels()
    masks, present, boxes = segments_from_labels(labels, num_classes=4)
    assert masks.shape == (2, 4, 4, 6) and masks.dtype == torch.bool
    assert present.shape == (2, 4) and present.dtype == torch.bool
    assert boxes.shape == (2, 4, 4)
    for c in range(4):
        assert torch.equal(masks[:, c], labels == c)
    assert present.tolist() == [[True, True, True, False], [False, False, True, False]]
    w, h = 6.0, 4.0
    expected0 = torch.tensor(
        [
            [0 / w, 0 / h, 6 / w, 4 / h],  # background covers the whole slice's extent
            [1 / w, 1 / h, 3 / w, 3 / h],  # class 1: rows 1-2, cols 1-2
            [4 / w, 2 / h, 6 / w, 4 / h],  # class 2: rows 2-3, cols 4-5
            [0.0, 0.0, 0.0, 0.0],  # absent
        ]
    )
    expected1 = torch.tensor([[0.0] * 4, [0.0] * 4, [0.0, 0.0, 1.0, 1.0], [0.0] * 4])
    assert torch.allclose(boxes[0], expected0)
    assert torch.allclose(boxes[1], expected1)


def test_segments_from_labels_accepts_float_labels():
    masks, present, boxes = segments_from_labels(_labels().float(), num_classes=4)
    masks_i, present_i, boxes_i = segments_from_labels(_labels(), num_classes=4)
    assert torch.equal(masks, masks_i) and torch.equal(present, present_i) and torch.equal(boxes, boxes_i)


@pytest.mark.parametrize("bad", [4, -1])
def test_segments_from_labels_out_of_range(bad):
    labels = _labels()
    labels[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"0\.\.3"):
        segments_from_labels(labels, num_classes=4)


def test_boxes_from_masks_empty_and_leading_dims():
    masks = torch.zeros(2, 3, 5, 8, 10)
    masks[0, 1, 2, 3:6, 2:9] = 0.9
    masks[1, 2, 4, 7, 0] = 0.6
    masks[1, 0, 0, 0, 0] = 0.4  # below the threshold: still empty
    boxes, nonempty = boxes_from_masks(masks)
    assert boxes.shape == (2, 3, 5, 4) and nonempty.shape == (2, 3, 5)
    assert boxes.dtype == torch.float32
    assert int(nonempty.sum()) == 2
    assert nonempty[0, 1, 2] and nonempty[1, 2, 4] and not nonempty[1, 0, 0]
    assert torch.allclose(boxes[0, 1, 2], torch.tensor([2 / 10, 3 / 8, 9 / 10, 6 / 8]))
    assert torch.allclose(boxes[1, 2, 4], torch.tensor([0.0, 7 / 8, 1 / 10, 1.0]))
    empty = ~nonempty
    assert torch.all(boxes[empty] == 0)


def test_boxes_from_masks_threshold_half_and_bool():
    logits = torch.full((1, 4, 4), -5.0, dtype=torch.float16)
    logits[0, 1:3, 2] = 3.0
    boxes, nonempty = boxes_from_masks(logits, threshold=0.0)
    assert boxes.dtype == torch.float32 and bool(nonempty[0])
    assert torch.allclose(boxes[0], torch.tensor([0.5, 0.25, 0.75, 0.75]))
    boxes_b, _ = boxes_from_masks(logits > 0)
    assert torch.equal(boxes, boxes_b)


def test_boxes_from_masks_matches_naive_on_random_masks():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 7, 9, generator=gen) > 0.9
    boxes, nonempty = boxes_from_masks(masks)
    for i in range(20):
        ys, xs = torch.nonzero(masks[i], as_tuple=True)
        if len(ys) == 0:
            assert not nonempty[i] and torch.all(boxes[i] == 0)
            continue
        expected = torch.tensor([xs.min() / 9, ys.min() / 7, (xs.max() + 1) / 9, (ys.max() + 1) / 7])
        assert torch.allclose(boxes[i], expected)


def test_semantic_log_probs_normalised_and_argmax():
    gen = torch.Generator().manual_seed(0)
    b, d, n, c, h, w = 2, 3, 4, 3, 5, 6
    class_logits = torch.randn(b, d, n, c + 1, generator=gen)
    mask_logits = torch.randn(b, d, n, h, w, generator=gen)
    out = semantic_log_probs(class_logits, mask_logits)
    assert out.shape == (b, c, d, h, w) and out.dtype == torch.float32
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(b, d, h, w), atol=1e-5)
    assert torch.allclose(out.softmax(dim=1), out.exp(), atol=1e-6)

    # Query 0 is confidently class 2 and covers pixel (1, 1) of slice (0, 0); others fire nowhere there.
    class_logits[0, 0, 0] = torch.tensor([-10.0, -10.0, 10.0, -10.0])
    mask_logits[0, 0, :, 1, 1] = -10.0
    mask_logits[0, 0, 0, 1, 1] = 10.0
    out = semantic_log_probs(class_logits, mask_logits)
    assert int(out[0, :, 0, 1, 1].argmax()) == 2
    assert float(out[0, 2, 0, 1, 1].exp()) > 0.99


def test_semantic_log_probs_uniform_where_no_query_fires():
    class_logits = torch.randn(1, 2, 3, 5)
    mask_logits = torch.full((1, 2, 3, 4, 4), -100.0)
    out = semantic_log_probs(class_logits, mask_logits)
    assert torch.allclose(out.exp(), torch.full_like(out, 0.25), atol=1e-4)


def test_semantic_log_probs_half_input():
    class_logits = (torch.randn(1, 2, 3, 4) * 20).half()
    mask_logits = (torch.randn(1, 2, 3, 8, 8) * 30).half()
    out = semantic_log_probs(class_logits, mask_logits)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(1, 2, 8, 8), atol=1e-5)


def test_semantic_log_probs_shape_assertion():
    with pytest.raises(AssertionError, match="disagree"):
        semantic_log_probs(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 8, 8))

"""Tests for distance_transform_2d and point_prompts in nnunet_sam.prompting.from_masks."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_sam.prompting.from_masks import distance_transform_2d, point_prompts

SIZES = [(17, 31), (32, 32), (1, 7), (9, 1), (40, 24)]


def _scipy_edt(mask: np.ndarray) -> np.ndarray:
    """Reference EDT of a (..., H, W) bool array, pixels outside the image counting as False."""
    flat = mask.reshape(-1, *mask.shape[-2:])
    out = [ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1] for m in flat]
    return np.stack(out).reshape(mask.shape)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w]


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    rows, cols = _grid(h, w)
    r0, c0 = rng.uniform(0, h), rng.uniform(0, w)
    a, b = rng.uniform(1, h / 2 + 1), rng.uniform(1, w / 2 + 1)
    return ((rows - r0) / a) ** 2 + ((cols - c0) / b) ** 2 <= 1


def _ring(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    rows, cols = _grid(h, w)
    radius = np.hypot(rows - (h - 1) / 2, cols - (w - 1) / 2)
    inner = rng.uniform(0, min(h, w) / 4)
    return (radius >= inner) & (radius <= inner + rng.uniform(1, min(h, w) / 4 + 1))


def _lines(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[rng.integers(h), :] = True
    mask[:, rng.integers(w)] = True
    rows, cols = _grid(h, w)
    mask |= rows == (cols + rng.integers(-3, 4)) % max(h, 1)  # thin diagonal
    return mask


def _mask_family(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(8, H, W) bool: blob, noise, ring, thin lines, two components, full, empty, dense noise."""
    masks = [
        _blob(rng, h, w),
        rng.random((h, w)) < 0.3,
        _ring(rng, h, w),
        _lines(rng, h, w),
        _blob(rng, h, w) | _blob(rng, h, w),
        np.ones((h, w), bool),
        np.zeros((h, w), bool),
        rng.random((h, w)) < 0.85,
    ]
    return np.stack(masks)


@pytest.mark.parametrize("size", SIZES)
def test_distance_transform_matches_scipy(size):
    rng = np.random.default_rng(sum(size))
    masks = np.stack([_mask_family(rng, *size) for _ in range(3)]).reshape(2, 12, *size)  # leading dims (2, 12)
    dist = distance_transform_2d(torch.from_numpy(masks))
    assert dist.shape == masks.shape and dist.dtype == torch.float32
    np.testing.assert_allclose(dist.double().numpy(), _scipy_edt(masks), rtol=0, atol=1e-5)


def test_distance_transform_conventions():
    assert distance_transform_2d(torch.ones(1, 1, dtype=torch.bool)).item() == 1.0  # border counts as False
    full = distance_transform_2d(torch.ones(5, 5, dtype=torch.bool))
    assert full[2, 2] == 3.0 and full[0, 0] == 1.0
    assert distance_transform_2d(torch.zeros(3, 4, dtype=torch.bool)).abs().sum() == 0
    with pytest.raises(AssertionError, match="downsample"):
        distance_transform_2d(torch.ones(257, 8, dtype=torch.bool))
    with pytest.raises(AssertionError, match="bool"):
        distance_transform_2d(torch.ones(4, 4))


def _pixel_of(points: torch.Tensor, image_size: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map SAM points back to (row, col) of an H x W mask, applying the prompt encoder's +0.5 shift."""
    rows = torch.floor((points[..., 1] + 0.5) * h / image_size).long()
    cols = torch.floor((points[..., 0] + 0.5) * w / image_size).long()
    return rows, cols


@pytest.mark.parametrize("size", [(17, 31), (32, 32), (40, 24)])
@pytest.mark.parametrize("image_size", [1024, 256])
def test_point_prompts_most_interior_pixel(size, image_size):
    h, w = size
    rng = np.random.default_rng(h * w)
    masks = np.stack([_mask_family(rng, h, w) for _ in range(2)])  # (2, 8, H, W)
    logits = torch.from_numpy(np.where(masks, 2.0, -2.0)).float()
    points, labels = point_prompts(logits, image_size)
    assert points.shape == (2, 8, 2) and points.dtype == torch.float32
    assert labels.shape == (2, 8) and labels.dtype == torch.int64
    ref = _scipy_edt(masks)
    rows, cols = _pixel_of(points, image_size, h, w)
    for b, k in np.ndindex(2, 8):
        mask, r, c = masks[b, k], rows[b, k].item(), cols[b, k].item()
        if not mask.any():
            assert labels[b, k] == -1
            continue
        assert labels[b, k] == 1 and mask[r, c], "point must lie inside its mask"
        assert ref[b, k, r, c] == pytest.approx(ref[b, k].max())
        first = np.flatnonzero(np.isclose(ref[b, k].ravel(), ref[b, k].max()))[0]
        assert (r, c) == divmod(first, w), "ties go to the first pixel in row-major order"
        # After SAM's +0.5 shift the point is exactly the centre of its mask pixel.
        centre = torch.tensor([(c + 0.5) * image_size / w, (r + 0.5) * image_size / h])
        torch.testing.assert_close(points[b, k] + 0.5, centre)


def test_point_prompts_known_location_not_swapped():
    h, w, image_size = 20, 30, 1024
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[2:7, 15:20] = True  # 5x5 square: unique maximum at (row 4, col 17)
    mask[10, :] = True  # thin line: never the most interior
    points, labels = point_prompts(mask.float() * 2 - 1, image_size)
    sx, sy = image_size / w, image_size / h
    expected = torch.tensor([17 * sx + (sx - 1) / 2, 4 * sy + (sy - 1) / 2])
    torch.testing.assert_close(points, expected)
    assert labels.item() == 1 and labels.dim() == 0
    assert tuple(t.item() for t in _pixel_of(points, image_size, h, w)) == (4, 17)


def test_point_prompts_ring_and_two_components():
    h = w = 41
    rows, cols = _grid(h, w)
    radius = np.hypot(rows - 20, cols - 20)
    ring = (radius >= 8) & (radius <= 14)
    two = (np.hypot(rows - 10, cols - 28) <= 7) | ((rows >= 30) & (rows <= 32) & (cols >= 2))
    masks = torch.from_numpy(np.stack([ring, two]))
    points, labels = point_prompts(masks.float() - 0.5, image_size=1024)
    rows_p, cols_p = _pixel_of(points, 1024, h, w)
    r, c = rows_p[0].item(), cols_p[0].item()
    assert labels.tolist() == [1, 1]
    assert ring[r, c] and np.hypot(r - 20, c - 20) >= 8, "ring point must lie in the ring, not in the hole"
    r, c = rows_p[1].item(), cols_p[1].item()
    assert np.hypot(r - 10, c - 28) <= 7, "point must lie in the thicker component"


@pytest.mark.parametrize("image_size", [1024, 1, 7])
def test_point_prompts_empty_masks(image_size):
    logits = torch.full((2, 3, 9, 13), -5.0)
    logits[0, 1, 4, 6] = 5.0
    points, labels = point_prompts(logits, image_size)
    empty = torch.ones(2, 3, dtype=torch.bool)
    empty[0, 1] = False
    assert (labels[empty] == -1).all() and labels[0, 1] == 1
    assert torch.isfinite(points).all()
    assert ((points[empty] >= 0) & (points[empty] < image_size)).all()
    torch.testing.assert_close(points[empty], torch.full_like(points[empty], (image_size - 1) / 2))


def test_point_prompts_threshold():
    logits = torch.zeros(6, 6)
    logits[1:5, 1:5] = 0.4
    logits[3, 3] = 0.9
    assert point_prompts(logits, 6)[1].item() == 1
    points, labels = point_prompts(logits, 6, threshold=0.5)
    assert labels.item() == 1 and points.tolist() == [3.0, 3.0]
    assert point_prompts(logits, 6, threshold=1.0)[1].item() == -1


def test_point_prompts_float16_matches_float32():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(3, 4, 24, 20))).half()
    logits[0, 0] = -1.0  # one empty mask
    points16, labels16 = point_prompts(logits, 1024)
    points32, labels32 = point_prompts(logits.float(), 1024)
    assert points16.dtype == torch.float32 and torch.equal(points16, points32) and torch.equal(labels16, labels32)
    assert labels16[0, 0] == -1


def test_point_prompts_no_grad_and_scale_formula():
    logits = torch.randn(2, 16, 16, requires_grad=True)
    points, _ = point_prompts(logits, 1024)
    assert not points.requires_grad
    s = 1024 / 16
    assert math.isclose((points[0, 0].item() - (s - 1) / 2) / s % 1, 0.0, abs_tol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(np.stack([_mask_family(rng, 33, 47) for _ in range(4)]))
    torch.testing.assert_close(distance_transform_2d(masks.cuda()).cpu(), distance_transform_2d(masks))
    logits = masks.float() * 2 - 1
    points, labels = point_prompts(logits.cuda(), 1024)
    ref_points, ref_labels = point_prompts(logits, 1024)
    assert torch.equal(points.cpu(), ref_points) and torch.equal(labels.cpu(), ref_labels)

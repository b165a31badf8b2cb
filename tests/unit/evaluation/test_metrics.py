"""Dice, NSD and HD95 against hand-computed values (cubes, rods, spheres, anisotropic spacing, empty masks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from nnunet_sam.evaluation.metrics import (
    DEFAULT_NSD_TOLERANCE_MM,
    binary_metrics,
    dice,
    hd95,
    label_metrics,
    normalized_surface_dice,
    surface_distances,
    surface_mask,
)


def _box(shape, *slices) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slices)] = True
    return mask


def _histogram(distances: np.ndarray) -> dict[float, int]:
    values, counts = np.unique(np.round(distances, 6), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


# ---------------------------------------------------------------- Dice


def test_dice_of_cubes_with_known_overlap():
    a = _box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))  # 4^3 = 64 voxels
    b = _box((10, 10, 10), slice(3, 7), slice(2, 6), slice(2, 6))  # shifted by 1: overlap 3 * 16 = 48
    assert dice(a, b) == pytest.approx(2 * 48 / 128)  # 0.75
    assert dice(a, a) == 1.0
    assert dice(a, _box((10, 10, 10), slice(7, 9), slice(7, 9), slice(7, 9))) == 0.0
    # Dice counts voxels: the spacing does not change it
    assert binary_metrics(a, b, (5.0, 0.5, 1.0))["Dice"] == pytest.approx(0.75)


# ---------------------------------------------------------------- surface definition


def test_surface_is_the_face_connected_shell_and_the_image_border_counts_as_background():
    cube = _box((9, 9, 9), slice(2, 7), slice(2, 7), slice(2, 7))  # 5^3
    assert surface_mask(cube).sum() == 5**3 - 3**3  # only the 3^3 core has all 6 face neighbours inside
    # a voxel whose only background neighbour is diagonal is NOT surface (6-connectivity)
    notched = _box((5, 5, 5), slice(1, 4), slice(1, 4), slice(1, 4))
    notched[1, 1, 1] = False
    assert not surface_mask(notched)[2, 2, 2]
    # a cube filling the image: its border voxels are surface, the inside is not
    full = np.ones((4, 4, 4), dtype=bool)
    assert surface_mask(full).sum() == 4**3 - 2**3
    # a single voxel is its own surface
    assert surface_mask(_box((3, 3, 3), slice(1, 2), slice(1, 2), slice(1, 2))).sum() == 1


# ---------------------------------------------------------------- exact distances


def test_rods_shifted_along_their_axis_have_known_distances_nsd_and_hd95():
    # 2x2 rods: every voxel touches the background, so the surface is the whole rod (4 voxels per slice).
    a = _box((16, 6, 6), slice(0, 10), slice(2, 4), slice(2, 4))
    b = _box((16, 6, 6), slice(2, 12), slice(2, 4), slice(2, 4))
    d_ab, d_ba = surface_distances(a, b, (1.0, 1.0, 1.0))
    # slice 0 of A is 2 from B's first slice, slice 1 is 1 away, slices 2..9 lie on B's surface; same for B
    assert _histogram(d_ab) == {0.0: 32, 1.0: 4, 2.0: 4}
    assert _histogram(d_ba) == {0.0: 32, 1.0: 4, 2.0: 4}
    spacing = (1.0, 1.0, 1.0)
    assert normalized_surface_dice(a, b, spacing, 0.5) == pytest.approx(64 / 80)
    assert normalized_surface_dice(a, b, spacing, 1.5) == pytest.approx(72 / 80)
    assert normalized_surface_dice(a, b, spacing, 1.99) == pytest.approx(72 / 80)
    assert normalized_surface_dice(a, b, spacing, 2.0) == 1.0  # tolerance is inclusive
    # 95th percentile of 40 sorted values (32 x 0, 4 x 1, 4 x 2) sits at index 37.05 -> 2
    assert hd95(a, b, spacing) == pytest.approx(2.0)
    # distances scale with the spacing of the shifted axis only
    assert hd95(a, b, (2.5, 1.0, 1.0)) == pytest.approx(5.0)
    assert hd95(a, b, (1.0, 7.0, 7.0)) == pytest.approx(2.0)


SPACING = (3.0, 1.0, 1.0)  # coarse axis 0, fine axes 1 and 2


def test_cube_shifted_along_the_coarse_axis():
    # 6^3 cubes (152 surface voxels each) shifted by 2 voxels = 6 mm along axis 0.
    a = _box((12, 10, 10), slice(2, 8), slice(2, 8), slice(2, 8))
    b = _box((12, 10, 10), slice(4, 10), slice(2, 8), slice(2, 8))
    d_ab, d_ba = surface_distances(a, b, SPACING)
    # A's leading face (36 voxels) is 6 mm from B's face; the 20 rim voxels of A's 2nd slice 3 mm; the side walls
    # inside B's extent (4 slices x 20) lie on B's walls (0); A's far face interior (16) is 1 mm (12 voxels) or
    # 2 mm (4 centre voxels) from B's side walls in-plane.
    assert _histogram(d_ab) == {0.0: 80, 1.0: 12, 2.0: 4, 3.0: 20, 6.0: 36}
    assert _histogram(d_ba) == _histogram(d_ab)  # symmetric configuration
    m = binary_metrics(a, b, SPACING, tolerance_mm=5.9)
    # 72 of 304 surface voxels are 6 mm away, i.e. > 5 %: HD95 is the full 6 mm
    assert m["HD95"] == pytest.approx(6.0)
    assert m["NSD"] == pytest.approx((304 - 72) / 304)
    assert m["Dice"] == pytest.approx(2 * 144 / 432)
    assert normalized_surface_dice(a, b, SPACING, 6.0) == 1.0


def test_cube_shifted_along_a_fine_axis():
    # the same cubes and spacing, shifted by 2 voxels = 2 mm along axis 2
    a = _box((10, 10, 12), slice(2, 8), slice(2, 8), slice(2, 8))
    b = _box((10, 10, 12), slice(2, 8), slice(2, 8), slice(4, 10))
    d_ab, _ = surface_distances(a, b, SPACING)
    # leading face: 36 at 2 mm; 2nd slice rim: 20 at 1 mm; far face interior (4 x 4): in-plane distance to B's
    # walls is 1 mm along axis 1 for its two outer rows (8 voxels), otherwise min(2 mm to B's face, >= 3 mm
    # along the coarse axis) = 2 mm (8 voxels); the side walls inside B: 0
    assert _histogram(d_ab) == {0.0: 80, 1.0: 28, 2.0: 44}
    assert hd95(a, b, SPACING) == pytest.approx(2.0)
    assert normalized_surface_dice(a, b, SPACING, 1.9) == pytest.approx((304 - 88) / 304)
    assert normalized_surface_dice(a, b, SPACING, 2.0) == 1.0


def test_single_voxels_coarse_versus_fine_axis():
    a = _box((8, 8, 8), slice(2, 3), slice(2, 3), slice(2, 3))
    along_coarse = _box((8, 8, 8), slice(4, 5), slice(2, 3), slice(2, 3))
    along_fine = _box((8, 8, 8), slice(2, 3), slice(2, 3), slice(4, 5))
    assert hd95(a, along_coarse, SPACING) == pytest.approx(6.0)
    assert hd95(a, along_fine, SPACING) == pytest.approx(2.0)
    diagonal = _box((8, 8, 8), slice(3, 4), slice(3, 4), slice(2, 3))
    assert hd95(a, diagonal, SPACING) == pytest.approx(math.sqrt(3.0**2 + 1.0**2))
    assert normalized_surface_dice(a, along_coarse, SPACING, 5.99) == 0.0
    assert normalized_surface_dice(a, along_coarse, SPACING, 6.0) == 1.0


def test_concentric_spheres_in_mm_on_an_anisotropic_grid():
    # balls of radius 10 mm and 14 mm (ellipsoids in voxel space): surfaces 4 mm apart up to discretisation
    spacing = (2.0, 0.8, 0.8)
    shape = (24, 60, 60)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    radius = np.sqrt(sum(x**2 for x in np.meshgrid(*axes, indexing="ij")))
    inner, outer = radius <= 10.0, radius <= 14.0
    m = binary_metrics(inner, outer, spacing, tolerance_mm=6.0)
    assert abs(m["HD95"] - 4.0) <= max(spacing)
    assert m["NSD"] == 1.0
    # a surface voxel of the outer ball has a face neighbour outside it, so its radius is > 14 - 2 = 12 mm,
    # while the inner ball's voxels have radius <= 10 mm: no pair of surface voxels is within 2 mm
    assert normalized_surface_dice(inner, outer, spacing, 2.0) == 0.0


def _brute_force(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Surface by explicit face-neighbour checks, distances by all pairs: independent of the EDT code path."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    pair = cdist(pa, pb)
    return pair.min(axis=1), pair.min(axis=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blobs_match_a_brute_force_reference(seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    shape = (9, 14, 12)
    spacing = (2.5, 0.7, 1.1)
    a = gaussian_filter(rng.normal(size=shape), 1.5) > 0.05  # blobs, some touching the image border
    b = gaussian_filter(rng.normal(size=shape), 1.5) > 0.05
    d_ab, d_ba = surface_distances(a, b, spacing)
    ref_ab, ref_ba = _brute_force(a, b, spacing)
    np.testing.assert_allclose(np.sort(d_ab), np.sort(ref_ab))
    np.testing.assert_allclose(np.sort(d_ba), np.sort(ref_ba))
    expected_hd95 = max(np.percentile(ref_ab, 95), np.percentile(ref_ba, 95))
    expected_nsd = ((ref_ab <= 2.0).sum() + (ref_ba <= 2.0).sum()) / (ref_ab.size + ref_ba.size)
    m = binary_metrics(a, b, spacing, tolerance_mm=2.0)
    assert m["HD95"] == pytest.approx(expected_hd95)
    assert m["NSD"] == pytest.approx(expected_nsd)


def test_two_dimensional_masks():
    a = _box((12, 12), slice(2, 8), slice(2, 8))
    b = _box((12, 12), slice(2, 8), slice(4, 10))  # shifted by 2 pixels = 1 mm along axis 1
    m = binary_metrics(a, b, (0.5, 0.5), tolerance_mm=0.6)
    # ring of 20 pixels: leading column 6 + 2 rim pixels at 1 mm, 4 pixels at 0.5 mm, 8 on B's ring (0)
    assert m["HD95"] == pytest.approx(1.0)
    assert m["NSD"] == pytest.approx(24 / 40)


# ---------------------------------------------------------------- empty masks


def test_both_empty_is_nan_like_nnunet():
    empty = np.zeros((5, 5, 5), dtype=bool)
    m = binary_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert math.isnan(m["Dice"]) and math.isnan(m["NSD"]) and math.isnan(m["HD95"])
    assert m["n_pred"] == 0 and m["n_ref"] == 0


@pytest.mark.parametrize("which", ["prediction", "reference"])
def test_exactly_one_empty_gives_zero_overlap_and_infinite_distance(which):
    empty = np.zeros((5, 5, 5), dtype=bool)
    full = _box((5, 5, 5), slice(1, 3), slice(1, 3), slice(1, 3))
    pred, ref = (empty, full) if which == "prediction" else (full, empty)
    m = binary_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["Dice"] == 0.0
    assert m["NSD"] == 0.0
    assert m["HD95"] == math.inf


def test_label_metrics_per_label_including_an_absent_label():
    ref = np.zeros((6, 6, 6), dtype=np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    pred = ref.copy()
    pred[4:6, 4:6, 4:6] = 2  # label 2 predicted but absent from the reference
    result = label_metrics(pred, ref, (1.0, 1.0, 1.0), [1, 2, 3])
    assert result[1]["Dice"] == 1.0 and result[1]["HD95"] == 0.0 and result[1]["NSD"] == 1.0
    assert result[2]["Dice"] == 0.0 and result[2]["HD95"] == math.inf
    assert math.isnan(result[3]["Dice"])  # label 3 absent everywhere


# ---------------------------------------------------------------- input checks


def test_clear_errors_for_bad_shapes_and_spacings():
    a = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(AssertionError, match="shape"):
        dice(a, np.zeros((4, 4, 5), dtype=bool))
    with pytest.raises(AssertionError, match="spacing"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(AssertionError, match="positive"):
        hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(AssertionError, match="2D or 3D"):
        dice(np.zeros(4, dtype=bool), np.zeros(4, dtype=bool))


def test_default_tolerance_is_the_documented_protocol_value():
    assert DEFAULT_NSD_TOLERANCE_MM == 5.0

"""Segmentation metrics in physical units: Dice, normalized surface Dice (NSD) and HD95.

All functions take boolean masks of the same shape (2D or 3D, numpy axis order) and, for the distance-based
metrics, the voxel spacing in mm in the same axis order (anisotropic spacing is handled exactly: distances are
Euclidean distances between voxel centres in mm).

Definitions
-----------
Surface
    The surface of a mask is the set of its foreground voxels that have at least one face-adjacent background
    neighbour (6-connectivity in 3D, 4-connectivity in 2D): ``mask & ~binary_erosion(mask)`` with a
    face-connected structuring element. Outside the image counts as background, so foreground voxels on the
    image border belong to the surface.
Surface distances
    For each surface voxel of A, the Euclidean distance (mm) from its centre to the nearest surface-voxel
    centre of B, and vice versa (computed with ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``).
    Two identical masks therefore have all distances 0.
Dice
    ``2 |P & R| / (|P| + |R|)`` (voxel counts; independent of the spacing).
NSD at tolerance t (mm)
    ``(#{p in S_P: d(p, S_R) <= t} + #{r in S_R: d(r, S_P) <= t}) / (|S_P| + |S_R|)``: the fraction of both
    surfaces lying within ``t`` of the other surface. Surface voxels are counted, not weighted by surface area
    (DeepMind's ``surface-distance`` package weights surface elements by area, which can differ slightly).
HD95
    ``max(q95(d(S_P -> S_R)), q95(d(S_R -> S_P)))`` with ``q95`` numpy's 95th percentile (linear
    interpolation): the symmetric robust Hausdorff distance of MONAI / DeepMind, in mm.

Empty masks (the convention of nnU-Net's own evaluation, ``nnunetv2.evaluation.evaluate_predictions``)
-----------------------------------------------------------------------------------------------------------
==================================  =======  =======  =======
case                                Dice     NSD      HD95
==================================  =======  =======  =======
reference and prediction empty      NaN      NaN      NaN
exactly one of them empty           0.0      0.0      inf
==================================  =======  =======  =======

nnU-Net reports Dice = NaN when there is nothing to find and nothing was predicted, and averages with
``np.nanmean``: such a case neither rewards nor penalises a method. NSD follows the same rule, so the two
overlap metrics always agree on which cases count. When exactly one mask is empty every surface point is
infinitely far from the (missing) other surface: Dice and NSD are 0 and HD95 is ``inf``, which keeps a missed
or hallucinated structure visible in any mean (a mean over cases containing ``inf`` is ``inf``).

Default NSD tolerance
---------------------
Of the protocols this project reproduces, only MSD-Pancreas tumour (3DSAM-adapter protocol, also used in
MaskSAM's appendix) reports NSD. Neither paper states the tolerance; 3DSAM-adapter's public evaluation scripts
use 5 (mm) by default, so :data:`DEFAULT_NSD_TOLERANCE_MM` is 5.0. Synapse, ACDC and AMOS are reported with
Dice only in the papers; pass another tolerance where a protocol asks for one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "METRIC_NAMES",
    "surface_mask",
    "surface_distances",
    "dice",
    "jaccard",
    "precision",
    "recall",
    "normalized_surface_dice",
    "hd95",
    "binary_metrics",
    "label_metrics",
]

DEFAULT_NSD_TOLERANCE_MM = 5.0
METRIC_NAMES = ("Dice", "NSD", "HD95")  # the per-class figures computed by binary_metrics (plus voxel counts)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    assert pred.shape == ref.shape, f"prediction shape {pred.shape} != reference shape {ref.shape}"
    assert pred.ndim in (2, 3), f"masks must be 2D or 3D, got {pred.ndim}D (shape {pred.shape})"
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    assert len(spacing) == ndim, f"spacing {spacing} has {len(spacing)} entries for a {ndim}D mask"
    assert all(np.isfinite(s) and s > 0 for s in spacing), f"spacing must be positive and finite, got {spacing}"
    return spacing


def surface_mask(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels of ``mask`` with a face-adjacent background neighbour (outside the image = background).

    ``mask``: bool array (2D or 3D). Returns a bool array of the same shape.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = generate_binary_structure(mask.ndim, 1)  # face connectivity: 6 in 3D, 4 in 2D
    return mask & ~binary_erosion(mask, structure=structure, border_value=0)


def _union_crop(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``a | b`` grown by one voxel (clipped to the image), so erosion inside it is exact."""
    coords = np.nonzero(a | b)
    return tuple(slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, size)) for c, size in zip(coords, a.shape))


def surface_distances(
    mask_a: np.ndarray, mask_b: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (from each surface voxel of A to the surface of B, from B to A).

    ``mask_a``, ``mask_b``: bool arrays of one shape (2D or 3D), both non-empty; ``spacing``: mm per voxel in
    the arrays' axis order. Returns two 1D float arrays with one entry per surface voxel of A (resp. B).
    """
    mask_a, mask_b = _check_pair(mask_a, mask_b)
    spacing = _check_spacing(spacing, mask_a.ndim)
    assert mask_a.any() and mask_b.any(), "surface distances need two non-empty masks"
    crop = _union_crop(mask_a, mask_b)  # every surface voxel lies inside, so nearest neighbours do too
    surf_a, surf_b = surface_mask(mask_a[crop]), surface_mask(mask_b[crop])
    dist_to_b = distance_transform_edt(~surf_b, sampling=spacing)
    dist_to_a = distance_transform_edt(~surf_a, sampling=spacing)
    return dist_to_b[surf_a], dist_to_a[surf_b]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two bool masks; NaN if both are empty (nnU-Net's convention)."""
    pred, ref = _check_pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    return float("nan") if total == 0 else 2.0 * int((pred & ref).sum()) / total


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard index (IoU) |P & R| / |P | R| of two bool masks; NaN if both are empty (as Dice)."""
    pred, ref = _check_pair(pred, ref)
    union = int((pred | ref).sum())
    return float("nan") if union == 0 else int((pred & ref).sum()) / union


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P & R| / |P|; NaN if both masks are empty, 0 if only the prediction is (nothing found is not precise)."""
    pred, ref = _check_pair(pred, ref)
    if not pred.any():
        return float("nan") if not ref.any() else 0.0
    return int((pred & ref).sum()) / int(pred.sum())


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P & R| / |R| (sensitivity); NaN if both masks are empty, 0 if only the reference is."""
    pred, ref = _check_pair(pred, ref)
    if not ref.any():
        return float("nan") if not pred.any() else 0.0
    return int((pred & ref).sum()) / int(ref.sum())


def _nsd_from_distances(d_pred: np.ndarray, d_ref: np.ndarray, tolerance_mm: float) -> float:
    within = int((d_pred <= tolerance_mm).sum()) + int((d_ref <= tolerance_mm).sum())
    return within / (d_pred.size + d_ref.size)


def _hd95_from_distances(d_pred: np.ndarray, d_ref: np.ndarray) -> float:
    return float(max(np.percentile(d_pred, 95), np.percentile(d_ref, 95)))


def _empty_case(pred: np.ndarray, ref: np.ndarray) -> str | None:
    """'both' / 'one' when masks are empty, None when both have foreground."""
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if has_pred and has_ref:
        return None
    return "one" if has_pred or has_ref else "both"


def normalized_surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
) -> float:
    """NSD at ``tolerance_mm`` (see the module docstring); NaN if both masks are empty, 0 if exactly one is."""
    return binary_metrics(pred, ref, spacing, tolerance_mm)["NSD"]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm; NaN if both masks are empty, inf if exactly one is."""
    return binary_metrics(pred, ref, spacing)["HD95"]


def binary_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
) -> dict[str, float]:
    """Dice, NSD and HD95 of one structure, plus the voxel counts ``n_pred`` and ``n_ref``.

    ``pred``, ``ref``: bool masks of one shape (2D or 3D); ``spacing``: mm per voxel in the masks' axis order.
    The surface distances are computed once and shared by NSD and HD95.
    """
    pred, ref = _check_pair(pred, ref)
    spacing = _check_spacing(spacing, pred.ndim)
    assert tolerance_mm >= 0, f"NSD tolerance must be >= 0 mm, got {tolerance_mm}"
    result = {"Dice": dice(pred, ref), "n_pred": int(pred.sum()), "n_ref": int(ref.sum())}
    empty = _empty_case(pred, ref)
    if empty == "both":
        result.update(NSD=float("nan"), HD95=float("nan"))
    elif empty == "one":
        result.update(NSD=0.0, HD95=float("inf"))
    else:
        d_pred, d_ref = surface_distances(pred, ref, spacing)
        result.update(NSD=_nsd_from_distances(d_pred, d_ref, tolerance_mm), HD95=_hd95_from_distances(d_pred, d_ref))
    return result


def label_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Sequence[int],
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[int, dict[str, float]]:
    """:func:`binary_metrics` for each label id in ``labels`` of two integer label maps of one shape."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    assert pred.shape == ref.shape, f"prediction shape {pred.shape} != reference shape {ref.shape}"
    return {int(k): binary_metrics(pred == k, ref == k, spacing, tolerance_mm) for k in labels}

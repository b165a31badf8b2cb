"""Image geometry shared by the prompted commands and the interactive server: world -> voxel coordinates, the
original image grid <-> nnU-Net's preprocessed grid.

Conventions: a position is a continuous array index; voxel ``i`` covers ``[i - 0.5, i + 0.5)``. The original grid
is the image array as nnU-Net's reader returns it (for SimpleITK formats (z, y, x)); the preprocessed grid is what
``preprocessor.run_case_npy`` returns (transposed by ``transpose_forward``, cropped to the non-zero region,
resampled to the plans' spacing). ``properties`` is the dict the reader and ``run_case_npy`` fill in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape


class GeometryError(ValueError):
    """A position that cannot be mapped; the message says why."""


def world_to_voxel(positions: np.ndarray, properties: Mapping) -> np.ndarray:
    """World points (K, 3) (x, y, z) in mm, ITK physical space (LPS) -> continuous array indices (K, 3) (z, y, x),
    from the geometry SimpleITKIO reports (``properties["sitk_stuff"]``)."""
    geometry = properties.get("sitk_stuff")
    if geometry is None:
        raise GeometryError(
            "world coordinates need the image geometry, which this model's reader does not report (SimpleITK "
            "formats do); give voxel coordinates"
        )
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    spacing = np.asarray(geometry["spacing"], dtype=np.float64)
    origin = np.asarray(geometry["origin"], dtype=np.float64)
    direction = np.asarray(geometry["direction"], dtype=np.float64).reshape(len(spacing), len(spacing))
    index_xyz = np.linalg.solve(direction * spacing, (positions - origin).T).T  # world = origin + D diag(s) index
    return index_xyz[:, ::-1].copy()


def inside_image(positions: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(K,) bool: which positions (K, D) lie in a voxel of an array of ``shape`` (-0.5 <= p < n - 0.5)."""
    shape = np.asarray(shape, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.float64)
    return ((positions >= -0.5) & (positions < shape - 0.5)).all(1)


def to_preprocessed(
    positions: np.ndarray, properties: Mapping, transpose_forward: Sequence[int], preprocessed_shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Array indices (K, 3) of the image as read -> indices of nnU-Net's preprocessed array, and a mask (K,) of the
    points inside the crop box (nnU-Net's crop to the non-zero region; outside it the prediction is background).

    Transpose (``plans["transpose_forward"]``), subtract the crop box start (``bbox_used_for_cropping``), then scale
    with voxel centres aligned, p' = (p + 0.5) * new / old - 0.5, as nnU-Net's resampling maps voxels.
    """
    p = np.asarray(positions, dtype=np.float64)[:, list(transpose_forward)]
    box = np.asarray(properties["bbox_used_for_cropping"], dtype=np.float64)
    p = p - box[:, 0]
    inside = ((p >= -0.5) & (p < box[:, 1] - box[:, 0] - 0.5)).all(1)
    old = np.asarray(properties["shape_after_cropping_and_before_resampling"], dtype=np.float64)
    new = np.asarray(preprocessed_shape, dtype=np.float64)
    return (p + 0.5) * new / old - 0.5, inside


def mask_to_original(mask: np.ndarray, plans_manager, configuration_manager, label_manager, properties: dict):
    """A binary mask in the preprocessed grid -> the original image grid (uint8 0/1), through nnU-Net's export
    (resampling back, uncropping, transposing back) of logits that say "class 1 here, background elsewhere".

    Where nothing was resampled (the grid's shape is the cropped image's, and the configuration resamples with
    nnU-Net's default function, which then returns its input), the export's argmax is the mask itself: it is put
    back into the uncropped image directly, as the export does, without building the logits (0.2-0.5 s on a
    100 x 256 x 256 CT; the same result, tested)."""
    kept = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    resampling = configuration_manager.resampling_fn_probabilities  # nnU-Net hands it out as a partial
    default = getattr(resampling, "func", resampling) is resample_data_or_seg_to_shape
    if tuple(mask.shape) == kept and default and not label_manager.has_regions:
        segmentation = np.zeros(properties["shape_before_cropping"], dtype=np.uint8)
        segmentation = insert_crop_into_image(segmentation, mask.astype(np.uint8), properties["bbox_used_for_cropping"])
        return segmentation.transpose(plans_manager.transpose_backward).astype(np.uint8)
    logits = torch.full((label_manager.num_segmentation_heads, *mask.shape), -10.0)
    logits[0] = 0
    logits[1] = torch.from_numpy(np.where(mask, 10.0, -10.0))
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, label_manager, properties
    ).astype(np.uint8)

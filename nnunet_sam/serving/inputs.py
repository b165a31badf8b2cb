"""Checks of what a client sends, in the client's grid: the image array (C, A0, A1, A2) as it holds it, positions as
continuous indices into the spatial axes (voxel ``i`` covers ``[i - 0.5, i + 0.5)``), boxes as half-open index
ranges ``[[lo, hi], [lo, hi], [lo, hi]]`` (nnInteractive's convention: a 2D box has size 1 along one axis), masks
as arrays of the image's spatial shape or of an ``interaction_bbox``'s size.

Every check raises :class:`InteractionError` with a message that names the problem and the fix; the server answers
it with HTTP 400 and leaves the session as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class InteractionError(ValueError):
    """An input the model cannot use; the message says what is wrong and what to send instead."""


class UnsupportedInteraction(InteractionError):
    """An interaction the loaded model does not take (its capabilities say so)."""


def _finite_numbers(values, count: int, what: str) -> list[float]:
    if (
        not isinstance(values, (list, tuple))
        or len(values) != count
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise InteractionError(f"{what} must be {count} numbers (one per image axis), got {values!r}")
    if not all(math.isfinite(v) for v in values):
        raise InteractionError(f"{what} must be finite numbers, got {values!r}")
    return [float(v) for v in values]


def check_image(image: np.ndarray, num_channels: int) -> np.ndarray:
    """The uploaded image must be (C, A0, A1, A2) with the model's channel count, real numbers, all finite."""
    if image.ndim != 4:
        raise InteractionError(
            f"the image must be 4D (channels, and three spatial axes), got {image.ndim}D of shape {list(image.shape)}"
        )
    if image.shape[0] != num_channels:
        raise InteractionError(
            f"the model takes {num_channels} channel(s) but the image has {image.shape[0]} (shape "
            f"{list(image.shape)}, channels first)"
        )
    if min(image.shape[1:]) < 1:
        raise InteractionError(f"the image is empty (shape {list(image.shape)})")
    if image.dtype.kind not in "biuf":
        raise InteractionError(f"the image must hold numbers, got dtype {image.dtype}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InteractionError("the image holds non-finite voxels (NaN or inf); replace them and upload again")
    return image


def check_spacing(properties, default: Sequence[float]) -> list[float]:
    """``image_properties["spacing"]`` (one positive number per spatial axis, the image's axis order), or
    ``default`` when the client sends none."""
    if not isinstance(properties, dict):
        raise InteractionError(f"image_properties must be a JSON object, got {properties!r}")
    spacing = properties.get("spacing")
    if spacing is None:
        return [float(s) for s in default]
    spacing = _finite_numbers(spacing, 3, "image_properties['spacing']")
    if min(spacing) <= 0:
        raise InteractionError(f"image_properties['spacing'] must be positive, got {spacing}")
    return spacing


def check_point(coordinates, shape: Sequence[int]) -> np.ndarray:
    """A point (3 finite numbers) inside an image of spatial ``shape``."""
    point = _finite_numbers(coordinates, 3, "point coordinates")
    if not all(-0.5 <= c < n - 0.5 for c, n in zip(point, shape)):
        raise InteractionError(f"point {point} lies outside the image of shape {list(shape)}")
    return np.asarray(point)


def check_box(bbox_coords, shape: Sequence[int]) -> list[list[int]]:
    """A box ``[[lo, hi], ...]`` (half-open, 3 axes), clipped to the image; refuses zero sizes and boxes outside."""
    if not isinstance(bbox_coords, (list, tuple)) or len(bbox_coords) != 3:
        raise InteractionError(f"a box needs [[lo, hi], [lo, hi], [lo, hi]] (one pair per axis), got {bbox_coords!r}")
    box = []
    for axis, (pair, n) in enumerate(zip(bbox_coords, shape)):
        lo, hi = _finite_numbers(pair, 2, f"box axis {axis}")
        if hi - lo <= 0:
            raise InteractionError(
                f"the box has zero size along axis {axis} ([{lo:g}, {hi:g}]); a box spans [lo, hi) with hi > lo "
                "(a 2D box has hi = lo + 1 along its flat axis)"
            )
        lo, hi = max(0, round(lo)), min(int(n), round(hi))
        if hi <= lo:
            raise InteractionError(f"the box {bbox_coords} lies outside the image of shape {list(shape)}")
        box.append([lo, hi])
    return box


def placed_mask(mask: np.ndarray, shape: Sequence[int], interaction_bbox=None) -> np.ndarray:
    """A mask covering the image (or ``interaction_bbox`` of it) -> a bool mask of the image's spatial shape."""
    shape = tuple(int(s) for s in shape)
    if interaction_bbox is None:
        interaction_bbox = [[0, n] for n in shape]
    box = check_box(interaction_bbox, shape)
    if [hi - lo for lo, hi in box] != [round(hi - lo) for lo, hi in interaction_bbox]:
        raise InteractionError(f"interaction_bbox {interaction_bbox} exceeds the image of shape {list(shape)}")
    size = tuple(hi - lo for lo, hi in box)
    if mask.shape != size:
        raise InteractionError(
            f"the mask has shape {list(mask.shape)} but must have {list(size)} (the image's spatial shape, or the "
            "size of interaction_bbox)"
        )
    full = np.zeros(shape, dtype=bool)
    full[tuple(slice(lo, hi) for lo, hi in box)] = mask != 0
    if not full.any():
        raise InteractionError("the mask is empty: nothing was drawn")
    return full


def check_target_buffer(shape, dtype: str, image_shape: Sequence[int], max_bytes: int) -> np.ndarray:
    """A zeroed server copy of the client's target buffer; it must match the image's spatial shape."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise InteractionError(f"the target buffer shape must be a list of integers, got {shape!r}")
    if tuple(shape) != tuple(image_shape):
        raise InteractionError(
            f"the target buffer has shape {list(shape)} but the image's spatial shape is {list(image_shape)}; "
            "allocate it with the image's shape (without the channel axis)"
        )
    try:
        kind = np.dtype(dtype)
    except TypeError:
        raise InteractionError(f"unknown target buffer dtype {dtype!r}") from None
    if kind.kind not in "biu":
        raise InteractionError(f"the target buffer must be bool or integer, got {kind}")
    if int(np.prod(shape)) * kind.itemsize > max_bytes:
        raise InteractionError(f"the target buffer exceeds the server's size limit of {max_bytes} bytes")
    return np.zeros(tuple(shape), dtype=kind)


def bounding_box(changed: np.ndarray) -> list[list[int]] | None:
    """Half-open box ``[[lo, hi], ...]`` around the True voxels of ``changed``, None if there are none."""
    if not changed.any():
        return None
    box = []
    for axis in range(changed.ndim):
        present = np.flatnonzero(changed.any(tuple(a for a in range(changed.ndim) if a != axis)))
        box.append([int(present[0]), int(present[-1]) + 1])
    return box


def flag(payload: dict, name: str, default: bool = True) -> bool:
    """A yes/no field of a request (JSON true or false; absent: ``default``). A string such as "false" is refused:
    read as Python would, it would mean yes."""
    value = payload.get(name, default)
    if not isinstance(value, bool):
        raise InteractionError(f"'{name}' must be true or false (JSON booleans), got {value!r}")
    return value

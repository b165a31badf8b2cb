"""The SAM patch rule: from an nnU-Net configuration to the patch, SAM input size and query count.

Rule (applied when the configuration in the plans has no ``nnunet_sam`` block):

* depth D = min(planned patch depth, ``max_depth``) for 3D configurations, 1 for 2d ones;
* in-plane size P = ``tile * k`` with k = ceil(max(planned in-plane size) / tile) clipped to
  [1, ``max_tiles``], where ``tile = patch_size * window_size`` of the backbone (224 px for SAM's ViTs):
  square, a whole number of attention windows (no window padding), as close to the plan as allowed;
* SAM input size = P unless the trainer fixes ``sam_input_size``;
* queries N = max(8, ceil(1.5 * C)) with C classes including background, unless the trainer fixes it;
* ``attention``: how SAM's attention is computed (:mod:`nnunet_sam.blocks.attention`); new trainings record
  ``"sdpa"``, and a saved block without the field (trained before it existed) is rebuilt with ``"sam"``.

A plans file whose configuration already holds an ``nnunet_sam`` block (for example a copy of the plans
edited by hand and passed with ``-p``) overrides the rule field by field; the block written into the plans
saved with the model is what ``nnUNetv2_predict`` rebuilds the network from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from nnunet_sam.backbones.sam_vit import BackboneSpec
from nnunet_sam.blocks.attention import DEFAULT_ATTENTION, LEGACY_ATTENTION, AttentionImpl, check_attention

PLANS_KEY = "nnunet_sam"


class PatchError(ValueError):
    """A patch, input size or query count that the backbone or the dataset cannot work with."""


@dataclass(frozen=True)
class PatchRule:
    max_depth: int = 8
    max_tiles: int = 1


@dataclass(frozen=True)
class VolumePatchRule:
    """Patch rule of volumetric methods (3DSAM-adapter), whose ViT sees a 3D token grid (T, g, g).

    ``slice_group`` slices form one depth token; attention windows are ``window`` tokens per axis. In-plane
    P = k * patch_size * window with k = ceil(planned / that) clipped to [1, ``max_windows``]; depth tokens
    T = planned depth // slice_group, rounded down to a multiple of ``window`` (at most ``max_windows`` windows)
    when at least one window fits, else kept (a shorter axis is one window); D = T * slice_group.
    """

    slice_group: int = 4
    window: int = 8
    max_windows: int = 2


def record_attention(record: dict) -> AttentionImpl:
    """The attention implementation a saved ``nnunet_sam`` block asks for (``"sam"`` for blocks older than it)."""
    return check_attention(record.get("attention", LEGACY_ATTENTION))


def default_num_queries(num_classes: int) -> int:
    """Queries for C classes (background included): more than C, 8 at least (public ACDC: 8, AMOS: 24)."""
    return max(8, math.ceil(1.5 * num_classes))


def derive_patch(planned: Sequence[int], spec: BackboneSpec, rule: PatchRule | VolumePatchRule) -> list[int]:
    """SAM patch [D, P, P] (3D) or [P, P] (2d) from nnU-Net's planned patch."""
    if isinstance(rule, VolumePatchRule):
        return derive_volume_patch(planned, spec, rule)
    inplane = max(int(planned[-1]), int(planned[-2]))
    tiles = min(max(1, math.ceil(inplane / spec.tile)), rule.max_tiles)
    size = tiles * spec.tile
    if len(planned) == 2:
        return [size, size]
    return [max(1, min(int(planned[0]), rule.max_depth)), size, size]


def derive_volume_patch(planned: Sequence[int], spec: BackboneSpec, rule: VolumePatchRule) -> list[int]:
    """Patch [D, P, P] of the volumetric rule (see :class:`VolumePatchRule`); a 2d plan is returned as planned
    and refused by :func:`check_volume_patch`."""
    if len(planned) == 2:
        return [int(s) for s in planned]
    tile = spec.patch_size * rule.window
    inplane = max(int(planned[-1]), int(planned[-2]))
    size = min(max(1, math.ceil(inplane / tile)), rule.max_windows) * tile
    tokens = max(1, int(planned[0]) // rule.slice_group)
    if tokens >= rule.window:
        tokens = rule.window * min(tokens // rule.window, rule.max_windows)
    return [tokens * rule.slice_group, size, size]


def check_volume_patch(patch: Sequence[int], spec: BackboneSpec, rule: VolumePatchRule) -> None:
    """Raise PatchError unless ``patch`` is a 3D patch whose token grid is a whole number of windows per axis."""
    fix = "Fix the nnunet_sam block of the plans or remove it to use the automatic rule."
    if len(patch) != 3:
        raise PatchError(
            f"Patch {list(patch)} is not 3D: this method builds a volumetric token grid and needs a 3d "
            "configuration (3d_fullres or 3d_lowres), not 2d."
        )
    if patch[0] % rule.slice_group != 0:
        raise PatchError(f"Patch depth {patch[0]} is not a multiple of the slice group {rule.slice_group}. {fix}")
    grid = (patch[0] // rule.slice_group, patch[1] // spec.patch_size, patch[2] // spec.patch_size)
    if any(n > rule.window and n % rule.window != 0 for n in grid):
        raise PatchError(
            f"Patch {list(patch)} gives a token grid {list(grid)} that is not a whole number of "
            f"{rule.window}-token windows along every axis (or shorter than one window). {fix}"
        )


def check_settings(record: dict, spec: BackboneSpec, num_classes: int) -> None:
    """Raise PatchError if the record's patch, input size or query count cannot work."""
    patch = list(record["patch_size"])
    fix = "Fix the nnunet_sam block of the plans or remove it to use the automatic rule."
    if len(patch) not in (2, 3) or any(int(s) < 1 for s in patch):
        raise PatchError(f"Patch {patch} is neither a 2D [P, P] nor a 3D [D, P, P] patch. {fix}")
    if patch[-1] != patch[-2]:
        raise PatchError(f"SAM needs a square in-plane patch, got {patch[-2]}x{patch[-1]}. {fix}")
    size = int(record["sam_input_size"])
    for name, value in (("in-plane patch", patch[-1]), ("SAM input size", size)):
        if value % spec.patch_size != 0 or value < 2 * spec.patch_size:
            raise PatchError(
                f"The {name} {value} does not fit the {spec.name} backbone: it must be a multiple of its "
                f"{spec.patch_size} px patches and at least {2 * spec.patch_size} px "
                f"(the automatic rule uses multiples of {spec.tile} px). {fix}"
            )
    if int(record["num_queries"]) < num_classes:
        raise PatchError(
            f"The dataset has {num_classes} classes (background included) but only {record['num_queries']} "
            f"queries: every class of a slice needs its own query. Set num_queries >= {num_classes} (a trainer "
            f"subclass attribute `num_queries`, or 'num_queries' in the nnunet_sam block of the plans)."
        )


def sam_settings(
    configuration: dict,
    spec: BackboneSpec,
    rule: PatchRule | VolumePatchRule,
    num_classes: int,
    num_queries: int | None = None,
    sam_input_size: int | None = None,
) -> dict:
    """The ``nnunet_sam`` block for one plans configuration: user block fields first, then the rule."""
    user = dict(configuration.get(PLANS_KEY) or {})
    patch = [int(s) for s in user.get("patch_size") or derive_patch(configuration["patch_size"], spec, rule)]
    record = {
        "backbone": spec.name,
        "patch_size": patch,
        "sam_input_size": int(user.get("sam_input_size") or sam_input_size or patch[-1]),
        "num_queries": int(user.get("num_queries") or num_queries or default_num_queries(num_classes)),
        "attention": check_attention(user.get("attention") or DEFAULT_ATTENTION),
    }
    check_settings(record, spec, num_classes)
    if isinstance(rule, VolumePatchRule):
        check_volume_patch(patch, spec, rule)
        record.update(slice_group=rule.slice_group, window=rule.window)
    return record

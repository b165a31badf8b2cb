"""The SAM patch rule: from an nnU-Net configuration to the patch, SAM input size and query count.

Rule (applied when the configuration in the plans has no ``nnunet_sam`` block):

* depth D = min(planned patch depth, ``max_depth``) for 3D configurations, 1 for 2d ones;
* in-plane size P = ``tile * k`` with k = ceil(max(planned in-plane size) / tile) clipped to
  [1, ``max_tiles``], where ``tile = patch_size * window_size`` of the backbone (224 px for SAM's ViTs):
  square, a whole number of attention windows (no window padding), as close to the plan as allowed;
* SAM input size = P unless the trainer fixes ``sam_input_size`` or an ``input_scale`` s (SAM input = s * P:
  SAM sees the patch at s times its size, one token = ViT patch / s voxels);
* queries N = max(8, ceil(1.5 * C)) with C classes including background, unless the trainer fixes it.
* ``attention``: how SAM's attention is computed (:mod:`nnunet_sam.backbones.attention`); new trainings record
  ``"sdpa"``, and a saved block without the field (trained before it existed) is rebuilt with ``"sam"``.

A trainer (a paper preset) may also fix the patch itself (``fixed_patch``) instead of deriving it from the plan.

A plans file whose configuration already holds an ``nnunet_sam`` block (for example a copy of the plans
edited by hand and passed with ``-p``) overrides the rule field by field; the block written into the plans
saved with the model is what ``nnUNetv2_predict`` rebuilds the network from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from nnunet_sam.backbones.attention import DEFAULT_ATTENTION, check_attention
from nnunet_sam.backbones.sam_vit import BackboneSpec
from nnunet_sam.model_record import PLANS_KEY


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


def check_volume_patch(
    patch: Sequence[int], spec: BackboneSpec, rule: VolumePatchRule, input_size: int | None = None
) -> None:
    """Raise PatchError unless ``patch`` is a 3D patch whose token grid is a whole number of windows per axis.

    The in-plane token grid is that of the SAM input (``input_size``, default: the in-plane patch)."""
    fix = "Fix the nnunet_sam block of the plans or remove it to use the automatic rule."
    if len(patch) != 3:
        raise PatchError(
            f"Patch {list(patch)} is not 3D: this method builds a volumetric token grid and needs a 3d "
            "configuration (3d_fullres or 3d_lowres), not 2d."
        )
    if patch[0] % rule.slice_group != 0:
        raise PatchError(f"Patch depth {patch[0]} is not a multiple of the slice group {rule.slice_group}. {fix}")
    tokens = (input_size or patch[-1]) // spec.patch_size
    grid = (patch[0] // rule.slice_group, tokens, tokens)
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


def scaled_input_size(patch: int, input_scale: float) -> int:
    """SAM input size for an in-plane patch seen at ``input_scale`` times its size (must be a whole number)."""
    size = patch * input_scale
    if input_scale <= 0 or abs(size - round(size)) > 1e-6:
        raise PatchError(
            f"input_scale {input_scale} times the in-plane patch {patch} is not a whole number of pixels: choose "
            "a scale (or a sam_input_size) that gives one."
        )
    return round(size)


def sam_settings(
    configuration: dict,
    spec: BackboneSpec,
    rule: PatchRule | VolumePatchRule,
    num_classes: int,
    num_queries: int | None = None,
    sam_input_size: int | None = None,
    input_scale: float | None = None,
    fixed_patch: Sequence[int] | None = None,
) -> dict:
    """The ``nnunet_sam`` block for one plans configuration: user block fields first, then the trainer's settings
    (``fixed_patch``, ``sam_input_size`` or ``input_scale``, ``num_queries``), then the rule."""
    user = dict(configuration.get(PLANS_KEY) or {})
    if fixed_patch is not None and len(fixed_patch) != len(configuration["patch_size"]):
        kind = "3d (3d_fullres)" if len(fixed_patch) == 3 else "2d"
        raise PatchError(
            f"This trainer fixes the patch {list(fixed_patch)}, which is for a {kind} configuration, but the "
            f"configuration's patch is {list(configuration['patch_size'])}. Train the {kind} configuration."
        )
    planned = user.get("patch_size") or fixed_patch or derive_patch(configuration["patch_size"], spec, rule)
    patch = [int(s) for s in planned]
    # SAM input size: the plans block's size or scale, then the trainer's size or scale, else the patch.
    size = patch[-1]
    for fixed, scale in ((user.get("sam_input_size"), user.get("input_scale")), (sam_input_size, input_scale)):
        if fixed or scale:
            size = fixed or scaled_input_size(patch[-1], float(scale))
            break
    record = {
        "backbone": spec.name,
        "patch_size": patch,
        "sam_input_size": int(size),
        "num_queries": int(user.get("num_queries") or num_queries or default_num_queries(num_classes)),
        "attention": check_attention(user.get("attention") or DEFAULT_ATTENTION),
    }
    check_settings(record, spec, num_classes)
    if isinstance(rule, VolumePatchRule):
        check_volume_patch(patch, spec, rule, record["sam_input_size"])
        record.update(slice_group=rule.slice_group, window=rule.window)
    return record


# ---- what the patch costs at prediction ----------------------------------------------------------------------
MIRROR_AXES_3D = (0, 1, 2)


@dataclass(frozen=True)
class WindowCost:
    """What nnU-Net's sliding window costs for one volume."""

    image_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    step_size: float
    tiles: int
    mirrors: int  # forwards per tile: 2 ** (number of mirror axes), 1 without test-time mirroring
    forwards: int  # tiles x mirrors
    coverage: float  # tile voxels / image voxels: how often every voxel is predicted per mirror


def sliding_window_cost(
    image_shape: Sequence[int],
    patch_size: Sequence[int],
    step_size: float = 0.5,
    mirror_axes: Sequence[int] | None = MIRROR_AXES_3D,
) -> WindowCost:
    """Tiles and forwards of ``nnUNetPredictor`` for a (preprocessed) volume; a volume smaller than the patch is
    padded to it, as nnU-Net does."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    shape = tuple(max(int(s), int(p)) for s, p in zip(image_shape, patch_size))
    patch = tuple(int(p) for p in patch_size)
    tiles = math.prod(len(s) for s in compute_steps_for_sliding_window(shape, patch, step_size))
    mirrors = 2 ** len(mirror_axes) if mirror_axes else 1
    coverage = tiles * math.prod(patch) / math.prod(shape)
    return WindowCost(tuple(int(s) for s in image_shape), patch, step_size, tiles, mirrors, tiles * mirrors, coverage)


def window_cost_note(
    image_shape: Sequence[int], patch_size: Sequence[int], mirror_axes: Sequence[int] | None = MIRROR_AXES_3D
) -> str:
    """One line for logs: the forwards nnU-Net's default prediction needs, and the cheaper choices by name."""
    default = sliding_window_cost(image_shape, patch_size, 0.5, mirror_axes)
    shape = "x".join(str(s) for s in default.image_shape)
    patch = "x".join(str(p) for p in default.patch_size)
    mirrors = f"{default.mirrors} mirrors" if default.mirrors > 1 else "1 (no mirroring)"
    text = (
        f"sliding window: {shape} volume -> {default.tiles} tile{'s' if default.tiles > 1 else ''} of {patch} (tile "
        f"step 0.5, every voxel predicted {default.coverage:.1f}x) x {mirrors} = {default.forwards} forwards"
    )
    if default.forwards == 1:
        return text
    cheaper = []
    if default.mirrors > 1:
        cheaper.append(f"nnUNetv2_predict --disable_tta: {default.tiles} forwards")
    wide = sliding_window_cost(image_shape, patch_size, 1.0, None)
    if wide.tiles < default.tiles:
        cheaper.append(f"--disable_tta -step_size 1: {wide.tiles} forwards")
    return text + (f"; cheaper (predicts differently): {'; '.join(cheaper)}" if cheaper else "")

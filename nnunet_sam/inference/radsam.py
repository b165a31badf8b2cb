"""RadSAM in 3D: one prompt on one slice -> a 3D mask, then 3D editing with correction clicks.

Python API (everything in the model's voxel grid, i.e. nnU-Net's preprocessed volume, axis order (z, y, x) with z
the slice axis):

* :class:`SliceModel` runs a trained RadSAM network on the slices of one volume (image embeddings are cached, so a
  slice is encoded once however often it is prompted; optionally slice masks are kept by their exact inputs, so an
  edit whose propagation reaches a slice with the same prompts as before takes the earlier mask instead of decoding
  it again);
* :func:`segment_from_prompt` segments slice i from a point, box or mask prompt, then uses each slice's mask as the
  mask prompt of the next slice, up to the upper and down to the lower boundary slice (inclusive), never beyond;
* :func:`edit` applies correction clicks: slice j is re-segmented from its current mask and all clicks on it, then
  propagation starts again from j in both directions, each slice from the new mask of its neighbour plus the
  clicks stored on it earlier, up to the boundary or up to (not including) the nearest slice the user fixed: the
  prompt slice of :func:`segment_from_prompt` and every slice holding a click. So a click beyond a slice where
  propagation had died fills the gap back to the fixed slice, and a click never undoes another click's slice. A
  click changes only its own connected error region (a positive one only adds, a negative one only removes), each
  further slice takes only the changes that continue its neighbour's and are no larger, and re-propagation stops at
  the first slice that does not change (:func:`correct`, :func:`_propagate`);
* :func:`from_mask` starts editing from an existing 3D mask (e.g. one class of any nnU-Net model's prediction);
  no slice of it is fixed, so a click re-propagates both ways (as far as it changes slices).

A slice whose neighbour's mask is empty and that holds no click stays empty: towards a boundary the structure has
ended, so the slices beyond are emptied; towards a fixed slice (which holds the structure) propagation just stops
and the slices up to it keep their masks. All of it is deterministic: the same inputs give the same mask.

Console command ``nnunet_sam_segment_radsam``: reads an image with nnU-Net's reader, preprocesses it as the model's
plans say, reads a prompt file (see :func:`read_prompt_file`), and writes the 3D mask with the image's geometry through
nnU-Net's export, checked like ``nnunet_sam_predict``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from scipy.ndimage import binary_dilation, distance_transform_edt
from scipy.ndimage import label as ndimage_label

from nnunet_sam.file_checks import is_finite_number
from nnunet_sam.inference import geometry
from nnunet_sam.inference.model_folder import load_predictor, require_network
from nnunet_sam.inference.predict import read_and_check
from nnunet_sam.prompting.radsam_prompts import Prompts

COMMAND = "nnunet_sam_segment_radsam"

PromptKind = Literal["point", "box", "mask"]
PROPAGATIONS = ("mask", "box")  # how a 3D mask grows from slice to slice (see follow)


class PromptError(ValueError):
    """A prompt that cannot be used on this volume; the message says what is wrong."""


@dataclass(frozen=True)
class Prompt:
    """The initial prompt on one slice: a point (y, x), a box (y0, x0, y1, x1) (first and last row and column,
    inclusive) or a mask (Y, X) bool of that slice."""

    kind: PromptKind
    slice: int
    point: tuple[float, float] | None = None
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Correction:
    """A correction click at (slice, y, x): positive (add this structure here) or negative (remove)."""

    slice: int
    y: float
    x: float
    positive: bool


@dataclass(frozen=True)
class Segmentation3D:
    """A 3D mask (Z, Y, X) bool with what produced it: the seed slice, the inclusive boundaries and the clicks.

    ``seed_fixed``: the seed slice was segmented from the user's prompt (:func:`segment_from_prompt`), so edits
    do not propagate through it; False for a mask from elsewhere (:func:`from_mask`)."""

    mask: np.ndarray
    seed: int
    boundaries: tuple[int, int]
    corrections: tuple[Correction, ...] = ()
    seed_fixed: bool = True

    def fixed_slices(self) -> set[int]:
        """Slices the user fixed: the prompt slice (if any) and every slice holding a click."""
        return {c.slice for c in self.corrections} | ({self.seed} if self.seed_fixed else set())


def check_prompt(prompt: Prompt, boundaries: tuple[int, int], shape: Sequence[int]) -> None:
    """Raise :class:`PromptError` unless ``prompt`` and ``boundaries`` fit a volume of ``shape`` (Z, Y, X)."""
    z, h, w = (int(s) for s in shape)
    lo, hi = boundaries
    if prompt.kind not in ("point", "box", "mask"):
        raise PromptError(f"unknown prompt kind '{prompt.kind}': use 'point', 'box' or 'mask'")
    if not 0 <= lo < z or not 0 <= hi < z:
        raise PromptError(f"boundaries [{lo}, {hi}] lie outside the volume's slices 0..{z - 1}")
    if lo > hi:
        raise PromptError(f"boundaries reversed: lower slice {lo} > upper slice {hi}; give [lower, upper]")
    if not 0 <= prompt.slice < z:
        raise PromptError(f"prompt slice {prompt.slice} lies outside the volume (slices 0..{z - 1})")
    if not lo <= prompt.slice <= hi:
        raise PromptError(f"prompt slice {prompt.slice} lies outside the boundaries [{lo}, {hi}]")
    if prompt.kind == "point":
        if prompt.point is None or len(prompt.point) != 2:
            raise PromptError("a point prompt needs 'point': [y, x]")
        _check_inside("point", prompt.point, h, w)
    elif prompt.kind == "box":
        if prompt.box is None or len(prompt.box) != 4:
            raise PromptError("a box prompt needs 'box': [y0, x0, y1, x1]")
        y0, x0, y1, x1 = prompt.box
        _check_inside("box corner", (y0, x0), h, w)
        _check_inside("box corner", (y1, x1), h, w)
        if y1 < y0 or x1 < x0:
            raise PromptError(f"box {list(prompt.box)} is reversed: need y0 <= y1 and x0 <= x1")
    else:
        if prompt.mask is None or prompt.mask.shape != (h, w):
            got = None if prompt.mask is None else prompt.mask.shape
            raise PromptError(f"a mask prompt needs a ({h}, {w}) mask of the slice, got {got}")
        if not prompt.mask.any():
            raise PromptError(f"the mask prompt is empty on slice {prompt.slice}: nothing to segment")


def _check_inside(what: str, yx: Sequence[float], h: int, w: int) -> None:
    y, x = yx
    if not (-0.5 <= y < h - 0.5 and -0.5 <= x < w - 0.5):
        raise PromptError(f"{what} (y={y:g}, x={x:g}) lies outside the image ({h} rows x {w} columns)")


def _row_prompts(
    height: int,
    width: int,
    clicks: Sequence[tuple[float, float, bool]],
    box: Sequence[float] | None,
    coordinate: Callable[[float], float],
) -> Prompts:
    """One prompt row on a height x width frame: clicks (y, x, positive) and a box (y0, x0, y1, x1), each coordinate
    mapped by ``coordinate`` into that frame."""
    prompts = Prompts.empty(1, height, width)
    for y, x, positive in clicks:
        prompts = prompts.with_points(torch.tensor([[coordinate(x), coordinate(y)]]), torch.tensor([int(positive)]))
    if box is not None:
        y0, x0, y1, x1 = box
        boxes = torch.tensor([[coordinate(x0), coordinate(y0), coordinate(x1), coordinate(y1)]])
        prompts = replace(prompts, boxes=boxes, has_box=torch.ones(1, dtype=torch.bool))
    return prompts


def network_propagation(network: torch.nn.Module) -> str:
    """How a RadSAM network's masks grow from slice to slice: its record's ``propagation`` ("mask" if absent)."""
    return getattr(getattr(network, "options", None), "propagation", "mask")


class SliceModel:
    """A RadSAM network (:class:`~nnunet_sam.network_architectures.radsam.RadSAMNetwork`, eval mode) on the slices
    of one preprocessed volume (M, Z, Y, X).

    Networks with the input contract (``network.contract``) take each whole slice as their backbone was pretrained
    (longest side resized to the input size, padded after normalisation; masks cropped and resized back). Models
    saved before it: slices larger than the network's P x P patch are shrunk to fit (keeping the aspect ratio) and
    every slice is padded with 0 at the bottom and right to P x P, as nnU-Net pads its training patches.

    ``cache_bytes`` > 0 keeps predicted slice masks (bit-packed, least recently used dropped first, at most that many
    bytes) under the exact inputs of :meth:`predict` (slice, clicks, box, mask): the network is deterministic, so a
    kept mask is the one a new decode would give. An edit then decodes only the slices whose prompts changed.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        volume: np.ndarray | torch.Tensor,
        device: str = "cpu",
        *,
        propagation: str | None = None,
        cache_bytes: int = 0,
    ) -> None:
        volume = torch.as_tensor(np.asarray(volume), dtype=torch.float32)
        if propagation not in (None, *PROPAGATIONS):
            raise ValueError(f"propagation must be one of {PROPAGATIONS} (or None: the model's), got {propagation!r}")
        self._propagation = propagation
        assert volume.dim() == 4, f"volume must be (M, Z, Y, X), got {tuple(volume.shape)}"
        self.network = network.eval()
        self.device = torch.device(device)
        self.volume = volume
        self.shape = tuple(volume.shape[1:])
        p = network.patch
        self.patch = p
        h, w = self.shape[1:]
        self.factor = min(1.0, p / max(h, w))
        self.fitted = (max(1, round(h * self.factor)), max(1, round(w * self.factor)))
        self._embeddings: dict[int, torch.Tensor] = {}
        self.cache_bytes = int(cache_bytes)
        self._masks: OrderedDict[tuple, np.ndarray] = OrderedDict()  # inputs -> packed mask
        self._mask_bytes = 0
        self.decoded = 0  # slice masks decoded by the network (not taken from the cache)

    def _fit(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        """(C, Y, X) -> (C, P, P): shrunk if needed, padded with 0 at the bottom/right."""
        if self.factor < 1:
            image = F.interpolate(image[None].float(), size=self.fitted, mode=mode)[0]
        return F.pad(image, (0, self.patch - image.shape[-1], 0, self.patch - image.shape[-2]))

    @property
    def contract(self):
        return getattr(self.network, "contract", None)

    def embedding(self, z: int) -> torch.Tensor:
        if z not in self._embeddings:
            image = self.volume[:, z] if self.contract is not None else self._fit(self.volume[:, z], "bilinear")
            with torch.no_grad():
                self._embeddings[z] = self.network.embed(image[None].to(self.device))
        return self._embeddings[z]

    def predict(
        self,
        z: int,
        clicks: Sequence[tuple[float, float, bool]] = (),
        box: Sequence[float] | None = None,
        mask: np.ndarray | None = None,
        all_masks: bool = False,
    ) -> np.ndarray:
        """Mask (Y, X) bool of slice z from clicks (y, x, positive), a box (y0, x0, y1, x1) and/or a mask (Y, X);
        with ``all_masks`` SAM's four masks (4, Y, X), the primary first (the others: its three multimask outputs)."""
        if self.cache_bytes <= 0 or all_masks:  # the kept masks are primary masks only
            return self._decode(z, clicks, box, mask, all_masks)
        key = _inputs_key(z, clicks, box, mask)
        packed = self._masks.get(key)
        if packed is None:
            result = self._decode(z, clicks, box, mask)
            packed = np.packbits(result)
            self._masks[key] = packed
            self._mask_bytes += packed.nbytes
            while self._mask_bytes > self.cache_bytes:
                self._mask_bytes -= self._masks.popitem(last=False)[1].nbytes
            return result
        self._masks.move_to_end(key)
        h, w = self.shape[1:]
        return np.unpackbits(packed, count=h * w).reshape(h, w).astype(bool)

    def _decode(
        self,
        z: int,
        clicks: Sequence[tuple[float, float, bool]],
        box: Sequence[float] | None,
        mask: np.ndarray | None,
        all_masks: bool = False,
    ) -> np.ndarray:
        """:meth:`predict` by the network."""
        self.decoded += 1
        if self.contract is not None:
            return self._predict_slice(z, clicks, box, mask, all_masks)
        f, p = self.factor, self.patch

        def scaled(c: float) -> float:
            return (c + 0.5) * f - 0.5

        prompts = _row_prompts(p, p, clicks, box, scaled)
        if mask is not None and mask.any():
            fitted = self._fit(torch.from_numpy(np.asarray(mask, dtype=np.float32))[None], "nearest")
            prompts = prompts.with_masks(fitted > 0.5)
        prompts = Prompts(*(t.to(self.device) for t in vars(prompts).values()))
        with torch.no_grad():
            logits = self.network.decode_prompts(self.embedding(z), prompts, all_masks)[0, 0]
        logits = logits[..., : self.fitted[0], : self.fitted[1]].float().cpu()
        if self.factor < 1:
            logits = F.interpolate(logits.reshape(1, -1, *logits.shape[-2:]), size=self.shape[1:], mode="bilinear")
            logits = logits[0] if all_masks else logits[0, 0]
        return (logits > 0).numpy()

    @property
    def propagation(self) -> str:
        """How masks grow from slice to slice ("mask" or "box"): the one given to the constructor (an evaluation
        setting, e.g. RadSAM's Table 5), else the network record's ``propagation``."""
        return self._propagation or network_propagation(self.network)

    def _predict_slice(
        self,
        z: int,
        clicks: Sequence[tuple[float, float, bool]],
        box: Sequence[float] | None,
        mask: np.ndarray | None,
        all_masks: bool = False,
    ) -> np.ndarray:
        """The input-contract path of :meth:`predict`: the whole slice, prompts in its pixels."""
        h, w = self.shape[1:]
        prompts = _row_prompts(h, w, clicks, box, float)
        if mask is not None and mask.any():
            prompts = prompts.with_masks(torch.from_numpy(np.asarray(mask, dtype=bool))[None])
        prompts = Prompts(*(t.to(self.device) for t in vars(prompts).values()))
        with torch.no_grad():
            logits = self.network.segment_slice(self.embedding(z), prompts, (h, w), all_masks)[0]
        return (logits > 0).cpu().numpy()


def _inputs_key(
    z: int, clicks: Sequence[tuple[float, float, bool]], box: Sequence[float] | None, mask: np.ndarray | None
) -> tuple:
    """The exact inputs of one slice prediction as a dict key (an empty mask counts as none, as in predict)."""
    clicks = tuple((float(y), float(x), bool(p)) for y, x, p in clicks)
    box = None if box is None else tuple(float(v) for v in box)
    digest = None
    if mask is not None and np.asarray(mask).any():
        mask = np.ascontiguousarray(mask)
        digest = hashlib.blake2b(mask.tobytes(), digest_size=16, person=f"{mask.dtype}{mask.shape}".encode()[:16])
        digest = digest.digest()
    return int(z), clicks, box, digest


BOX_MARGIN = 0.025  # box propagation: margin as a fraction of the slice's longest side
CONTINUITY = 0.5  # box propagation: least fraction of a new slice mask inside its neighbour's mask
# box propagation: how far (pixels) a structure's outline may move out from its neighbour's between two slices. On the
# real CT of nnunet_sam_benchmark_real (mean 3D Dice of 7 structures from one box): no limit 0.893, 1 px 0.896 (the
# stomach loses its growing parts), 2 px 0.902, 3 px 0.897, 4 px 0.896; the box alone lets the mask drift into a
# touching structure (the liver's dome into the heart, 0.907 -> 0.934 with the limit).
GROWTH = 2


def _component(mask: np.ndarray, point: tuple[int, int]) -> np.ndarray:
    """The 8-connected part of ``mask`` (Y, X) that holds ``point`` (empty if the point is outside the mask)."""
    if not mask[point]:
        return np.zeros_like(mask)
    labels, _ = ndimage_label(mask, structure=np.ones((3, 3), dtype=bool))
    return labels == labels[point]


def _apply_negative_clicks(mask: np.ndarray, clicks: Sequence[tuple[float, float, bool]]) -> np.ndarray:
    """``mask`` without the parts that negative clicks point at (a part that holds a positive click stays)."""
    keep = np.zeros_like(mask)
    for y, x, positive in clicks:
        if positive:
            keep |= _component(mask, (round(y), round(x)))
    out = mask.copy()
    for y, x, positive in clicks:
        if not positive:
            part = _component(out, (round(y), round(x)))
            if not (part & keep).any():
                out &= ~part
    return out


def _cut_at(model, z: int, mask: np.ndarray, point: tuple[int, int]) -> np.ndarray:
    """What a negative click at ``point`` inside slice z's ``mask`` (Y, X) removes (a box model's rule): its separate
    part of the mask if the mask has several, else the least of: the disc around the click that reaches the mask's
    nearest border (a user clicks in the middle of a wrong region), and for each side, the part of the mask (around
    the click) that the model no longer finds when the mask's box is cut just short of the click on that side. The
    least change that honours the click: a cut that takes the wrong region off with it wins over the disc, a disc
    on a thin wrong rim over a cut that would take correct parts too."""
    part = _component(mask, point)
    if (mask & ~part).any():
        return part
    padded = np.pad(mask, 1)
    radius = distance_transform_edt(padded)[point[0] + 1, point[1] + 1]
    yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
    least = mask & ((yy - point[0]) ** 2 + (xx - point[1]) ** 2 <= radius**2)
    y0, x0, y1, x1 = _box_around(model, mask)
    y, x = point
    for box in ((y + 1, x0, y1, x1), (y0, x0, y - 1, x1), (y0, x + 1, y1, x1), (y0, x0, y1, x - 1)):
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            continue
        answer = model.predict(z, box=box)
        if not answer[point]:
            removed = _component(mask & ~answer, point)
            if removed.sum() < least.sum():
                least = removed
    return least


def _nearest_mask(mask: np.ndarray, z: int, boundaries: tuple[int, int]) -> np.ndarray:
    """The mask of the segmented slice nearest to z within the boundaries (empty if there is none)."""
    lo, hi = boundaries
    for d in range(1, mask.shape[0]):
        for k in (z - d, z + d):
            if lo <= k <= hi and mask[k].any():
                return mask[k]
    return np.zeros(mask.shape[1:], dtype=bool)


def _clicks_on(corrections: Sequence[Correction], z: int) -> list[tuple[float, float, bool]]:
    return [(c.y, c.x, c.positive) for c in corrections if c.slice == z]


# ---- propagation and corrections (box models never saw mask prompts: they follow with boxes) ------------------------
# ``model`` is a SliceModel or anything with ``predict(z, clicks, box, mask)``, ``shape`` (Z, Y, X) and optionally
# ``propagation`` ("mask" if absent).
def _propagation(model) -> str:
    return getattr(model, "propagation", "mask")


def _box_around(model, mask: np.ndarray, extra: Sequence[tuple[float, float]] = ()) -> tuple[float, ...]:
    """(y0, x0, y1, x1): the bounding box of ``mask`` and the points ``extra``, widened by 2.5 % of the slice's longest
    side (3 px on a 122 px slice; tighter boxes lost structures whose area grows from slice to slice on a real CT)."""
    ys, xs = np.nonzero(mask)
    ys = np.concatenate([ys, [p[0] for p in extra]]).astype(float)
    xs = np.concatenate([xs, [p[1] for p in extra]]).astype(float)
    h, w = model.shape[1:]
    m = BOX_MARGIN * max(h, w)
    return (max(0.0, ys.min() - m), max(0.0, xs.min() - m), min(h - 1.0, ys.max() + m), min(w - 1.0, xs.max() + m))


def _around_clicks(model, z: int, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """A box model on a slice with nothing to follow: a box of 5 % of the slice around the positive clicks."""
    h, w = model.shape[1:]
    m = 0.05 * max(h, w)
    ys, xs = [p[0] for p in points], [p[1] for p in points]
    box = (max(0.0, min(ys) - m), max(0.0, min(xs) - m), min(h - 1.0, max(ys) + m), min(w - 1.0, max(xs) + m))
    return model.predict(z, box=box)


def follow(model, z: int, previous: np.ndarray, clicks: Sequence[tuple[float, float, bool]]) -> np.ndarray:
    """Mask of slice z from its neighbour's mask ``previous`` (and the clicks stored on z).

    "mask" propagation: the neighbour's mask is the mask prompt (RadSAM's training). "box" propagation: the box of
    the neighbour's mask (and the positive clicks on z); the result counts only if at least half of it overlaps the
    neighbour's mask (otherwise the box found another structure: this one has ended, the slice is empty), and
    without a positive click only within ``GROWTH`` pixels of the neighbour's mask; negative clicks on z then remove
    what they point at."""
    if _propagation(model) != "box":
        return model.predict(z, clicks, mask=previous)
    positive = [(y, x) for y, x, p in clicks if p]
    if not previous.any() and not positive:
        return np.zeros(model.shape[1:], dtype=bool)
    if previous.any():
        new = model.predict(z, box=_box_around(model, previous, positive))
    else:
        new = _around_clicks(model, z, positive)
    if previous.any() and not positive:
        if (new & previous).sum() < CONTINUITY * max(1, new.sum()):
            return np.zeros(model.shape[1:], dtype=bool)
        new &= binary_dilation(previous, iterations=GROWTH)  # city-block distance
    return _apply_negative_clicks(new, clicks)


def correct(
    model, z: int, mask: np.ndarray, clicks: Sequence[tuple[float, float, bool]], boundaries: tuple[int, int]
) -> np.ndarray:
    """Slice z after a new click (``clicks``: all clicks stored on z, the newest last): a positive click only adds
    to the slice's mask, a negative one only removes from it, and only the connected region of the change that holds
    the click (the error region the user points at; a model's answer elsewhere on the slice is not taken).

    The answer: "mask" models, the model's own with the current mask as mask prompt plus the clicks (RadSAM's
    editing); "box" models (never trained with clicks), and mask models whose answer does not follow the click, the
    box rule: a positive click takes the mask of the box of the slice's mask (or, on an empty slice, of the nearest
    segmented slice) widened to include it, or of a small box around it where that misses the click or more than
    doubles the mask (or, where no answer takes the click in, the clicked pixel alone); a negative click removes what
    :func:`_cut_at` says."""
    current = mask[z]
    y, x, positive = clicks[-1]
    point = (round(y), round(x))
    if positive == bool(current[point]):
        return current  # a positive click inside the mask or a negative one outside it: nothing to change
    answer = model.predict(z, clicks, mask=current) if _propagation(model) != "box" else None
    if answer is None or bool(answer[point]) != positive:  # a box model, or a model that did not follow the click
        answer = _box_answer(model, z, mask, clicks, boundaries)
    if positive:
        answer[point] = True  # the clicked pixel at least, where no answer takes it in
        return current | _component(answer & ~current, point)
    return current & ~_component(current & ~answer, point)


def _box_answer(
    model, z: int, mask: np.ndarray, clicks: Sequence[tuple[float, float, bool]], boundaries: tuple[int, int]
) -> np.ndarray:
    """Slice z's mask after its newest click, from box prompts only (see :func:`correct`)."""
    current = mask[z]
    y, x, positive = clicks[-1]
    point = (round(y), round(x))
    if not positive:
        return current & ~_cut_at(model, z, current, point)
    base = current if current.any() else _nearest_mask(mask, z, boundaries)
    answer = model.predict(z, box=_box_around(model, base, [(y, x)])) if base.any() else np.zeros_like(current)
    if not answer[point] or (answer & ~current).sum() > base.sum():
        answer = _around_clicks(model, z, [(y, x)])
    return _apply_negative_clicks(answer | current, clicks)


def _spread(before: np.ndarray, answer: np.ndarray, neighbour_before: np.ndarray, neighbour: np.ndarray) -> np.ndarray:
    """A slice's mask after an edit: ``before`` changed by those connected regions of the model's ``answer`` that
    touch (8-connected, across the slice step) what the edit changed on the neighbouring slice: additions where
    pixels were added there, removals where pixels were removed there. Elsewhere the slice keeps ``before``."""
    added = _continues(answer & ~before, neighbour & ~neighbour_before)
    removed = _continues(before & ~answer, neighbour_before & ~neighbour)
    return (before | added) & ~removed


def _continues(change: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The parts of ``change`` that touch ``seeds`` (the neighbour's change), taken only if they are no larger than it:
    an edit's effect may fade from slice to slice, never grow (a growing change is the model drifting into a
    neighbouring structure, not the user's correction)."""
    part = _touching(change, seeds)
    return part if part.sum() <= seeds.sum() else np.zeros_like(part)


def _touching(change: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The 8-connected parts of ``change`` (Y, X) that overlap ``seeds`` grown by one pixel."""
    if not change.any() or not seeds.any():
        return np.zeros_like(change)
    structure = np.ones((3, 3), dtype=bool)
    labels, _ = ndimage_label(change, structure=structure)
    hit = np.unique(labels[binary_dilation(seeds, structure) & change])
    return np.isin(labels, hit[hit > 0])


def _propagate(
    model: SliceModel,
    mask: np.ndarray,
    start: int,
    stop: int,
    corrections: Sequence[Correction],
    fixed: set[int] = frozenset(),
    before: np.ndarray | None = None,
) -> None:
    """Segment slices start + step .. stop (inclusive, step +-1) in place, each from its neighbour's mask
    (:func:`follow`).

    Stops before the first slice in ``fixed``. Once a slice comes out empty without a click, the structure has
    ended: the slices up to ``stop`` are emptied, unless a fixed slice lies that way (the structure continues
    there), in which case they are left as they were. After an edit (``before``: the mask before it), each slice
    takes only the changes that continue its neighbour's (:func:`_spread`), and propagation stops at the first slice
    that does not change (the edit's effect has ended; the slices beyond were made from the same neighbours).
    """
    step = 1 if stop >= start else -1
    ahead = [z for z in range(start + step, stop + step, step)]
    towards_fixed = any(z in fixed for z in ahead)
    for z in ahead:
        if z in fixed:
            return
        previous, clicks = mask[z - step], _clicks_on(corrections, z)
        if not previous.any() and not clicks:
            if towards_fixed:
                return
            answer = np.zeros_like(previous)
        else:
            answer = follow(model, z, previous, clicks)
        if before is not None:
            answer = _spread(before[z], answer, before[z - step], previous)
            if np.array_equal(answer, mask[z]):
                return
        mask[z] = answer


def segment_from_prompt(model: SliceModel, prompt: Prompt, boundaries: tuple[int, int]) -> Segmentation3D:
    """3D mask from one prompt on ``prompt.slice`` and the inclusive boundary slices (lower, upper)."""
    check_prompt(prompt, boundaries, model.shape)
    lo, hi = boundaries
    mask = np.zeros(model.shape, dtype=bool)
    i = prompt.slice
    if prompt.kind == "point":
        mask[i] = model.predict(i, [(*prompt.point, True)])
    elif prompt.kind == "box":
        mask[i] = model.predict(i, box=prompt.box)
    else:
        mask[i] = model.predict(i, mask=prompt.mask)
    _propagate(model, mask, i, hi, ())
    _propagate(model, mask, i, lo, ())
    return Segmentation3D(mask, i, (lo, hi))


def from_mask(mask: np.ndarray, boundaries: tuple[int, int] | None = None) -> Segmentation3D:
    """Start editing from an existing 3D mask (Z, Y, X); seed = its largest slice, boundaries = its extent."""
    mask = np.asarray(mask).astype(bool)
    areas = mask.reshape(mask.shape[0], -1).sum(1)
    if not areas.any():
        raise PromptError("the starting mask is empty: nothing to edit (give a prompt instead)")
    present = np.flatnonzero(areas)
    if boundaries is None:
        boundaries = (int(present[0]), int(present[-1]))
    lo, hi = boundaries
    if not 0 <= lo <= hi < mask.shape[0]:
        raise PromptError(f"boundaries [{lo}, {hi}] must satisfy 0 <= lower <= upper < {mask.shape[0]}")
    seed = int(np.argmax(np.where((np.arange(len(areas)) >= lo) & (np.arange(len(areas)) <= hi), areas, -1)))
    inside = mask.copy()
    inside[:lo] = False
    inside[hi + 1 :] = False
    return Segmentation3D(inside, seed, (int(lo), int(hi)), seed_fixed=False)


def edit(
    model: SliceModel,
    segmentation: Segmentation3D,
    corrections: Sequence[Correction],
    through_clicks: bool = False,
) -> Segmentation3D:
    """Apply correction clicks one after the other (see the module docstring); returns a new Segmentation3D.

    ``through_clicks``: the paper's other reading: propagation passes slices holding earlier clicks, re-segmenting
    each from its neighbour's new mask plus its clicks, and stops only at the boundaries and the prompt slice
    (default False: it stops before a clicked slice, which keeps the mask the user's clicks made).
    """
    z_count, h, w = model.shape
    lo, hi = segmentation.boundaries
    mask = segmentation.mask.copy()
    stored = list(segmentation.corrections)
    for c in corrections:
        if not lo <= c.slice <= hi:
            raise PromptError(f"correction on slice {c.slice} lies outside the boundaries [{lo}, {hi}]")
        _check_inside("correction", (c.y, c.x), h, w)
        stored.append(c)
        j = c.slice
        before = mask.copy()
        mask[j] = correct(model, j, mask, _clicks_on(stored, j), (lo, hi))
        current = replace(segmentation, corrections=tuple(stored))
        fixed = ({current.seed} if current.seed_fixed else set()) if through_clicks else current.fixed_slices()
        fixed = fixed - {j}
        # a box model's slices follow the seed outwards: a correction changes only the slices beyond it
        outwards_only = _propagation(model) == "box" and current.seed_fixed
        if not outwards_only or j >= current.seed:
            _propagate(model, mask, j, hi, stored, fixed, before)
        if not outwards_only or j <= current.seed:
            _propagate(model, mask, j, lo, stored, fixed, before)
    return replace(segmentation, mask=mask, corrections=tuple(stored))


# ---- model folders, images and prompt files ---------------------------------------------------------------------
class RadSAMModel:
    """A trained RadSAM model folder, loaded like ``nnUNetv2_predict`` does (plans, dataset.json, checkpoint)."""

    def __init__(
        self, model_folder: str, fold: int | str = 0, checkpoint: str = "checkpoint_final.pth", device: str = "cpu"
    ) -> None:
        predictor = load_predictor(model_folder, [fold], checkpoint, device)
        network = require_network(
            predictor,
            model_folder,
            lambda net: hasattr(net, "decode_prompts"),
            "RadSAM",
            "train it with RadSAMTrainer (2d configuration)",
        )
        self.network = network.to(device).eval()  # the predictor loaded the fold's weights
        self.device = device
        self.plans_manager = predictor.plans_manager
        self.configuration_manager = predictor.configuration_manager
        self.dataset_json = predictor.dataset_json
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self.reader = self.plans_manager.image_reader_writer_class()
        transpose = list(self.plans_manager.transpose_forward)
        if transpose[0] != 0:
            raise ValueError(f"this model's plans transpose the volume ({transpose}); RadSAM needs slices along axis 0")

    @property
    def native_spacing(self) -> bool:
        """Whether the model keeps each image's own in-plane spacing (its record's ``native_spacing``)."""
        options = getattr(self.network, "options", None)
        return bool(getattr(options, "native_spacing", False))

    def configuration_for(self, properties: dict) -> ConfigurationManager:
        """The plans' configuration, with this image's in-plane spacing where the model keeps native spacing."""
        if not self.native_spacing:
            return self.configuration_manager
        spacing = [float(properties["spacing"][i]) for i in self.plans_manager.transpose_forward][1:]
        return ConfigurationManager({**self.configuration_manager.configuration, "spacing": spacing})

    def preprocess(self, image: np.ndarray, properties: dict, seg: np.ndarray | None = None):
        """nnU-Net's preprocessing of a read image (C, Z, Y, X) (and a label map) -> data, seg, properties."""
        configuration = self.configuration_for(properties)
        preprocessor = configuration.preprocessor_class(verbose=False)
        return preprocessor.run_case_npy(
            image.copy(), seg, dict(properties), self.plans_manager, configuration, self.dataset_json
        )

    def read(self, files: Sequence[str]) -> tuple[np.ndarray, dict]:
        channels = [self.dataset_json["channel_names"][k] for k in sorted(self.dataset_json["channel_names"], key=int)]
        return read_and_check(os.path.basename(files[0]), files, self.reader, channels, model_is_3d=False)

    def to_original(self, mask: np.ndarray, properties: dict) -> np.ndarray:
        """A mask in the preprocessed grid (Z', Y', X') -> the original image grid (Z, Y, X) uint8 0/1."""
        return geometry.mask_to_original(
            mask, self.plans_manager, self.configuration_for(properties), self.label_manager, properties
        )


class Geometry:
    """Original voxel (z, y, x) <-> the preprocessed grid: nnU-Net's crop and in-plane resampling
    (:mod:`nnunet_sam.inference.geometry`), with the checks and messages of prompt files."""

    def __init__(self, properties: dict, preprocessed_shape: Sequence[int]) -> None:
        self.properties = properties
        self.preprocessed_shape = tuple(int(s) for s in preprocessed_shape)
        self.bbox = [list(map(int, b)) for b in properties["bbox_used_for_cropping"]]
        self.original_shape = tuple(int(s) for s in properties["shape_before_cropping"])

    def _mapped(self, z: float, y: float, x: float) -> np.ndarray:
        mapped, _ = geometry.to_preprocessed(np.array([[z, y, x]]), self.properties, (0, 1, 2), self.preprocessed_shape)
        return mapped[0]

    def slice(self, z: int) -> int:
        if not 0 <= z < self.original_shape[0]:
            raise PromptError(f"slice {z} lies outside the volume (slices 0..{self.original_shape[0] - 1})")
        lo, hi = self.bbox[0]
        if not lo <= z < hi:
            raise PromptError(f"slice {z} lies outside the image region nnU-Net keeps (slices {lo}..{hi - 1})")
        return z - lo  # RadSAM's 2d configuration never resamples along the slice axis

    def inplane(self, y: float, x: float) -> tuple[float, float]:
        h, w = self.original_shape[1:]
        if not (-0.5 <= y < h - 0.5 and -0.5 <= x < w - 0.5):
            raise PromptError(f"point (y={y:g}, x={x:g}) lies outside the image ({h} rows x {w} columns)")
        _, y, x = self._mapped(self.bbox[0][0], y, x)
        return float(y), float(x)

    def world_to_voxel(self, xyz: Sequence[float]) -> tuple[float, float, float]:
        """World point (x, y, z) in mm (ITK physical space) -> voxel (z, y, x) of the original array."""
        if len(xyz) != 3:
            raise PromptError(f"a world point needs three coordinates [x, y, z] in mm, got {list(xyz)}")
        try:
            z, y, x = geometry.world_to_voxel(np.asarray([xyz], dtype=float), self.properties)[0]
        except geometry.GeometryError as error:
            raise PromptError(str(error)) from None
        return float(z), float(y), float(x)


# Each correction re-segments its slice and the slices beyond it up to the boundary, so a prompt file's corrections
# cost up to corrections x slices slice predictions: at most CORRECTIONS_PER_SLICE per slice of the volume (and
# MAX_CORRECTIONS in all) bounds that by 4 x slices^2 (1,024 predictions for 16 slices, 40,000 for 100).
MAX_CORRECTIONS = 1000
CORRECTIONS_PER_SLICE = 4


def _slice_index(value, what: str) -> int:
    """A slice index from a prompt file: an integer (12 or 12.0), never a fraction, a boolean, NaN or a string."""
    if not is_finite_number(value) or value != int(value):
        raise PromptError(f"{what} must be an integer slice index, got {json.dumps(value)}")
    return int(value)


def _numbers(value, count: int, what: str) -> list[float]:
    """``count`` finite numbers (coordinates) from a prompt file."""
    if not isinstance(value, (list, tuple)) or len(value) != count or not all(is_finite_number(v) for v in value):
        raise PromptError(f"{what} must be {count} finite numbers, got {json.dumps(value)}")
    return [float(v) for v in value]


@dataclass(frozen=True)
class PromptFile:
    """A prompt file mapped to the preprocessed grid."""

    prompt: Prompt | None
    boundaries: tuple[int, int] | None
    corrections: tuple[Correction, ...]


def read_prompt_file(path: str, geometry: Geometry, mask_prompt: np.ndarray | None = None) -> PromptFile:
    """Read a JSON prompt file; coordinates in the original image's voxel or world space.

    ``{"kind": "point" | "box" | "mask", "space": "voxel" | "world", "slice": i, "point": ..., "box": ...,
    "boundaries": [lower, upper], "corrections": [{"point": ..., "positive": true}, ...]}``. Voxel space: indices
    in the array order (z, y, x) of the image as nnU-Net's reader returns it (z = slice); points are [y, x] on
    "slice", boxes [y0, x0, y1, x1] (first and last row and column), corrections {"slice", "point": [y, x]}. World
    space: points [x, y, z] in mm (ITK physical space), boxes two corners [[x, y, z], [x, y, z]] on one slice,
    corrections {"point": [x, y, z]}; the slice follows from z. Boundaries are always slice indices (inclusive).
    "kind": "mask" takes the mask slice from ``mask_prompt`` (the preprocessed 3D mask file given with the image).
    Without "kind" the file holds only boundaries/corrections (to edit a starting mask).
    """
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # Recursion: deep nesting
        raise PromptError(f"cannot read the prompt file {path}: {type(error).__name__}: {error}") from None
    if not isinstance(spec, dict):
        raise PromptError(f"the prompt file {path} must hold a JSON object")
    space = spec.get("space", "voxel")
    if space not in ("voxel", "world"):
        raise PromptError(f"unknown 'space' '{space}': use 'voxel' or 'world'")

    def voxel(point, z=None, what: str = "point") -> tuple[int, float, float]:
        """A prompt point -> (slice, y, x) in the preprocessed grid."""
        if space == "world":
            z, y, x = geometry.world_to_voxel(_numbers(point, 3, f"a world-space {what} [x, y, z]"))
            z = round(z)
        else:
            if z is None:
                raise PromptError(f"a voxel-space {what} needs a 'slice' and [y, x], got no slice")
            z = _slice_index(z, f"the 'slice' of the {what}")
            y, x = _numbers(point, 2, f"a voxel-space {what} [y, x]")
        return geometry.slice(int(z)), *geometry.inplane(float(y), float(x))

    boundaries = spec.get("boundaries")
    if boundaries is not None:
        if not isinstance(boundaries, list) or len(boundaries) != 2:
            raise PromptError(f"'boundaries' must be [lower, upper] slice indices, got {json.dumps(boundaries)}")
        lower, upper = (_slice_index(b, "each of 'boundaries'") for b in boundaries)
        if lower > upper:
            raise PromptError(f"boundaries reversed: lower slice {lower} > upper slice {upper}; give [lower, upper]")
        boundaries = (geometry.slice(lower), geometry.slice(upper))
    listed = spec.get("corrections", [])
    if not isinstance(listed, list) or not all(isinstance(c, dict) for c in listed):
        raise PromptError(
            f"'corrections' must be a list of objects with 'point' (and 'positive'), got {json.dumps(listed)[:200]}"
        )
    slices = int(geometry.preprocessed_shape[0])
    limit = min(MAX_CORRECTIONS, CORRECTIONS_PER_SLICE * slices)
    if len(listed) > limit:
        raise PromptError(
            f"{len(listed)} corrections; at most {limit} are taken for a volume of {slices} slices "
            f"({CORRECTIONS_PER_SLICE} per slice, {MAX_CORRECTIONS} in all: each one re-segments its slice and the "
            "slices beyond it, so the time grows with corrections x slices). Split the editing into several runs"
        )
    corrections = []
    for i, c in enumerate(listed):
        positive = c.get("positive", True)
        if not isinstance(positive, bool):
            raise PromptError(f"correction {i}: 'positive' must be true or false, got {json.dumps(positive)}")
        z, y, x = voxel(c.get("point"), c.get("slice"), f"correction {i}")
        corrections.append(Correction(z, y, x, positive))

    kind = spec.get("kind")
    prompt = None
    if kind == "point":
        z, y, x = voxel(spec.get("point"), spec.get("slice"))
        prompt = Prompt("point", z, point=(y, x))
    elif kind == "box":
        box = spec.get("box")
        if space == "world":
            if not isinstance(box, list) or len(box) != 2:
                raise PromptError(f"a world-space box needs two corners [[x, y, z], [x, y, z]], got {box}")
            (z0, y0, x0), (z1, y1, x1) = voxel(box[0], what="box corner"), voxel(box[1], what="box corner")
            if z0 != z1:
                raise PromptError(f"the box corners lie on different slices ({z0}, {z1})")
        else:
            _numbers(box, 4, "a voxel-space box [y0, x0, y1, x1]")
            z0, y0, x0 = voxel(box[:2], spec.get("slice"), "box")
            _, y1, x1 = voxel(box[2:], spec.get("slice"), "box")
        prompt = Prompt("box", z0, box=(y0, x0, y1, x1))
    elif kind == "mask":
        if mask_prompt is None:
            raise PromptError("a mask prompt needs the mask file (nnunet_sam_segment_radsam --mask FILE)")
        if space == "voxel":
            z = geometry.slice(_slice_index(spec.get("slice"), "the 'slice' of the mask prompt"))
        else:
            z = voxel(spec.get("point"))[0]
        prompt = Prompt("mask", z, mask=mask_prompt[z])
        if not prompt.mask.any():
            raise PromptError(f"the mask prompt is empty on slice {spec.get('slice')}: nothing to segment")
    elif kind is not None:
        raise PromptError(f"unknown prompt kind '{kind}': use 'point', 'box' or 'mask'")
    return PromptFile(prompt, boundaries, tuple(corrections))

"""How the protocol's interactions map onto the two interactive methods.

An *editor* holds one image of one session in the model's preprocessed grid and the method's state; each
interaction returns the whole binary result (uint8, the client's grid) or raises
:class:`~nnunet_sam.serving.inputs.InteractionError` with the state unchanged. ``state()`` / ``restore()`` give
undo. Positions and boxes arrive in the client's grid and go through :mod:`nnunet_sam.inference.geometry` (nnU-Net's
transpose, crop and resampling), results come back through nnU-Net's export, as in the command-line tools.

RadSAM (:mod:`nnunet_sam.inference.radsam`; slices along axis 0 of the image; the boundaries are its first and
last slice, so a later click may extend a mask anywhere; the table in ``docs/serving.md`` lists every case):

* a positive point without a mask, an axial box, a 3D box (box prompt on its middle slice, propagated within its
  slices), an axial lasso (mask prompt) start :func:`~nnunet_sam.inference.radsam.segment_from_prompt`; a box or
  lasso drawn across axis 1 or 2 gives its slice range and a point prompt at its centre; a positive box or lasso
  later starts again (the previous result is one undo away);
* later points are :func:`~nnunet_sam.inference.radsam.edit` corrections (positive or negative); negative boxes and
  lassos are up to four negative corrections on the mask inside them;
* a scribble (any view) becomes up to four points along it (:func:`spread_points`), each on its own slice: the prompt
  and corrections (no mask yet) or corrections;
* an initial segmentation seeds :func:`~nnunet_sam.inference.radsam.from_mask` (its nonzero voxels).

Prompted 3DSAM-adapter (:mod:`nnunet_sam.inference.prompted`): every point is a 3D click (positive = the served
class, negative = background), a box is several clicks inside it (:func:`box_clicks`) and a positive box also
bounds the prediction; every interaction predicts the volume again from all clicks so far, as
``nnunet_sam_predict_prompted`` does with the same clicks, then clears what lies outside the box.

Interactions queued in manual mode run through :meth:`Editor.run` (the prompted model: all their clicks, one
prediction). Undo entries hold :meth:`Editor.difference` (RadSAM: the changed box of its mask), not whole states.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

from nnunet_sam.inference import geometry
from nnunet_sam.inference.predict import BadCaseError, check_resampled_size, predict_preprocessed, preprocess_case
from nnunet_sam.inference.prompted import PromptedPredictor, point_setter
from nnunet_sam.inference.radsam import (
    Correction,
    Prompt,
    PromptError,
    RadSAMModel,
    SliceModel,
    edit,
    from_mask,
    segment_from_prompt,
)
from nnunet_sam.serving.inputs import InteractionError, UnsupportedInteraction
from nnunet_sam.serving.licenses import model_license

INTERACTIONS = ("points", "bbox2d", "bbox3d", "scribble", "lasso")

# an uploaded image may grow at most this much by the resampling to the model's spacing (5x along each axis; a
# 4 mm MR to 0.8 mm): a wrong header spacing otherwise ties the server up for minutes from a small upload
MAX_UPSAMPLING = 125.0


def _spacing_in_image_order(spacing: Sequence[float], transpose_backward: Sequence[int]) -> list[float]:
    return [float(spacing[a]) for a in transpose_backward]


class Editor:
    """One image and the method's state; subclasses implement the interactions their model takes."""

    shape: tuple[int, ...]  # spatial shape of the client's image

    def state(self):
        raise NotImplementedError

    def restore(self, state) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def point(self, position: np.ndarray, positive: bool) -> np.ndarray:
        raise UnsupportedInteraction("this model takes no point interactions")

    def box(self, box: list[list[int]], positive: bool) -> np.ndarray:
        raise UnsupportedInteraction("this model takes no box interactions")

    def scribble(self, mask: np.ndarray, positive: bool) -> np.ndarray:
        raise UnsupportedInteraction("this model takes no scribbles; use points (see /capabilities)")

    def lasso(self, mask: np.ndarray, positive: bool) -> np.ndarray:
        raise UnsupportedInteraction("this model takes no lasso; use points or a box (see /capabilities)")

    def initial(self, mask: np.ndarray) -> None:
        raise UnsupportedInteraction("this model cannot start from an initial segmentation (see /capabilities)")

    def run(self, steps: Sequence[tuple[str, tuple]]) -> np.ndarray:
        """Interactions queued for one prediction, e.g. ``[("point", (position, True))]``, in order -> the result."""
        result = None
        for name, args in steps:
            result = getattr(self, name)(*args)
        return result

    # undo: the log keeps ``difference(state before a step)`` and gives it back to ``undo`` after that step
    def difference(self, before):
        """What ``undo`` needs to go back from the current state to ``before`` (default: ``before`` itself)."""
        return before

    def difference_bytes(self, difference) -> int:
        return 0

    def undo(self, difference) -> None:
        self.restore(difference)

    def close(self) -> None:
        """The editor is dropped (a new image, the session ended): stop any background work."""


class ServedModel:
    """A loaded model, once per server: what it supports, and :meth:`open` for each uploaded image."""

    kind: str
    supported: dict[str, bool]
    supports_initial_label: bool
    num_channels: int
    patch_size: list[int]
    default_spacing: list[float]
    license: str
    transpose_forward: list[int]
    target_spacing: list[float]  # the model's spacing (transposed axis order; 2D models: the in-plane axes)

    def open(self, image: np.ndarray, spacing: Sequence[float], lock) -> Editor:
        raise NotImplementedError

    def check_resampled_size(self, shape: Sequence[int], spacing: Sequence[float], max_bytes: int) -> None:
        """Refuse an image that nnU-Net's resampling would make absurdly large (a wrong spacing): over the prediction
        command's voxel limit, over ``max_bytes`` as float32, or more than :data:`MAX_UPSAMPLING` times the upload;
        or so small that an axis vanishes."""
        transposed = [float(spacing[a]) for a in self.transpose_forward]
        target = [*transposed[: 3 - len(self.target_spacing)], *self.target_spacing]
        sizes = [int(shape[a]) for a in self.transpose_forward]
        try:
            check_resampled_size("image", np.broadcast_to(np.zeros(1), (1, *sizes)), {"spacing": transposed}, target)
        except BadCaseError as error:
            raise InteractionError(str(error).removeprefix("image: ")) from None
        new_shape = compute_new_shape(sizes, transposed, target)
        voxels = float(np.prod(np.asarray(new_shape, dtype=np.float64)))
        growth = voxels / float(np.prod(sizes, dtype=np.float64))
        megabytes = voxels * 4 * self.num_channels / 2**20
        problem = None
        if min(new_shape) < 1:
            problem = "an axis shorter than one voxel"
        elif megabytes * 2**20 > max_bytes:
            problem = f"{megabytes:.0f} MB, over the server's limit of {max_bytes / 2**20:g} MB"
        elif growth > MAX_UPSAMPLING:
            problem = f"{growth:.0f} times the uploaded voxels, at most {MAX_UPSAMPLING:g}"
        if problem is not None:
            raise InteractionError(
                f"the spacing {[float(f'{s:g}') for s in spacing]} mm would resample the image of shape {list(shape)} "
                f"to {[int(s) for s in new_shape]} voxels at the model's spacing ({problem}); send the image's real "
                "spacing in image_properties['spacing']"
            )


# ---- RadSAM --------------------------------------------------------------------------------------------------
def spread_points(mask: np.ndarray, count: int = 4) -> list[np.ndarray]:
    """Up to ``count`` voxel positions standing for a drawn mask (any view, any number of slices): the voxel nearest
    its centre, then farthest-point picks (ties: lowest index)."""
    voxels = np.argwhere(mask).astype(np.float64)
    chosen = [int(np.argmin(((voxels - voxels.mean(0)) ** 2).sum(1)))]
    distance = ((voxels - voxels[chosen[0]]) ** 2).sum(1)
    while len(chosen) < min(count, len(voxels)) and distance.max() > 0:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, ((voxels - voxels[chosen[-1]]) ** 2).sum(1))
    return [voxels[i] for i in chosen]


def drawn_on(extent: Sequence[int]) -> int | None:
    """The image axis a 2D drawing lies across (its size 1 there; axis 0 first), None for a 3D one."""
    return next((axis for axis, size in enumerate(extent) if size == 1), None)


class RadSAMEditor(Editor):
    def __init__(
        self,
        model: RadSAMModel,
        image: np.ndarray,
        spacing: Sequence[float],
        lock,
        encode_ahead: bool = False,
        cache_bytes: int = 0,
    ) -> None:
        self.model, self.lock = model, lock
        self.image, self.spacing = image, list(spacing)
        self.shape = tuple(image.shape[1:])
        self.data, _, self.properties = model.preprocess(image, {"spacing": self.spacing})
        self.slices = SliceModel(model.network, self.data, model.device, cache_bytes=cache_bytes)
        self.boundaries = (0, self.data.shape[1] - 1)  # every slice: a later click may extend the mask anywhere
        self.segmentation = None
        self._stop = threading.Event()
        self.encoded_ahead = 0  # slices the background thread has encoded (or found encoded)
        if encode_ahead:
            threading.Thread(target=self.encode_ahead, name="encode-ahead", daemon=True).start()

    def encode_ahead(self) -> None:
        """Encode every slice in the background, middle slice first, then outwards; one slice at a time under the
        model's lock, so an interaction waits for one slice at most and finds the slices encoded so far."""
        count = self.data.shape[1]
        for z in sorted(range(count), key=lambda z: (abs(z - count // 2), z)):
            with self.lock:
                if self._stop.is_set():
                    return
                self.slices.embedding(z)
                self.encoded_ahead += 1
            time.sleep(0.01)  # a lock is not fair: give a waiting interaction the model first

    def close(self) -> None:
        self._stop.set()

    def state(self):
        return self.segmentation

    def restore(self, state) -> None:
        self.segmentation = state

    def reset(self) -> None:
        self.segmentation = None

    def difference(self, before):
        """(``before`` without its mask, the box where its mask differs from the current one, ``before``'s voxels
        there); None when there was no mask before."""
        after = self.segmentation
        if before is None:
            return None
        changed = before.mask != after.mask
        if not changed.any():
            return replace(before, mask=np.zeros(0, bool)), None, None
        box = get_bbox_from_mask(changed)
        return replace(before, mask=np.zeros(0, bool)), box, before.mask[bounding_box_to_slice(box)].copy()

    def difference_bytes(self, difference) -> int:
        return 0 if difference is None or difference[2] is None else difference[2].nbytes

    def undo(self, difference) -> None:
        if difference is None:
            self.segmentation = None
            return
        before, box, values = difference
        mask = self.segmentation.mask.copy()
        if box is not None:
            mask[bounding_box_to_slice(box)] = values
        self.segmentation = replace(before, mask=mask)

    def _grid(self, positions: np.ndarray) -> np.ndarray:
        """Client positions (K, 3) -> (slice, y, x) in the preprocessed grid (the slice rounded)."""
        mapped, inside = geometry.to_preprocessed(
            np.asarray(positions, dtype=np.float64).reshape(-1, 3),
            self.properties,
            self.model.plans_manager.transpose_forward,
            self.data.shape[1:],
        )
        if not inside.all():
            raise InteractionError(
                "the interaction lies in the border region nnU-Net crops away (zero intensity around the body); "
                "place it inside the body"
            )
        mapped[:, 0] = np.clip(np.round(mapped[:, 0]), 0, self.data.shape[1] - 1)
        return mapped

    def _run(self, step: Callable[[], object]) -> np.ndarray:
        try:
            with self.lock:
                segmentation = step()
        except PromptError as error:
            raise InteractionError(str(error)) from None
        self.segmentation = segmentation
        return self.model.to_original(segmentation.mask, self.properties)

    def _start(self, prompt: Prompt, boundaries: tuple[int, int] | None = None) -> np.ndarray:
        """A new mask from ``prompt``, propagated within ``boundaries`` (default: every slice); later clicks may
        extend it over every slice."""

        def step():
            segmentation = segment_from_prompt(self.slices, prompt, boundaries or self.boundaries)
            return replace(segmentation, boundaries=self.boundaries)

        return self._run(step)

    def _in_grid(self, mask: np.ndarray) -> np.ndarray:
        """A bool mask in the client's grid -> the preprocessed grid, through nnU-Net's preprocessing of a label map
        (as ``nnunet_sam_segment_radsam --mask``)."""
        _, seg, _ = self.model.preprocess(self.image, {"spacing": self.spacing}, mask[None].astype(np.int16))
        grid = seg[0] > 0
        if not grid.any():
            raise InteractionError("the mask lies in the border region nnU-Net crops away; draw it inside the body")
        return grid

    def _correct(self, corrections: list[Correction]) -> np.ndarray:
        current = self.segmentation
        return self._run(lambda: edit(self.slices, current, corrections))

    def _remove(self, region: np.ndarray, what: str) -> np.ndarray:
        """A negative box or lasso (``region``: its voxels in the grid): negative clicks on the mask inside it."""
        if self.segmentation is None:
            raise InteractionError(f"a negative {what} needs a mask to correct: start with a positive prompt")
        inside = region & self.segmentation.mask
        if not inside.any():
            raise InteractionError(f"the negative {what} holds no voxel of the current mask: nothing to remove")
        return self._correct([Correction(int(z), y, x, False) for z, y, x in spread_points(inside)])

    def point(self, position: np.ndarray, positive: bool) -> np.ndarray:
        z, y, x = self._grid(position)[0]
        if self.segmentation is None:
            if not positive:
                raise InteractionError(
                    "a negative click needs a mask to correct: start with a positive click, a box, a lasso or an "
                    "initial segmentation"
                )
            return self._start(Prompt("point", int(z), (y, x)))
        return self._correct([Correction(int(z), y, x, positive)])

    def box(self, box: list[list[int]], positive: bool) -> np.ndarray:
        """Axis-0 box: RadSAM's box prompt on its slice, propagated over every slice. 3D box: the box prompt on its
        middle slice, propagated within its slice range. Box across axis 1 or 2: a click at its centre, propagated
        within its slice range. Negative: negative clicks on the mask inside the box."""
        (z0, y0, x0), (z1, y1, x1) = self._grid(np.array([[lo for lo, _ in box], [hi - 1 for _, hi in box]]))
        if not positive:
            region = np.zeros(self.data.shape[1:], bool)
            region[int(z0) : int(z1) + 1, round(y0) : round(y1) + 1, round(x0) : round(x1) + 1] = True
            return self._remove(region, "box")
        axis = drawn_on([hi - lo for lo, hi in box])
        middle = int(round((z0 + z1) / 2))
        if axis in (1, 2):
            return self._start(Prompt("point", middle, ((y0 + y1) / 2, (x0 + x1) / 2)), (int(z0), int(z1)))
        if axis == 0:  # drawn on one slice: the structure's extent is not given, propagate as far as it goes
            return self._start(Prompt("box", middle, box=(y0, x0, y1, x1)))
        return self._start(Prompt("box", middle, box=(y0, x0, y1, x1)), (int(z0), int(z1)))

    def lasso(self, mask: np.ndarray, positive: bool) -> np.ndarray:
        """Axis-0 (or 3D) lasso: RadSAM's mask prompt on the slice holding most of it. Lasso across axis 1 or 2: a
        click at its voxel nearest its centre, propagated within its slice range. Negative: negative clicks on the
        mask inside it."""
        grid = self._in_grid(mask)
        if not positive:
            return self._remove(grid, "lasso")
        slices = np.flatnonzero(grid.any((1, 2)))
        if drawn_on(extent(mask)) in (1, 2):
            z, y, x = spread_points(grid, 1)[0]
            return self._start(Prompt("point", int(z), (y, x)), (int(slices[0]), int(slices[-1])))
        z = int(np.argmax(grid.reshape(grid.shape[0], -1).sum(1)))
        return self._start(Prompt("mask", z, mask=grid[z]))

    def scribble(self, mask: np.ndarray, positive: bool) -> np.ndarray:
        """Up to four points along the scribble (in any view, over any slices): the first is the prompt if there
        is no mask yet, the others corrections (positive or negative)."""
        grid = self._grid(np.stack(spread_points(mask)))
        corrections = [Correction(int(z), y, x, positive) for z, y, x in grid]
        if self.segmentation is None:
            if not positive:
                raise InteractionError("a negative scribble needs a mask to correct: start with a positive one")
            first = Prompt("point", corrections[0].slice, (corrections[0].y, corrections[0].x))

            def step():
                start = replace(segment_from_prompt(self.slices, first, self.boundaries), boundaries=self.boundaries)
                return edit(self.slices, start, corrections[1:])

            return self._run(step)
        return self._correct(corrections)

    def initial(self, mask: np.ndarray) -> None:
        _, seg, _ = self.model.preprocess(self.image, {"spacing": self.spacing}, mask[None].astype(np.int16))
        try:  # boundaries: every slice, so that clicks may extend the mask beyond the slices it covers
            self.segmentation = from_mask(seg[0] > 0, self.boundaries)
        except PromptError as error:
            raise InteractionError(str(error)) from None


def extent(mask: np.ndarray) -> list[int]:
    """Size of the bounding box of a mask's True voxels along each axis."""
    present = [np.flatnonzero(mask.any(tuple(a for a in range(mask.ndim) if a != axis))) for axis in range(mask.ndim)]
    return [int(p[-1] - p[0] + 1) for p in present]


class ServedRadSAM(ServedModel):
    kind = "RadSAM"
    supported = {"points": True, "bbox2d": True, "bbox3d": True, "scribble": True, "lasso": True}
    supports_initial_label = True

    def __init__(
        self,
        model: RadSAMModel,
        model_folder: str | None = None,
        encode_ahead: bool = False,
        prediction_cache_mb: float = 16.0,
    ) -> None:
        self.model, self.encode_ahead = model, encode_ahead
        self.cache_bytes = int(prediction_cache_mb * 2**20)
        self.num_channels = len(model.dataset_json["channel_names"])
        self.patch_size = list(model.configuration_manager.patch_size)
        plans = model.plans_manager
        self.default_spacing = _spacing_in_image_order(
            [1.0, *model.configuration_manager.spacing][-3:], plans.transpose_backward
        )
        self.transpose_forward = list(plans.transpose_forward)
        self.target_spacing = list(model.configuration_manager.spacing)
        self.license = model_license(model.configuration_manager.configuration, model.dataset_json, model_folder)

    def open(self, image: np.ndarray, spacing: Sequence[float], lock) -> Editor:
        return RadSAMEditor(self.model, image, spacing, lock, self.encode_ahead, self.cache_bytes)


# ---- prompted 3DSAM-adapter ----------------------------------------------------------------------------------
Click = tuple[tuple[float, ...], int]  # position in the client's grid, class value (0: background)
Region = tuple[tuple[int, int] | None, ...]  # per image axis: [lo, hi) the prediction is kept in, None: unbounded


def box_clicks(box: list[list[int]]) -> list[np.ndarray]:
    """Clicks standing for a box [[lo, hi), ...] (client voxels): its centre, and along every axis the box spans
    (size > 1) the points a quarter of its size either side of the centre; all lie inside the box, and inside an
    ellipsoid that fills it."""
    centre = np.array([(lo + hi - 1) / 2 for lo, hi in box])
    clicks = [centre]
    for axis, (lo, hi) in enumerate(box):
        if hi - lo > 1:
            for sign in (-1, 1):
                clicks.append(centre + sign * (hi - lo) / 4 * np.eye(3)[axis])
    return clicks


def _inside(position: Sequence[float], region: Region) -> bool:
    return all(bound is None or bound[0] - 0.5 <= p < bound[1] - 0.5 for p, bound in zip(position, region))


class PromptedEditor(Editor):
    def __init__(
        self, predictor: PromptedPredictor, label: int, image: np.ndarray, spacing: Sequence[float], lock
    ) -> None:
        self.predictor, self.label, self.lock = predictor, label, lock
        self.image_shape = image.shape
        self.shape = tuple(image.shape[1:])
        try:
            self.data, self.properties = preprocess_case(predictor, "image", image.copy(), {"spacing": list(spacing)})
        except BadCaseError as error:
            raise InteractionError(str(error).removeprefix("image: ")) from None
        self.clicks: tuple[Click, ...] = ()
        self.region: Region | None = None  # the last positive box, until a positive click lands outside it

    def state(self):
        return self.clicks, self.region

    def restore(self, state) -> None:
        self.clicks, self.region = state

    def reset(self) -> None:
        self.clicks, self.region = (), None

    def _predict(self, clicks: tuple[Click, ...], region: Region | None) -> np.ndarray:
        entries = {"image": [{"position": list(p), "label": value} for p, value in clicks]}
        prepare = point_setter(self.predictor, "voxel", entries)
        try:
            with self.lock:
                prepare("image", np.empty((0, *self.shape)), self.properties, self.data)
                segmentation = predict_preprocessed(self.predictor, "image", self.data, self.properties)
        except BadCaseError as error:
            raise InteractionError(str(error).removeprefix("image: ")) from None
        self.clicks, self.region = clicks, region
        result = (segmentation == self.label).astype(np.uint8)
        if region is not None:
            kept = np.zeros_like(result)
            window = tuple(slice(None) if bound is None else slice(*bound) for bound in region)
            kept[window] = result[window]
            result = kept
        return result

    def _step(self, state: tuple[tuple[Click, ...], Region | None], name: str, args: tuple):
        """(clicks, region) after one point or box interaction."""
        clicks, region = state
        where, positive = args
        value = self.label if positive else 0
        if name == "point":
            if positive and region is not None and not _inside(where, region):
                region = None  # the user points at the structure outside the box: the box no longer bounds it
            return (*clicks, (tuple(float(c) for c in where), value)), region
        added = tuple((tuple(float(c) for c in p), value) for p in box_clicks(where))
        if positive:  # a 2D box bounds the prediction in its plane only
            region = tuple(None if hi - lo == 1 else (int(lo), int(hi)) for lo, hi in where)
        return (*clicks, *added), region

    def point(self, position: np.ndarray, positive: bool) -> np.ndarray:
        return self._predict(*self._step(self.state(), "point", (position, positive)))

    def box(self, box: list[list[int]], positive: bool) -> np.ndarray:
        """The network takes clicks: a box is the clicks of :func:`box_clicks` (positive: the served class,
        negative: background); a positive box also bounds the prediction (nothing is kept outside it)."""
        return self._predict(*self._step(self.state(), "box", (box, positive)))

    def run(self, steps: Sequence[tuple[str, tuple]]) -> np.ndarray:
        """Queued points and boxes: all their clicks, one prediction."""
        state = self.state()
        for name, args in steps:
            state = self._step(state, name, args)
        return self._predict(*state)


class ServedPrompted(ServedModel):
    kind = "prompted 3DSAM-adapter"
    supported = {"points": True, "bbox2d": True, "bbox3d": True, "scribble": False, "lasso": False}
    supports_initial_label = False

    def __init__(self, predictor: PromptedPredictor, label: int | None = None, model_folder: str | None = None) -> None:
        self.predictor = predictor
        labels = {int(v) for v in predictor.dataset_json["labels"].values()}
        foreground = sorted(labels - {0})
        self.label = foreground[0] if label is None else int(label)
        if self.label not in foreground:
            raise ValueError(f"label {label} is not a foreground class of this model (it has {foreground})")
        self.num_channels = len(predictor.dataset_json["channel_names"])
        self.patch_size = list(predictor.configuration_manager.patch_size)
        self.default_spacing = _spacing_in_image_order(
            predictor.configuration_manager.spacing, predictor.plans_manager.transpose_backward
        )
        self.transpose_forward = list(predictor.plans_manager.transpose_forward)
        self.target_spacing = list(predictor.configuration_manager.spacing)
        configuration = predictor.configuration_manager.configuration
        self.license = model_license(configuration, predictor.dataset_json, model_folder)

    def open(self, image: np.ndarray, spacing: Sequence[float], lock) -> Editor:
        return PromptedEditor(self.predictor, self.label, image, spacing, lock)


def load_model(
    model_folder: str,
    fold: int | str = 0,
    checkpoint: str = "checkpoint_final.pth",
    device: str = "cpu",
    label: int | None = None,
    step_size: float = 0.5,
    mirroring: bool = True,
    encode_ahead: bool = False,
    prediction_cache_mb: float = 16.0,
) -> ServedModel:
    """A RadSAM or prompted 3DSAM-adapter model folder, loaded once; ValueError for any other model.
    ``encode_ahead``: RadSAM encodes every slice of an image in the background after ``set_image``.
    ``prediction_cache_mb``: RadSAM keeps each session's slice masks by their exact prompts, up to this much
    (:class:`~nnunet_sam.inference.radsam.SliceModel`; 0: off), so edits decode only slices whose prompts changed."""
    from nnunet_sam.inference.model_folder import WrongMethodError
    from nnunet_sam.inference.prompted import UnusableInputError, initialize_predictor

    try:
        model = RadSAMModel(model_folder, fold, checkpoint, device)
        return ServedRadSAM(model, model_folder, encode_ahead, prediction_cache_mb)
    except WrongMethodError:
        pass
    try:
        predictor = initialize_predictor(model_folder, [fold], checkpoint, step_size, mirroring, device)
    except (UnusableInputError, WrongMethodError) as error:
        raise ValueError(
            f"{error}. nnunet_sam_serve serves RadSAM and prompted 3DSAM-adapter (SAM3DAdapterTrainer_prompted*) models"
        ) from None
    return ServedPrompted(predictor, label, model_folder)

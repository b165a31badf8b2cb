"""How the protocol's interactions map onto the two interactive methods.

An *editor* holds one image of one session in the model's preprocessed grid and the method's state; each
interaction returns the whole binary result (uint8, the client's grid) or raises
:class:`~nnunet_sam.serving.inputs.InteractionError` with the state unchanged. ``state()`` / ``restore()`` give
undo. Positions and boxes arrive in the client's grid and go through :mod:`nnunet_sam.inference.geometry` (nnU-Net's
transpose, crop and resampling), results come back through nnU-Net's export, as in the command-line tools.

RadSAM (:mod:`nnunet_sam.inference.radsam`; slices along axis 0 of the image, between the first and last slice):

* the first positive point, a positive 2D box on an axis-0 slice, or a positive lasso start
  :func:`~nnunet_sam.inference.radsam.segment_from_prompt` (point, box or mask prompt on that slice); a box or lasso
  later
  starts again from it (the previous result is one undo away);
* later points are :func:`~nnunet_sam.inference.radsam.edit` corrections (positive or negative);
* a scribble becomes points on the axis-0 slice that holds most of its voxels: the voxel nearest its centre, then
  up to three more, each the scribble voxel farthest from those already taken; they are the prompt and
  corrections (no segmentation yet) or corrections (positive or negative);
* an initial segmentation seeds :func:`~nnunet_sam.inference.radsam.from_mask` (its nonzero voxels).

Prompted 3DSAM-adapter (:mod:`nnunet_sam.inference.prompted`): every point is a 3D click (positive = the served
class, negative = background), a box is one click at its centre; every interaction predicts the volume again
from all clicks so far, as ``nnunet_sam_predict_prompted`` does with the same clicks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from nnunet_sam.inference import geometry
from nnunet_sam.inference.predict import BadCaseError, predict_preprocessed, preprocess_case
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

INTERACTIONS = ("points", "bbox2d", "bbox3d", "scribble", "lasso")


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


class ServedModel:
    """A loaded model, once per server: what it supports, and :meth:`open` for each uploaded image."""

    kind: str
    supported: dict[str, bool]
    supports_initial_label: bool
    num_channels: int
    patch_size: list[int]
    default_spacing: list[float]

    def open(self, image: np.ndarray, spacing: Sequence[float], lock) -> Editor:
        raise NotImplementedError


# ---- RadSAM --------------------------------------------------------------------------------------------------
def scribble_points(mask: np.ndarray, count: int = 4) -> tuple[int, list[np.ndarray]]:
    """(axis-0 slice, up to ``count`` voxel positions (z, y, x)) standing for a scribble: the slice holding most of
    its voxels; the voxel nearest the centre of the scribble there, then farthest-point picks (ties: lowest index)."""
    z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))
    voxels = np.argwhere(mask[z]).astype(np.float64)
    chosen = [int(np.argmin(((voxels - voxels.mean(0)) ** 2).sum(1)))]
    distance = ((voxels - voxels[chosen[0]]) ** 2).sum(1)
    while len(chosen) < min(count, len(voxels)) and distance.max() > 0:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, ((voxels - voxels[chosen[-1]]) ** 2).sum(1))
    return z, [np.array([z, *voxels[i]]) for i in chosen]


class RadSAMEditor(Editor):
    def __init__(self, model: RadSAMModel, image: np.ndarray, spacing: Sequence[float], lock) -> None:
        self.model, self.lock = model, lock
        self.image, self.spacing = image, list(spacing)
        self.shape = tuple(image.shape[1:])
        self.data, _, self.properties = model.preprocess(image, {"spacing": self.spacing})
        self.slices = SliceModel(model.network, self.data, model.device)
        self.boundaries = (0, self.data.shape[1] - 1)
        self.segmentation = None

    def state(self):
        return self.segmentation

    def restore(self, state) -> None:
        self.segmentation = state

    def reset(self) -> None:
        self.segmentation = None

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

    def _mask_slice(self, mask: np.ndarray) -> tuple[int, np.ndarray]:
        """A bool mask in the client's grid -> (slice, its mask there) in the preprocessed grid, through nnU-Net's
        preprocessing of a label map (as ``nnunet_sam_segment_radsam --mask``); the axis-0 slice holding most voxels."""
        _, seg, _ = self.model.preprocess(self.image, {"spacing": self.spacing}, mask[None].astype(np.int16))
        grid = seg[0] > 0
        if not grid.any():
            raise InteractionError("the mask lies in the border region nnU-Net crops away; draw it inside the body")
        z = int(np.argmax(grid.reshape(grid.shape[0], -1).sum(1)))
        return z, grid[z]

    def point(self, position: np.ndarray, positive: bool) -> np.ndarray:
        z, y, x = self._grid(position)[0]
        if self.segmentation is None:
            if not positive:
                raise InteractionError(
                    "a negative click needs a mask to correct: start with a positive click, a box, a lasso or an "
                    "initial segmentation"
                )
            return self._run(lambda: segment_from_prompt(self.slices, Prompt("point", int(z), (y, x)), self.boundaries))
        current = self.segmentation
        return self._run(lambda: edit(self.slices, current, [Correction(int(z), y, x, positive)]))

    def box(self, box: list[list[int]], positive: bool) -> np.ndarray:
        if box[0][1] - box[0][0] != 1:
            raise InteractionError(
                f"RadSAM takes 2D boxes drawn on one slice of image axis 0 (size 1 along axis 0), got {box}"
            )
        if not positive:
            raise InteractionError("RadSAM takes positive boxes only; correct a mask with negative clicks")
        corners = np.array([[box[0][0], box[1][0], box[2][0]], [box[0][0], box[1][1] - 1, box[2][1] - 1]])
        (z, y0, x0), (_, y1, x1) = self._grid(corners)
        prompt = Prompt("box", int(z), box=(y0, x0, y1, x1))
        return self._run(lambda: segment_from_prompt(self.slices, prompt, self.boundaries))

    def lasso(self, mask: np.ndarray, positive: bool) -> np.ndarray:
        if not positive:
            raise InteractionError("RadSAM takes positive lassos only; correct a mask with negative clicks")
        z, region = self._mask_slice(mask)
        prompt = Prompt("mask", z, mask=region)
        return self._run(lambda: segment_from_prompt(self.slices, prompt, self.boundaries))

    def scribble(self, mask: np.ndarray, positive: bool) -> np.ndarray:
        _, points = scribble_points(mask)
        grid = self._grid(np.stack(points))
        corrections = [Correction(int(z), y, x, positive) for z, y, x in grid]
        if self.segmentation is None:
            if not positive:
                raise InteractionError("a negative scribble needs a mask to correct: start with a positive one")
            first = Prompt("point", corrections[0].slice, (corrections[0].y, corrections[0].x))

            def step():
                start = segment_from_prompt(self.slices, first, self.boundaries)
                return edit(self.slices, start, corrections[1:])

            return self._run(step)
        current = self.segmentation
        return self._run(lambda: edit(self.slices, current, corrections))

    def initial(self, mask: np.ndarray) -> None:
        _, seg, _ = self.model.preprocess(self.image, {"spacing": self.spacing}, mask[None].astype(np.int16))
        try:
            self.segmentation = from_mask(seg[0] > 0)
        except PromptError as error:
            raise InteractionError(str(error)) from None


class ServedRadSAM(ServedModel):
    kind = "RadSAM"
    supported = {"points": True, "bbox2d": True, "bbox3d": False, "scribble": True, "lasso": True}
    supports_initial_label = True

    def __init__(self, model: RadSAMModel) -> None:
        self.model = model
        self.num_channels = len(model.dataset_json["channel_names"])
        self.patch_size = list(model.configuration_manager.patch_size)
        plans = model.plans_manager
        self.default_spacing = _spacing_in_image_order(
            [1.0, *model.configuration_manager.spacing][-3:], plans.transpose_backward
        )

    def open(self, image: np.ndarray, spacing: Sequence[float], lock) -> Editor:
        return RadSAMEditor(self.model, image, spacing, lock)


# ---- prompted 3DSAM-adapter ----------------------------------------------------------------------------------
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
        self.clicks: tuple[tuple[tuple[float, ...], int], ...] = ()

    def state(self):
        return self.clicks

    def restore(self, state) -> None:
        self.clicks = state

    def reset(self) -> None:
        self.clicks = ()

    def _predict(self, clicks) -> np.ndarray:
        entries = {"image": [{"position": list(p), "label": value} for p, value in clicks]}
        prepare = point_setter(self.predictor, "voxel", entries)
        try:
            with self.lock:
                prepare("image", np.empty((0, *self.shape)), self.properties, self.data)
                segmentation = predict_preprocessed(self.predictor, "image", self.data, self.properties)
        except BadCaseError as error:
            raise InteractionError(str(error).removeprefix("image: ")) from None
        self.clicks = clicks
        return (segmentation == self.label).astype(np.uint8)

    def point(self, position: np.ndarray, positive: bool) -> np.ndarray:
        click = (tuple(float(c) for c in position), self.label if positive else 0)
        return self._predict((*self.clicks, click))

    def box(self, box: list[list[int]], positive: bool) -> np.ndarray:
        return self.point(np.array([(lo + hi - 1) / 2 for lo, hi in box]), positive)


class ServedPrompted(ServedModel):
    kind = "prompted 3DSAM-adapter"
    supported = {"points": True, "bbox2d": True, "bbox3d": True, "scribble": False, "lasso": False}
    supports_initial_label = False

    def __init__(self, predictor: PromptedPredictor, label: int | None = None) -> None:
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
) -> ServedModel:
    """A RadSAM or prompted 3DSAM-adapter model folder, loaded once; ValueError for any other model."""
    from nnunet_sam.inference.model_folder import WrongMethodError
    from nnunet_sam.inference.prompted import UnusableInputError, initialize_predictor

    try:
        return ServedRadSAM(RadSAMModel(model_folder, fold, checkpoint, device))
    except WrongMethodError:
        pass
    try:
        predictor = initialize_predictor(model_folder, [fold], checkpoint, step_size, mirroring, device)
    except (UnusableInputError, WrongMethodError) as error:
        raise ValueError(
            f"{error}. nnunet_sam_serve serves RadSAM and prompted 3DSAM-adapter (SAM3DAdapterTrainer_prompted*) models"
        ) from None
    return ServedPrompted(predictor, label)

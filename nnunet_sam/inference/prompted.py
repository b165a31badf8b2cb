"""``nnunet_sam_predict_prompted``: point-prompted prediction with a model trained by SAM3DAdapterTrainer_prompted*.

Input: the model folder, a folder of images named as for ``nnUNetv2_predict`` and a points file (JSON)::

    {
      "coordinates": "voxel",
      "points": {
        "case_001": [{"position": [12, 40, 33], "label": 2}, {"position": [30, 20, 21], "label": "liver"}],
        "case_002": [{"position": [14, 41, 30], "label": 1}]
      }
    }

``coordinates`` is the same for every point of the file:

* ``"voxel"`` (default): ``position`` = (i, j, k) index into the image array in the order nnU-Net's reader returns
  it for the model; for ``.nii.gz`` and the other SimpleITK formats (SimpleITKIO, nnU-Net's default reader) that is
  ``SimpleITK.GetArrayFromImage`` order, (z, y, x) = (slice, row, column), 0-based. Fractions are allowed: a voxel
  covers [i - 0.5, i + 0.5).
* ``"world"``: ``position`` = (x, y, z) in mm in ITK's physical space (LPS), what SimpleITK's
  ``Image.TransformIndexToPhysicalPoint`` returns (viewers showing RAS, such as 3D Slicer, show x and y negated);
  needs a reader that reports the image geometry (SimpleITKIO).

``label``: the class clicked, as its value or name in the model's ``dataset.json`` (0 / ``background``: a background
click). Each case's points are mapped through nnU-Net's preprocessing (transpose, crop to non-zero, resampling with
voxel centres aligned, as nnU-Net's resampling does). Then, by default (3DSAM-adapter's test protocol), one patch
centred on the clicks (the centre of their bounding box, moved inside the image) is predicted and everything
outside it is background; clicks that do not fit in that patch are reported and left out. ``--whole-volume``
predicts every sliding-window patch instead, each with the points inside it (the others are padding, label -1).
With mirroring, the points are mirrored with the patch. The output
(one label map per case, the input's geometry) is written by nnU-Net's export and checked like
``nnunet_sam_predict`` (:func:`nnunet_sam.inference.predict.predict_cases`).

A case with no points, points outside the image, unknown labels or a malformed entry, a case of the points file
without an image and an image without points are each reported (the others are predicted); the command exits with
1 if any failed. A file that is not JSON of the layout above stops the command before anything is predicted.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from nnunet_sam.file_checks import is_finite_number
from nnunet_sam.inference import geometry
from nnunet_sam.inference.geometry import to_preprocessed
from nnunet_sam.inference.model_folder import load_predictor, require_network
from nnunet_sam.inference.predict import (
    BadCaseError,
    cases_in_folder,
    predict_cases,
)

COMMAND = "nnunet_sam_predict_prompted"

COORDINATES = ("voxel", "world")
OUTSIDE_CROP_LOGIT = -1e4  # foreground logits outside the crop of the clicks: background there


class UnusableInputError(ValueError):
    """The points file (not JSON, wrong layout) or the model folder cannot be used at all; nothing is predicted."""


def read_points_file(path: str) -> tuple[str, dict[str, list]]:
    """(coordinate system, case id -> list of raw point entries) of a points file; entries are checked per case
    later (:func:`parse_case_points`), so one bad case does not stop the others."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError) as error:
        raise UnusableInputError(f"cannot read the points file {path}: {error}") from None
    except (json.JSONDecodeError, RecursionError) as error:  # RecursionError: nesting deeper than Python's stack
        raise UnusableInputError(f"the points file {path} is not valid JSON: {error}") from None
    if not isinstance(content, dict) or not isinstance(content.get("points"), dict):
        raise UnusableInputError(
            f'the points file {path} must be a JSON object with "points": {{case id: [{{"position": [...], '
            '"label": ...}, ...]}} (and optionally "coordinates": "voxel" or "world")'
        )
    coordinates = content.get("coordinates", "voxel")
    if coordinates not in COORDINATES:
        raise UnusableInputError(f'"coordinates" in {path} must be "voxel" or "world", got {coordinates!r}')
    return coordinates, content["points"]


def parse_case_points(case: str, entries, labels: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Raw entries of one case -> positions (K, 3) float64 as given and class values (K,) int64.

    ``labels`` is ``dataset.json``'s name -> value map (background included). Raises :class:`BadCaseError`
    for no points, a malformed entry or a class the model does not know.
    """
    if not isinstance(entries, list) or not entries:
        raise BadCaseError(f"{case}: no points given (the prompted model needs at least one click per case)")
    values = {int(v) for v in labels.values()}
    positions, classes = [], []
    for n, entry in enumerate(entries):
        where = f"{case}: point {n}"
        position = entry.get("position") if isinstance(entry, dict) else None
        if not isinstance(position, list) or len(position) != 3 or not all(is_finite_number(v) for v in position):
            raise BadCaseError(f'{where}: expected {{"position": [three finite numbers], "label": ...}}, got {entry!r}')
        label = entry.get("label")
        if isinstance(label, str) and label in labels:
            label = int(labels[label])
        if isinstance(label, bool) or not isinstance(label, int) or label not in values:
            known = ", ".join(f"{v} ({k})" for k, v in sorted(labels.items(), key=lambda kv: int(kv[1])))
            raise BadCaseError(f"{where}: unknown class label {entry.get('label')!r}; the model knows {known}")
        positions.append([float(v) for v in position])
        classes.append(label)
    return np.asarray(positions, dtype=np.float64), np.asarray(classes, dtype=np.int64)


def world_to_voxel(case: str, positions: np.ndarray, properties: Mapping) -> np.ndarray:
    """World (x, y, z) mm -> continuous array index (z, y, x) (:func:`nnunet_sam.inference.geometry.world_to_voxel`)."""
    try:
        return geometry.world_to_voxel(positions, properties)
    except geometry.GeometryError as error:
        raise BadCaseError(f"{case}: {error}") from None


def check_inside(case: str, positions: np.ndarray, shape: Sequence[int], given: np.ndarray | None = None) -> None:
    """Every point (K, 3) array index must lie in a voxel of an array of ``shape``: -0.5 <= p < n - 0.5."""
    outside = ~geometry.inside_image(positions, shape)
    if outside.any():
        shown = given if given is not None else positions
        listed = "; ".join(f"point {n} at {np.round(shown[n], 3).tolist()}" for n in np.flatnonzero(outside))
        raise BadCaseError(
            f"{case}: {int(outside.sum())} point(s) outside the image of {tuple(int(s) for s in shape)} voxels "
            f"(array order (z, y, x)): {listed}"
        )


def crop_around(points: torch.Tensor, shape: Sequence[int], patch: Sequence[int]) -> list[int]:
    """Start (corner) of the ``patch`` centred on the bounding box of points (K, 3) in an array of ``shape``
    (>= patch per axis), moved inside the array where the centre is too close to a border."""
    centre = (points.min(0).values + points.max(0).values) / 2
    return [
        int(min(max(np.floor(float(c) - (p - 1) / 2 + 0.5), 0), n - p))
        for c, p, n in zip(centre.tolist(), patch, shape)
    ]


def points_in_patch(
    points: torch.Tensor, labels: torch.Tensor, start: Sequence[int], patch: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points (K, 3) and labels (K,) of the whole (padded) volume -> patch coordinates (K, 3) and labels with -1 for
    points outside the patch whose corner is ``start``."""
    local = points - torch.tensor([float(s) for s in start], dtype=points.dtype)
    size = torch.tensor([float(s) for s in patch], dtype=points.dtype)
    inside = ((local >= -0.5) & (local < size - 0.5)).all(1)
    return local, torch.where(inside, labels, torch.full_like(labels, -1))


class PromptedPredictor(nnUNetPredictor):
    """nnU-Net's predictor passing each case's points to the network.

    Set :attr:`points` (K, 3) float, preprocessed array indices, and :attr:`point_labels` (K,) long before
    ``predict_logits_from_preprocessed_data``. :attr:`crop_to_clicks` (default, 3DSAM-adapter's test protocol):
    one patch centred on the clicks, background elsewhere; False: every sliding-window patch. Padding, slicers,
    Gaussian weighting and ensembling of folds are nnU-Net's; the window loop is written here because nnU-Net's
    does not tell the network where a patch lies.
    """

    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    crop_to_clicks: bool = True

    def _network_call(self, x: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.network(x, points[None].to(self.device), labels[None].to(self.device))

    def _predict_patch(self, x: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits of one patch x (1, C, D, H, W), averaged over nnU-Net's mirrorings (points mirrored with it)."""
        prediction = self._network_call(x, points, labels)
        axes = (
            [a + 2 for a in self.allowed_mirroring_axes] if self.use_mirroring and self.allowed_mirroring_axes else []
        )
        combinations = [c for n in range(len(axes)) for c in itertools.combinations(axes, n + 1)]
        for flip in combinations:
            mirrored = points.clone()
            for axis in flip:
                mirrored[:, axis - 2] = x.shape[axis] - 1 - mirrored[:, axis - 2]
            prediction += torch.flip(self._network_call(torch.flip(x, flip), mirrored, labels), flip)
        return prediction / (len(combinations) + 1)

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """(C, Z, Y, X) preprocessed image -> (num heads, Z, Y, X) logits on the CPU."""
        assert self.points is not None and self.point_labels is not None, "set points and point_labels first"
        assert input_image.ndim == 4, f"expected a (C, Z, Y, X) image, got {tuple(input_image.shape)}"
        self.network = self.network.to(self.device).eval()
        patch = tuple(self.configuration_manager.patch_size)
        data, revert = pad_nd_image(input_image, patch, "constant", {"value": 0}, True, None)
        offset = torch.tensor([float(s.start) for s in revert[1:]])
        points = self.points.double().cpu() + offset
        if self.crop_to_clicks:
            return self._predict_crop(data, points, patch)[(slice(None), *revert[1:])]
        logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.float32)
        weights = torch.zeros(data.shape[1:], dtype=torch.float32)
        gaussian = (
            compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu")).float()
            if self.use_gaussian
            else torch.ones(patch)
        )
        for slicer in self._internal_get_sliding_window_slicers(data.shape[1:]):
            start = [s.start for s in slicer[1:]]
            local, labels = points_in_patch(points, self.point_labels.cpu(), start, patch)
            x = data[slicer][None].to(self.device)
            prediction = self._predict_patch(x, local.float(), labels)[0].float().cpu()
            logits[slicer] += prediction * gaussian
            weights[slicer[1:]] += gaussian
        logits /= weights
        return logits[(slice(None), *revert[1:])]

    def _predict_crop(self, data: torch.Tensor, points: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
        """Logits (heads, Z, Y, X) of the padded image: the patch centred on the clicks, background elsewhere."""
        labels = self.point_labels.cpu()
        start = crop_around(points, data.shape[1:], patch)
        local, local_labels = points_in_patch(points, labels, start, patch)
        left_out = int(((local_labels < 0) & (labels >= 0)).sum())
        if left_out:
            print(
                f"{left_out} of {len(labels)} click(s) lie outside the {list(patch)} patch centred on the clicks and "
                "are left out (use --whole-volume to predict every patch)",
                file=sys.stderr,
            )
        logits = torch.full((self.label_manager.num_segmentation_heads, *data.shape[1:]), OUTSIDE_CROP_LOGIT)
        logits[0] = 0
        slicer = (slice(None), *(slice(s, s + p) for s, p in zip(start, patch)))
        x = data[slicer][None].to(self.device)
        logits[slicer] = self._predict_patch(x, local.float(), local_labels)[0].float().cpu()
        return logits


def point_setter(predictor: PromptedPredictor, coordinates: str, raw_points: Mapping[str, list]):
    """``prepare`` hook of :func:`predict_cases`: check the case's points against its image and hand them, in the
    preprocessed grid, to ``predictor``."""
    labels = predictor.dataset_json["labels"]
    transpose_forward = predictor.plans_manager.transpose_forward

    def prepare(case: str, image: np.ndarray, properties: dict, data: np.ndarray) -> None:
        given, classes = parse_case_points(case, raw_points.get(case), labels)
        voxel = world_to_voxel(case, given, properties) if coordinates == "world" else given
        check_inside(case, voxel, image.shape[1:], given)
        mapped, inside = to_preprocessed(voxel, properties, transpose_forward, data.shape[1:])
        if not inside.any():
            raise BadCaseError(
                f"{case}: every point lies in the region nnU-Net crops away (zero intensity around the body), where "
                "the prediction is background; click inside the body"
            )
        if not inside.all():
            print(f"{case}: {int((~inside).sum())} point(s) in the cropped zero region ignored", file=sys.stderr)
        predictor.points = torch.from_numpy(mapped[inside])
        predictor.point_labels = torch.from_numpy(classes[inside])

    return prepare


def initialize_predictor(
    model_folder: str,
    folds: Sequence[int | str],
    checkpoint: str = "checkpoint_final.pth",
    step_size: float = 0.5,
    mirroring: bool = True,
    device: str = "cpu",
    whole_volume: bool = False,
) -> PromptedPredictor:
    """A :class:`PromptedPredictor` for a model folder (``whole_volume``: every sliding-window patch instead of the
    patch centred on the clicks); :class:`ModelFolderError` for an unusable folder or a model without a point prompt
    encoder."""
    predictor = load_predictor(model_folder, folds, checkpoint, device, step_size, mirroring, PromptedPredictor)
    predictor.crop_to_clicks = not whole_volume
    require_network(
        predictor,
        model_folder,
        lambda network: getattr(network, "prompt_encoder", None) is not None,
        "point-prompted",
        "train it with SAM3DAdapterTrainer_prompted* or predict it with nnUNetv2_predict",
    )
    if predictor.label_manager.has_regions or predictor.label_manager.has_ignore_label:
        raise UnusableInputError("prompted prediction supports plain label maps (no regions, no ignore label)")
    return predictor


def predict_prompted(
    predictor: PromptedPredictor,
    input_folder: str,
    points_file: str,
    output_folder: str,
    save_probabilities: bool = False,
) -> dict[str, str]:
    """Predict every case of ``input_folder`` with its points; return case -> error for the cases that failed
    (including points for cases without an image and images without points)."""
    coordinates, raw_points = read_points_file(points_file)
    ending = predictor.dataset_json["file_ending"]
    cases, misnamed = cases_in_folder(input_folder, ending)
    failures = {
        name: f"{name}: not named CASE_XXXX{ending} (XXXX = channel number, e.g. _0000); not predicted"
        for name in misnamed
    }
    for case in sorted(set(raw_points) - set(cases)):
        failures[case] = (
            f"{case}: no image of this case in {input_folder} (expected {case}_0000{ending}, one file per channel); "
            f"the points file {points_file} has points for it"
        )
    for case in sorted(set(cases) - set(raw_points)):
        failures[case] = f"{case}: no points given (the case is missing from {points_file})"
    todo = {case: files for case, files in cases.items() if case in raw_points}
    failures.update(
        predict_cases(
            predictor, todo, output_folder, save_probabilities, prepare=point_setter(predictor, coordinates, raw_points)
        )
    )
    return failures

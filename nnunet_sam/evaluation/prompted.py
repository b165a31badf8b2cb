"""``nnunet_sam_evaluate_prompted``: the point-prompt evaluation of 3DSAM-adapter (1, 3 or 10 clicks per object).

For every reference case, clicks are simulated from its label map (:func:`simulate_clicks`), written as a points
file (voxel coordinates, see :mod:`nnunet_sam.inference.prompted`), predicted with the prompted command's machinery
and evaluated with :mod:`nnunet_sam.evaluation.folders` (Dice, NSD, HD95; one table row per setting). As the prompted
command, by default one patch centred on the clicks is predicted (3DSAM-adapter's test protocol; background
elsewhere); ``--whole-volume`` predicts every sliding-window patch.

Click positions, per foreground class present in the case (the class's voxels = the object). ``depth`` is each
object voxel's Euclidean distance (mm, the image spacing) to the nearest voxel outside the object, and ``top`` its
largest value in the object:

* ``centre``: the first click is the deepest voxel (largest ``depth``, the first in array order on ties); further
  clicks are drawn from the core, the voxels with ``depth >= 0.75 * top``;
* ``surrounding``: clicks drawn from the voxels around the core, ``0.25 * top < depth < 0.75 * top``;
* ``margin``: clicks drawn from the border layer, ``depth <= 0.25 * top`` (for thin objects this is the surface);
* ``uniform`` (the default, the paper protocol): every click a voxel of the object drawn uniformly with replacement,
  as 3DSAM-adapter's public test script draws its clicks (there from numpy's unseeded global generator, here seeded).

Draws of the other positions are uniform without replacement (with replacement when the region has fewer voxels
than clicks). Every draw comes from a generator seeded with ``--seed`` and the case id, so every run clicks the
same voxels; an empty region (an object only one or two voxels thick has no ring) falls back to the whole object.
A case without any foreground gets one background click (label 0) at its central voxel, so it is still predicted
(and a predicted foreground scores 0).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunet_sam.evaluation.folders import EvaluationError, read_dataset_json, run_evaluation
from nnunet_sam.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM

COMMAND = "nnunet_sam_evaluate_prompted"

POSITIONS = ("uniform", "centre", "surrounding", "margin")
PAPER_POSITION = "uniform"  # 3DSAM-adapter's public test script
NUM_POINTS = (1, 3, 10)


def click_region(mask: np.ndarray, spacing: Sequence[float], position: str) -> tuple[np.ndarray, np.ndarray]:
    """(deepest voxel index (3,), indices (N, 3) of the region ``position`` picks) of a binary object ``mask``."""
    assert position in POSITIONS, f"position must be one of {POSITIONS}, got {position!r}"
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[(slice(1, -1),) * mask.ndim]
    top = depth.max()
    deepest = np.asarray(np.unravel_index(np.argmax(depth), mask.shape))
    if position == "uniform":
        region = mask.copy()
    elif position == "centre":
        region = depth >= 0.75 * top
    elif position == "surrounding":
        region = (depth > 0.25 * top) & (depth < 0.75 * top)
    else:
        region = mask & (depth <= 0.25 * top)
    region &= mask
    if not region.any():
        region = mask
    return deepest, np.argwhere(region)


def simulate_clicks(
    reference: np.ndarray,
    spacing: Sequence[float],
    num_points: int,
    position: str,
    rng: np.random.Generator,
) -> list[dict]:
    """Points-file entries ``{"position": [z, y, x], "label": k}`` for a label map (Z, Y, X), ``num_points`` per
    foreground class present (see the module docstring for the positions)."""
    clicks = []
    for label in (int(v) for v in np.unique(reference) if v != 0):
        deepest, region = click_region(reference == label, spacing, position)
        picks = []
        if position == "centre":
            picks.append(deepest)
        rest = num_points - len(picks)
        if rest:
            replace = position == "uniform" or len(region) < rest
            rows = rng.choice(len(region), size=rest, replace=replace)
            picks.extend(region[rows])
        clicks.extend({"position": [int(v) for v in p], "label": label} for p in picks)
    if not clicks:
        clicks.append({"position": [s // 2 for s in reference.shape], "label": 0})
    return clicks


def _case_rng(seed: int, case: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(case.encode()).hexdigest()[:8], 16)])


def write_points_file(
    reference_folder: str | Path,
    dataset_json: str | Path,
    output_file: str | Path,
    num_points: int,
    position: str,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Simulate the clicks of every reference case, write them as a points file (voxel coordinates) and return them."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    _, ending, content = read_dataset_json(dataset_json)
    files = sorted(p for p in Path(reference_folder).iterdir() if p.name.endswith(ending))
    if not files:
        raise EvaluationError(f"no reference files ending in {ending!r} in {reference_folder}")
    reader = determine_reader_writer_from_dataset_json(content, str(files[0]), verbose=False)()
    points = {}
    for file in files:
        case = file.name[: -len(ending)]
        seg, properties = reader.read_seg(str(file))
        points[case] = simulate_clicks(seg[0], properties["spacing"], num_points, position, _case_rng(seed, case))
    Path(output_file).write_text(json.dumps({"coordinates": "voxel", "points": points}, indent=1))
    return points


def check_images_for_references(image_folder: str | Path, reference_folder: str | Path, ending: str) -> None:
    """Raise :class:`EvaluationError` unless every reference case has its image (``CASE_XXXX<ending>``) and every
    image case its reference (``CASE<ending>``): checked before any click is simulated or any case predicted."""
    from nnunet_sam.inference.predict import cases_in_folder

    for folder, what in ((image_folder, "image folder -i"), (reference_folder, "reference folder -ref")):
        if not Path(folder).is_dir():
            raise EvaluationError(f"the {what} {folder} does not exist or is not a folder")
    images = set(cases_in_folder(str(image_folder), ending)[0])
    references = {p.name[: -len(ending)] for p in Path(reference_folder).iterdir() if p.name.endswith(ending)}
    if without_image := sorted(references - images):
        listed = ", ".join(without_image[:10]) + (" ..." if len(without_image) > 10 else "")
        raise EvaluationError(
            f"{len(without_image)} reference case(s) have no image in {image_folder}: {listed} (expected "
            f"{without_image[0]}_0000{ending}, one file per channel). Add the images, or move these references out "
            f"of {reference_folder}"
        )
    if without_reference := sorted(images - references):
        listed = ", ".join(without_reference[:10]) + (" ..." if len(without_reference) > 10 else "")
        raise EvaluationError(
            f"{len(without_reference)} image case(s) have no reference in {reference_folder}: {listed} (expected "
            f"{without_reference[0]}{ending}). Add the references, or move these images out of {image_folder}"
        )


def run_prompted_evaluation(
    model_folder: str | Path,
    image_folder: str | Path,
    reference_folder: str | Path,
    output_folder: str | Path,
    num_points: Sequence[int] = (1,),
    positions: Sequence[str] = (PAPER_POSITION,),
    folds: Sequence[int | str] = (0,),
    seed: int = 0,
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    mirroring: bool = True,
    device: str = "cpu",
    checkpoint: str = "checkpoint_final.pth",
    whole_volume: bool = False,
) -> dict:
    """Simulate clicks, predict and evaluate every (points, position) setting; returns :func:`run_evaluation`'s
    summary (one run per setting, named ``<n>pt_<position>``). Raises :class:`EvaluationError` if a case failed."""
    from nnunet_sam.inference.prompted import initialize_predictor, predict_prompted

    output_folder = Path(output_folder)
    dataset_json = Path(model_folder) / "dataset.json"
    predictor = initialize_predictor(
        str(model_folder), list(folds), checkpoint, mirroring=mirroring, device=device, whole_volume=whole_volume
    )
    check_images_for_references(image_folder, reference_folder, predictor.dataset_json["file_ending"])
    names, folders = [], []
    for n in num_points:
        for position in positions:
            name = f"{n}pt_{position}"
            folder = output_folder / name
            folder.mkdir(parents=True, exist_ok=True)
            points_file = folder / "points.json"
            write_points_file(reference_folder, dataset_json, points_file, n, position, seed)
            failures = predict_prompted(predictor, str(image_folder), str(points_file), str(folder / "predictions"))
            if failures:
                raise EvaluationError(f"{name}: {len(failures)} case(s) failed: " + "; ".join(failures.values()))
            names.append(name)
            folders.append(folder / "predictions")
    return run_evaluation(reference_folder, folders, dataset_json, output_folder, names, tolerance_mm)

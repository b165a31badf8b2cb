"""``nnunet_sam_benchmark_radsam``: RadSAM's benchmark, per-class 3D Dice of prompted segmentation with simulated edits.

For every case and every foreground class present in its reference (one structure per prompt):

* **volume level**: one prompt on the slice where the structure is largest, plus the first and last slice that
  contain it as boundaries; the mask is propagated slice by slice
  (:func:`nnunet_sam.inference.radsam.segment_from_prompt`).
  Each edit is one click drawn uniformly from the 3D error region (positive in a missed voxel, negative in a false
  one) and re-propagated (:func:`nnunet_sam.inference.radsam.edit`), by default through slices that hold earlier
  clicks, re-using their clicks (``through_clicks``, the paper's reading; ``--stop-at-clicked-slices``: propagation
  stops before a clicked slice);
* **slice level**: one prompt on every slice that contains the structure, each slice segmented on its own; each
  edit round adds one click per slice, drawn from that slice's error region, with the slice's current mask as the
  mask prompt.

Prompts: "point" = a pixel drawn uniformly among those more than 2 px inside the reference slice (``points`` such
pixels per slice at slice level, e.g. the 5 points of PanSAM's "SAM" row), "box" = the reference slice's tight
bounding box.

Evaluation settings of the papers' tables: ``propagation`` ("mask" or "box"; default the model's) is the prompt each
slice passes to the next at volume level (RadSAM's Table 5: the neighbour's mask, or a box around it); ``oracle``
adds the setting "slice <kind> oracle": each slice's best of SAM's three multimask outputs against the reference
(RadSAM's Table 6, the mask a user would pick with one more click); ``levels`` limits the run to "volume" or
"slice" level. Prompts, clicks and propagation work in the model's grid (nnU-Net's
preprocessed volume); the 3D Dice (:func:`nnunet_sam.evaluation.metrics.dice`) is computed in the original image
grid against the reference as read (the mask mapped back as prediction exports it), or with ``grid="preprocessed"``
in the model's grid against nnU-Net's resampled reference. Everything is seeded (``--seed``): the same model and
cases give the same table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from nnunet_sam.evaluation.metrics import dice
from nnunet_sam.inference.predict import cases_in_folder
from nnunet_sam.inference.radsam import (
    Correction,
    Prompt,
    RadSAMModel,
    SliceModel,
    edit,
    network_propagation,
    segment_from_prompt,
)
from nnunet_sam.mask_geometry import pixel_boxes
from nnunet_sam.prompting.radsam_prompts import interior_points

LEVELS = ("volume", "slice")


def slice_prompt(kind: str, reference: np.ndarray, generator: torch.Generator, points: int = 1) -> dict:
    """The simulated user's prompt on one reference slice (Y, X) bool: {"point": (y, x), "points": [(y, x), ...]}
    or {"box": (y0, x0, y1, x1)}.

    Each of the ``points`` points is drawn uniformly (independently) among the pixels more than 2 px inside ("point"
    is the first); the box is the tight bounding box.
    """
    ref = torch.from_numpy(reference)[None]
    if kind == "point":
        drawn, _ = interior_points(ref.expand(points, -1, -1).contiguous(), generator=generator)
        yx = [(y, x) for x, y in drawn.tolist()]
        return {"point": yx[0], "points": yx}
    x0, y0, x1, y1 = pixel_boxes(ref)[0][0].tolist()
    return {"box": (y0, x0, y1, x1)}


def _error_click(prediction: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> tuple | None:
    """A voxel drawn uniformly from the error region and whether it is a missed (positive) voxel; None: no error."""
    errors = np.argwhere(prediction ^ reference)
    if len(errors) == 0:
        return None
    where = tuple(int(i) for i in errors[rng.integers(len(errors))])
    return where, bool(reference[where])


def volume_level(
    model: SliceModel,
    reference: np.ndarray,
    kind: str,
    edits: Sequence[int],
    rng: np.random.Generator,
    generator: torch.Generator,
    score: Callable[[np.ndarray], float] | None = None,
    through_clicks: bool = True,
) -> dict[int, float]:
    """3D Dice after each number of edits in ``edits`` for one structure (Z, Y, X) bool (model grid). ``score``:
    the Dice of a mask in the model's grid (default: against ``reference``)."""
    score = score or (lambda mask: dice(mask, reference))
    areas = reference.reshape(reference.shape[0], -1).sum(1)
    present = np.flatnonzero(areas)
    seed = int(np.argmax(areas))
    drawn = slice_prompt(kind, reference[seed], generator)
    prompt = Prompt(kind, seed, point=drawn.get("point"), box=drawn.get("box"))
    segmentation = segment_from_prompt(model, prompt, (int(present[0]), int(present[-1])))
    result = {}
    for n in range(max(edits) + 1):
        if n in edits:
            result[n] = score(segmentation.mask)
        click = _error_click(segmentation.mask, reference, rng)
        if n == max(edits) or click is None:
            result.update({m: score(segmentation.mask) for m in edits if m > n})
            break
        (z, y, x), positive = click
        segmentation = edit(model, segmentation, [Correction(z, y, x, positive)], through_clicks=through_clicks)
    return result


def slice_level(
    model: SliceModel,
    reference: np.ndarray,
    kind: str,
    edits: Sequence[int],
    rng: np.random.Generator,
    generator: torch.Generator,
    score: Callable[[np.ndarray], float] | None = None,
    points: int = 1,
    oracle: bool = False,
) -> dict[int | str, float]:
    """3D Dice after each number of edits per slice in ``edits``: every slice with the structure prompted alone
    (``points`` points per point prompt). ``oracle``: also "oracle", every slice's best of SAM's three multimask
    outputs for its first prompt. ``score`` as for :func:`volume_level`."""
    score = score or (lambda mask: dice(mask, reference))
    masks = {n: np.zeros_like(reference) for n in edits}
    best = np.zeros_like(reference)
    for z in np.flatnonzero(reference.reshape(reference.shape[0], -1).any(1)):
        z = int(z)
        prompt = slice_prompt(kind, reference[z], generator, points)
        clicks = [(*p, True) for p in prompt["points"]] if kind == "point" else []
        box = prompt.get("box")
        if oracle:
            outputs = model.predict(z, clicks, box=box, all_masks=True)
            current = outputs[0]
            best[z] = max(outputs[1:], key=lambda m: dice(m, reference[z]))
        else:
            current = model.predict(z, clicks, box=box)
        for n in range(max(edits) + 1):
            if n in edits:
                masks[n][z] = current
            click = _error_click(current, reference[z], rng) if n < max(edits) else None
            if click is None:
                for m in edits:
                    if m > n:
                        masks[m][z] = current
                break
            (y, x), positive = click
            clicks.append((y, x, positive))
            current = model.predict(z, clicks, box=box, mask=current)
    result: dict[int | str, float] = {n: score(masks[n]) for n in edits}
    if oracle:
        result["oracle"] = score(best)
    return result


GRIDS = ("original", "preprocessed")


def original_grid_score(model: RadSAMModel, properties: dict, reference: np.ndarray) -> Callable[[np.ndarray], float]:
    """Dice of a mask in the model's grid against ``reference`` (Z, Y, X) bool in the original image grid: the mask
    is mapped back as a prediction is exported (``RadSAMModel.to_original``)."""
    return lambda mask: dice(model.to_original(mask, properties).astype(bool), reference)


def run_benchmark(
    model: RadSAMModel,
    images: str,
    labels: str,
    kinds: Sequence[str] = ("point", "box"),
    volume_edits: Sequence[int] = (0, 5),
    slice_edits: Sequence[int] = (0, 2),
    seed: int = 0,
    max_cases: int | None = None,
    grid: str = "original",
    through_clicks: bool = True,
    propagation: str | None = None,
    oracle: bool = False,
    points: int = 1,
    levels: Sequence[str] = LEVELS,
) -> dict:
    """Dice per setting and class over the cases of ``images`` (nnU-Net naming) with references in ``labels``.

    ``grid``: where the 3D Dice is computed ("original": the image grid, the paper's protocol; "preprocessed":
    the model's grid). ``through_clicks``: volume-level edits propagate through clicked slices (the paper's reading).
    ``propagation``, ``oracle``, ``points`` and ``levels``: the module docstring's evaluation settings (``points``
    above 1 is a slice-level setting: the volume level takes one prompt).

    Returns {"settings": [...], "classes": {name: {setting: mean Dice}}, "mean": {setting: mean over classes},
    "per_case": [...]}. A setting is "volume <kind> +<n> edits" or "slice <kind> +<n>/slice".
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if not levels or set(levels) - set(LEVELS):
        raise ValueError(f"levels must be among {LEVELS}, got {list(levels)}")
    if points < 1 or (points > 1 and "volume" in levels):
        raise ValueError(f"{points} points per prompt: use 1, or more with the slice level alone (levels=['slice'])")
    ending = model.dataset_json["file_ending"]
    cases, _ = cases_in_folder(images, ending)
    names = sorted(cases)[:max_cases]
    if not names:
        raise ValueError(f"no images named CASE_XXXX{ending} in {images}")
    label_names = {int(v): k for k, v in model.dataset_json["labels"].items() if isinstance(v, int) and v > 0}
    per_case = []
    for index, case in enumerate(names):
        label_file = os.path.join(labels, case + ending)
        if not os.path.isfile(label_file):
            raise ValueError(f"no reference {label_file} for case {case}")
        image, properties = model.read(cases[case])
        original = model.reader.read_seg(label_file)[0]
        data, seg, properties = model.preprocess(image, properties, original.astype(np.int16))
        slices = SliceModel(model.network, data, model.device, propagation=propagation)
        for label, name in sorted(label_names.items()):
            reference = seg[0] == label
            if not reference.any():
                continue
            score = original_grid_score(model, properties, original[0] == label) if grid == "original" else None
            for kind in kinds:
                rng = np.random.default_rng([seed, index, label])
                generator = torch.Generator().manual_seed(seed * 100003 + index * 101 + label)
                if "volume" in levels:
                    scores = volume_level(slices, reference, kind, volume_edits, rng, generator, score, through_clicks)
                    for n, value in scores.items():
                        per_case.append((case, name, f"volume {kind} +{n} edits", value))
                if "slice" in levels:
                    scores = slice_level(slices, reference, kind, slice_edits, rng, generator, score, points, oracle)
                    for n, value in scores.items():
                        setting = f"slice {kind} oracle" if n == "oracle" else f"slice {kind} +{n}/slice"
                        per_case.append((case, name, setting, value))
        print(f"done {case}", flush=True)
    settings = list(dict.fromkeys(s for _, _, s, _ in per_case))
    classes = {}
    for name in dict.fromkeys(n for _, n, _, _ in per_case):
        classes[name] = {s: float(np.nanmean([v for _, n, t, v in per_case if n == name and t == s])) for s in settings}
    mean = {s: float(np.nanmean([classes[c][s] for c in classes])) for s in settings}
    propagation = propagation or network_propagation(model.network)
    return {
        "settings": settings,
        "classes": classes,
        "mean": mean,
        "per_case": per_case,
        "propagation": propagation,
        "points": points,
    }


def format_table(result: dict) -> str:
    """Markdown table: one row per class (and the mean), one column per setting."""
    settings = result["settings"]
    lines = ["| class | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for name, row in list(result["classes"].items()) + [("**mean**", result["mean"])]:
        lines.append(f"| {name} | " + " | ".join(f"{row[s]:.3f}" for s in settings) + " |")
    return "\n".join(lines)

"""``nnunet_sam_evaluate_pansam``: PanSAM's ablation rows and zero-shot report from one trained PanSAM model.

Every row runs nnU-Net's own preprocessing, sliding-window prediction and export (as ``nnUNetv2_predict``) on the
given cases with one output of the trained network, then scores the target label against the reference with
Dice, Jaccard, precision and recall (``nnunet_sam.evaluation.metrics``) per case and as the mean over cases:

==================  ===========================  ===================================================
row                 the paper's name             what runs
==================  ===========================  ===================================================
stage1              fine-tuned SAM               stage 1 (SAM's mask decoder without prompts)
stage1+aggregator   + 3D aggregator              stage 1's scores through the trained aggregator
stage1+prompts      + prompt generator           stage 1 -> generated points -> stage 2, no aggregator
full                PanSAM                       the whole pipeline (what ``nnUNetv2_predict`` writes)
reference-2d        PanSAM-GroundTruth (2D)      stage 2 with points drawn from the reference mask
reference-3d        PanSAM-GroundTruth (3D)      stage 2 on reference points, then the aggregator
==================  ===========================  ===================================================

The aggregator of a PanSAM model is trained on stage 2's scores; "stage1+aggregator" applies that aggregator to
stage 1's scores (the paper trained a separate aggregator for its row). Reference rows pass the reference
(preprocessed like the image) as an extra input channel; the generator then draws its points from it.

``--data NAME IMAGES LABELS`` may be repeated: a second dataset that the model never saw gives the zero-shot
figures next to the first. Writes ``pansam_eval.json`` and ``pansam_eval.md`` into the output folder and prints
the table of means.

Each dataset's reference is scored for the model's target structure by name, not by value
(:func:`dataset_target`): the model's ``dataset.json`` names its target label (e.g. "pancreas"), and the value of
that name in the ``dataset.json`` of the evaluated dataset (found next to LABELS or IMAGES, as in an nnU-Net raw
dataset folder) is the reference value there (AbdomenCT-1K: pancreas is 4, NIH: 1). ``--target-label NAME LABEL``
gives it by hand (a value, or a name of that dataset's ``dataset.json``). A dataset whose labels do not name the
target, or that has no ``dataset.json`` and no ``--target-label``, is refused before anything is predicted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_sam.evaluation.metrics import dice, jaccard, precision, recall

COMMAND = "nnunet_sam_evaluate_pansam"

ROWS: dict[str, tuple[str, str, str]] = {  # row -> (network output, points from, the paper's name)
    "stage1": ("coarse", "generator", "fine-tuned SAM"),
    "stage1+aggregator": ("coarse_aggregated", "generator", "+ 3D aggregator"),
    "stage1+prompts": ("refined", "generator", "+ prompt generator"),
    "full": ("final", "generator", "PanSAM"),
    "reference-2d": ("refined", "reference", "PanSAM-GroundTruth (2D)"),
    "reference-3d": ("final", "reference", "PanSAM-GroundTruth (3D)"),
}
METRICS = {"Dice": dice, "Jaccard": jaccard, "Precision": precision, "Recall": recall}


class DatasetLabelError(ValueError):
    """An evaluated dataset whose reference value of the model's target structure cannot be established."""


def _find_dataset_json(*folders: str | Path) -> Path | None:
    """The ``dataset.json`` of the nnU-Net raw dataset holding one of ``folders`` (its parent), or in it."""
    for folder in folders:
        for candidate in (Path(folder).parent / "dataset.json", Path(folder) / "dataset.json"):
            if candidate.is_file():
                return candidate
    return None


def dataset_target(
    name: str,
    images: str | Path,
    labels: str | Path,
    target_name: str,
    given: str | int | None = None,
) -> int:
    """The reference value of the model's target structure ``target_name`` in dataset ``name``.

    ``given`` (``--target-label``): a label value, or a label name of the dataset's ``dataset.json``. Without it
    the dataset's ``dataset.json`` (next to ``labels`` or ``images``) must name ``target_name`` (case-insensitive).
    Raises :class:`DatasetLabelError` naming the problem and the fix.
    """
    found = _find_dataset_json(labels, images)
    names: dict[str, int] = {}
    if found is not None:
        raw = json.loads(found.read_text()).get("labels", {})
        names = {str(k).lower(): v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}
    if given is not None:
        text = str(given)
        if text.lstrip("-").isdigit():
            value = int(text)
            if value < 1:
                raise DatasetLabelError(f"--target-label {name} {given}: the target must be a foreground value >= 1")
            return value
        if text.lower() not in names:
            where = f"the labels of {found} ({', '.join(names)})" if found else "no dataset.json next to its folders"
            raise DatasetLabelError(
                f"--target-label {name} {given!r}: no such label name in {where}; give the label value instead"
            )
        return names[text.lower()]
    if found is None:
        raise DatasetLabelError(
            f"dataset '{name}': its labels are not named (no dataset.json next to {labels} or {images}), so the "
            f"'{target_name}' of the model cannot be found in it. Give its value: --target-label {name} VALUE"
        )
    if target_name.lower() not in names:
        raise DatasetLabelError(
            f"dataset '{name}' ({found}) has no label named '{target_name}' (its labels: {', '.join(names)}), so "
            f"the model's target cannot be scored there. If one of them is the same structure under another name, "
            f"give it: --target-label {name} NAME_OR_VALUE"
        )
    return names[target_name.lower()]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate(
    model_folder: str | Path,
    datasets: Sequence[tuple[str, str | Path, str | Path]],
    rows: Sequence[str] = tuple(ROWS),
    fold: str = "0",
    checkpoint: str = "checkpoint_final.pth",
    output_folder: str | Path | None = None,
    disable_tta: bool = False,
    device: str = "cpu",
    target_labels: dict[str, str | int] | None = None,
) -> dict:
    """Score ``rows`` of a trained PanSAM model on each (name, images folder, labels folder) of ``datasets``.

    ``target_labels``: dataset name -> the target's label value or name there (see :func:`dataset_target`; the
    default looks the model's target name up in each dataset's ``dataset.json``). Returns {"target_label",
    "target_name", "rows", "datasets": {name: {row: {"cases": {case: {metric: value}}, "mean": {...}}}},
    "reference_labels": {name: value}}; with ``output_folder`` the segmentations are written to
    ``output_folder/NAME/ROW/``.
    """
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunet_sam.inference.bound_forward import BoundForward
    from nnunet_sam.inference.model_folder import load_predictor, require_network
    from nnunet_sam.inference.predict import predict_preprocessed
    from nnunet_sam.network_architectures.pansam import PanSAMNetwork

    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    fold_id = fold if fold == "all" else int(fold)
    predictor = load_predictor(str(model_folder), [fold_id], checkpoint, device, mirroring=not disable_tta)
    net = require_network(
        predictor,
        str(model_folder),
        lambda network: isinstance(network, PanSAMNetwork),
        "PanSAM",
        "evaluate a model trained with PanSAMTrainer",
    )
    plans, config, dataset_json = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    reader = plans.image_reader_writer_class()
    ending = dataset_json["file_ending"]
    target = net.target_label
    target_name = next((k for k, v in dataset_json["labels"].items() if v == target), str(target))
    given = dict(target_labels or {})
    unknown_names = sorted(set(given) - {d[0] for d in datasets})
    if unknown_names:
        raise DatasetLabelError(f"--target-label for datasets not given with --data: {', '.join(unknown_names)}")
    references = {n: dataset_target(n, i, lab, target_name, given.get(n)) for n, i, lab in datasets}

    report: dict = {
        "model": str(model_folder),
        "target_label": target,
        "target_name": target_name,
        "reference_labels": references,
        "rows": list(rows),
        "datasets": {},
    }
    for name, images, labels in datasets:
        reference_value = references[name]
        files = create_lists_from_splitted_dataset_folder(str(images), ending)
        if not files:
            raise FileNotFoundError(f"no images ending in {ending} in {images}")
        results: dict = {row: {"cases": {}} for row in rows}
        for case_files in files:
            case = os.path.basename(case_files[0])[: -len(ending) - 5]  # strip _0000 + ending
            label_file = os.path.join(str(labels), case + ending)
            if not os.path.isfile(label_file):
                raise FileNotFoundError(f"reference {label_file} missing for image {case_files[0]}")
            preprocessor = config.preprocessor_class(verbose=False)
            data, seg, props = preprocessor.run_case(case_files, label_file, plans, config, dataset_json)
            reference = reader.read_seg(label_file)[0][0] == reference_value
            for row in rows:
                output, points_from, _ = ROWS[row]
                reference_prompts = points_from == "reference"
                x = np.concatenate([data, seg == reference_value]).astype(np.float32) if reference_prompts else data
                predictor.network = BoundForward(net, output=output, reference_prompts=reference_prompts)
                pred = predict_preprocessed(predictor, case, x, props)
                mask = np.asarray(pred) == target
                results[row]["cases"][case] = {m: float(f(mask, reference)) for m, f in METRICS.items()}
                if output_folder is not None:
                    folder = Path(output_folder) / name / row
                    folder.mkdir(parents=True, exist_ok=True)
                    reader.write_seg(np.asarray(pred), str(folder / (case + ending)), props)
        for row in rows:
            cases = results[row]["cases"].values()
            results[row]["mean"] = {m: _mean([c[m] for c in cases]) for m in METRICS}
        report["datasets"][name] = results
    predictor.network = net
    return report


def markdown(report: dict) -> str:
    """Tables of the report: means per dataset and row, then every case (figures in %)."""
    head = "| dataset | row | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS) + "\n"
    means, cases = head, "| dataset | row | case | " + " | ".join(METRICS) + " |\n|---|---|---|" + "---|" * len(METRICS)
    cases += "\n"
    for name, rows in report["datasets"].items():
        for row, result in rows.items():
            label = f"{row} ({ROWS[row][2]})"
            means += f"| {name} | {label} | " + " | ".join(f"{100 * result['mean'][m]:.2f}" for m in METRICS) + " |\n"
            for case, figures in result["cases"].items():
                cases += f"| {name} | {row} | {case} | " + " | ".join(f"{100 * figures[m]:.2f}" for m in METRICS)
                cases += " |\n"
    scored = ", ".join(f"{n}: {v}" for n, v in report.get("reference_labels", {}).items())
    title = f"Target {report.get('target_name', '')} (label {report['target_label']}; reference value {scored})"
    return f"{title}, mean over cases (%):\n\n{means}\nPer case (%):\n\n{cases}"

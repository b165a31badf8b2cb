"""Evaluate prediction folders against a reference folder: Dice, NSD and HD95 per case and per class.

Files are in nnU-Net's raw format (one label map per case, ``CASE<file_ending>``) and are read with nnU-Net's
own reader classes (chosen from ``dataset.json`` as ``nnUNetv2_evaluate_folder`` does); class names and the
file ending come from ``dataset.json``. Metric definitions and the empty-mask conventions are those of
:mod:`nnunet_sam.evaluation.metrics`. Axes of size 1 (2D data stored as 3D) are dropped before the surface metrics,
so 2D cases get 2D surfaces.

Outputs (folder ``-o``): ``evaluation.json`` with every figure (per case and class, class means over cases,
mean over classes), ``tables.md`` and ``table_<metric>.csv`` laid out like the papers' tables: one row per
run, one column per class, a mean column; optionally followed by the published rows of a protocol
(:mod:`nnunet_sam.evaluation.protocols`: numbers from the papers' tables with their source). Dice and NSD are
given in %, HD95 in mm.
Means: per class over cases with ``nanmean`` (cases where the class is absent from both reference and
prediction are left out, as in nnU-Net), the mean column over classes with ``nanmean``.

Command line: ``nnunet_sam_evaluate --help``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_sam.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM, METRIC_NAMES, label_metrics
from nnunet_sam.evaluation.protocols import PROTOCOLS, Protocol, PublishedRow
from nnunet_sam.file_checks import DamagedFileError, is_nifti, load_nifti

COMMAND = "nnunet_sam_evaluate"

__all__ = [
    "EvaluationError",
    "PublishedRow",
    "Protocol",
    "PROTOCOLS",
    "check_protocol_labels",
    "read_dataset_json",
    "match_cases",
    "evaluate_case",
    "evaluate_folder",
    "summarize",
    "results_table",
    "format_markdown",
    "format_csv",
    "run_evaluation",
]

GEOMETRY_RTOL = 1e-5
GEOMETRY_ATOL = 1e-4  # mm (origin, spacing) / unitless (direction): float32 header round-off, not real shifts
PERCENT_METRICS = ("Dice", "NSD")  # shown in % in the tables (the papers' unit); HD95 in mm


class EvaluationError(RuntimeError):
    """Bad evaluation input: missing prediction, geometry mismatch, unknown label values, bad dataset.json."""


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def check_protocol_labels(protocol_name: str, labels: Mapping[int, str]) -> Protocol:
    """The protocol named ``protocol_name``, after checking that ``labels`` (id -> name) has its ids and names."""
    if protocol_name not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {protocol_name!r}; known: {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[protocol_name]
    problems = []
    for label_id, accepted in protocol.labels.items():
        if label_id not in labels:
            problems.append(f"label {label_id} ({accepted[0]}) is missing")
        elif _normalized(labels[label_id]) not in {_normalized(a) for a in accepted}:
            problems.append(f"label {label_id} is {labels[label_id]!r}, expected one of {list(accepted)}")
    if problems:
        raise EvaluationError(
            f"dataset.json does not match protocol {protocol_name!r} ({protocol.title}), so its published rows "
            f"would be compared with the wrong classes: " + "; ".join(problems)
        )
    return protocol


# --------------------------------------------------------------------------------------------------------------
# Reading and checking the files
# --------------------------------------------------------------------------------------------------------------


def read_dataset_json(path: str | Path) -> tuple[dict[int, str], str, dict]:
    """(foreground label id -> name, file ending, whole dataset.json) of an nnU-Net ``dataset.json``."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"dataset.json not found: {path}")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path} is not valid JSON: {e}") from e
    for key in ("labels", "file_ending"):
        if key not in content:
            raise EvaluationError(f"{path} has no {key!r} entry")
    labels = {}
    for name, value in content["labels"].items():
        if name == "ignore":
            raise EvaluationError(
                f"{path} declares an ignore label; partially annotated references are not supported by this "
                "evaluation (surface metrics are undefined next to unannotated voxels)"
            )
        if not isinstance(value, int) or isinstance(value, bool):
            raise EvaluationError(
                f"{path}: label {name!r} is {value!r}; region-based labels are not supported, only integer labels"
            )
        if value in labels:
            raise EvaluationError(f"{path}: labels {labels[value]!r} and {name!r} share the value {value}")
        if value != 0:
            labels[value] = name
    if not labels:
        raise EvaluationError(f"{path}: no foreground label")
    return dict(sorted(labels.items())), content["file_ending"], content


def _list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"folder not found: {folder}")
    return {
        p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(file_ending)
    }


def match_cases(
    reference_folder: str | Path, prediction_folder: str | Path, file_ending: str
) -> tuple[dict[str, Path], dict[str, Path]]:
    """(case id -> reference file, case id -> prediction file); every reference case must have a prediction."""
    references = _list_cases(Path(reference_folder), file_ending)
    if not references:
        raise EvaluationError(f"no reference files ending in {file_ending!r} in {reference_folder}")
    predictions = _list_cases(Path(prediction_folder), file_ending)
    missing = sorted(references.keys() - predictions.keys())
    if missing:
        raise EvaluationError(
            f"{len(missing)} of {len(references)} reference cases have no prediction in {prediction_folder} "
            f"(expected CASE{file_ending}): {', '.join(missing)}"
        )
    return references, predictions


def _geometry(properties: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten the numeric geometry entries of a reader's properties (spacing, origin, direction, affines)."""
    out = {}
    for key, value in properties.items():
        if isinstance(value, Mapping):
            out.update(_geometry(value, f"{prefix}{key}."))
        else:
            try:
                out[prefix + key] = np.asarray(value, dtype=float)
            except (TypeError, ValueError):
                continue
    return out


def _check_geometry(ref_shape, ref_props, pred_shape, pred_props, case: str) -> None:
    if ref_shape != pred_shape:
        raise EvaluationError(f"case {case}: prediction shape {pred_shape} != reference shape {ref_shape}")
    ref_geo, pred_geo = _geometry(ref_props), _geometry(pred_props)
    differing = [
        f"{key}: prediction {pred_geo[key].tolist()} vs reference {ref_geo[key].tolist()}"
        for key in sorted(ref_geo.keys() & pred_geo.keys())
        if ref_geo[key].shape != pred_geo[key].shape
        or not np.allclose(ref_geo[key], pred_geo[key], rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL)
    ]
    if differing:
        raise EvaluationError(f"case {case}: geometry of prediction and reference differ: " + "; ".join(differing))


def _check_label_values(values: np.ndarray, allowed: set[int], what: str, path: Path) -> None:
    """``values``: the distinct values of a label map (as stored in the file where it is NIfTI)."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise EvaluationError(f"{what} {path} holds non-finite voxels (NaN or inf); a label map holds integers")
        fractional = values[values != np.round(values)]
        if fractional.size:
            raise EvaluationError(
                f"{what} {path} holds fractional values {[float(v) for v in fractional[:10]]}; a label map holds "
                "integers (was it written from probabilities or resampled with linear interpolation?)"
            )
    unknown = sorted(int(v) for v in values if int(v) not in allowed)
    if unknown:
        raise EvaluationError(
            f"{what} {path} contains label values {unknown} that dataset.json does not define "
            f"(defined: {sorted(allowed)})"
        )


def _stored_values(path: Path, what: str) -> np.ndarray | None:
    """The distinct values of a NIfTI label file as stored (nibabel), after checking the file is complete; None for
    other formats. ITK would read a truncated file's missing voxels and NaN voxels as 0 (background)."""
    if not is_nifti(path):
        return None
    try:
        return np.unique(np.asanyarray(load_nifti(path).dataobj))
    except DamagedFileError as error:
        raise EvaluationError(f"{what}: {error}") from None


def _read(reader, path: Path, what: str) -> tuple[np.ndarray, dict]:
    try:
        return reader.read_seg(str(path))
    except Exception as error:  # ITK and the other readers raise many types for a broken file
        raise EvaluationError(f"{what} {path} cannot be read ({type(error).__name__}: {error})") from None


def evaluate_case(
    reference_file: str | Path,
    prediction_file: str | Path,
    reader_class: type,
    labels: Sequence[int],
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    case: str = "",
) -> dict[int, dict[str, float]]:
    """Per-class metrics of one case; raises :class:`EvaluationError` on damaged files, geometry or label values.

    Files are read with ``reader_class`` (an nnU-Net ``BaseReaderWriter``): arrays of shape (1, *spatial)
    with ``properties['spacing']`` in the same axis order. NIfTI files are first checked with
    :func:`nnunet_sam.file_checks.load_nifti` (complete, usable header) and their values taken as stored.
    """
    reference_file, prediction_file = Path(reference_file), Path(prediction_file)
    stored = {
        what: _stored_values(path, what)
        for what, path in (("reference", reference_file), ("prediction", prediction_file))
    }
    reader = reader_class()
    ref, ref_props = _read(reader, reference_file, "reference")
    pred, pred_props = _read(reader, prediction_file, "prediction")
    _check_geometry(ref.shape, ref_props, pred.shape, pred_props, case or str(reference_file))
    allowed = {0, *(int(k) for k in labels)}
    for what, path, array in (("reference", reference_file, ref), ("prediction", prediction_file, pred)):
        values = stored[what] if stored[what] is not None else np.unique(array)
        _check_label_values(values, allowed, what, path)
    ref, pred = ref[0], pred[0]
    spacing = [float(s) for s in ref_props["spacing"]]
    assert len(spacing) == ref.ndim, f"reader gave spacing {spacing} for an array of shape {ref.shape}"
    keep = [axis for axis, size in enumerate(ref.shape) if size > 1]  # 2D data stored with a dummy axis
    if len(keep) not in (2, 3):
        raise EvaluationError(f"case {case}: need 2 or 3 non-singleton axes, got shape {ref.shape}")
    shape = tuple(ref.shape[a] for a in keep)
    return label_metrics(
        pred.reshape(shape), ref.reshape(shape), [spacing[a] for a in keep], list(labels), tolerance_mm
    )


def _evaluate_case_star(args: tuple) -> dict[int, dict[str, float]]:
    return evaluate_case(*args)


def _mean_ignoring_nan(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def summarize(per_case: Sequence[Mapping[str, Any]], labels: Sequence[int]) -> tuple[dict, dict]:
    """(class means over cases with the number of cases counted, mean over classes) of per-case metrics."""
    means = {}
    for k in labels:
        figures = {m: [case["metrics"][k][m] for case in per_case] for m in METRIC_NAMES}
        means[k] = {m: _mean_ignoring_nan(v) for m, v in figures.items()}
        means[k]["n_cases"] = int(np.sum(~np.isnan(np.asarray(figures["Dice"], dtype=float))))
    overall = {m: _mean_ignoring_nan([means[k][m] for k in labels]) for m in METRIC_NAMES}
    return means, overall


def evaluate_folder(
    reference_folder: str | Path,
    prediction_folder: str | Path,
    dataset_json: str | Path,
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Evaluate every reference case against the prediction of the same name.

    Returns ``{"prediction_folder", "metric_per_case": [{"case", "reference_file", "prediction_file",
    "metrics": {label: {...}}}], "mean": {label: {...}}, "foreground_mean": {...}, "ignored_predictions"}``.
    Raises :class:`EvaluationError` if a reference case has no prediction (all missing cases are listed).
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    labels, file_ending, content = read_dataset_json(dataset_json)
    references, predictions = match_cases(reference_folder, prediction_folder, file_ending)
    example = str(next(iter(references.values())))
    reader_class = determine_reader_writer_from_dataset_json(content, example, verbose=False)
    jobs = [(references[c], predictions[c], reader_class, list(labels), tolerance_mm, c) for c in references]
    if num_processes > 1:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            results = pool.map(_evaluate_case_star, jobs)
    else:
        results = [_evaluate_case_star(job) for job in jobs]
    per_case = [
        {"case": c, "reference_file": str(references[c]), "prediction_file": str(predictions[c]), "metrics": r}
        for c, r in zip(references, results)
    ]
    means, overall = summarize(per_case, list(labels))
    return {
        "prediction_folder": str(prediction_folder),
        "metric_per_case": per_case,
        "mean": means,
        "foreground_mean": overall,
        "ignored_predictions": sorted(predictions.keys() - references.keys()),
    }


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, scale: float = 1.0) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value * scale:.2f}"


def results_table(
    runs: Mapping[str, Mapping[str, Any]],
    labels: Mapping[int, str],
    metric: str,
    protocol: Protocol | None = None,
) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, sources) of one metric's table: a row per run, then the protocol's published rows.

    Columns: Method, one per class of ``labels`` (dataset.json names, id order), Mean. Dice and NSD in % (2
    decimals), HD95 in mm; "-" where there is no value. ``sources`` has one entry per row ("" for own runs).
    """
    assert metric in METRIC_NAMES, f"metric must be one of {METRIC_NAMES}, got {metric!r}"
    header = ["Method", *labels.values(), "Mean"]
    rows, sources = [], []
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    for name, result in runs.items():
        cells = [_fmt(result["mean"][k][metric], scale) for k in labels]
        rows.append([name, *cells, _fmt(result["foreground_mean"][metric], scale)])
        sources.append("")
    if protocol is not None:
        for row in protocol.rows:
            if row.metric == metric:  # published values are already in %
                rows.append([f"{row.method} (published)", *(_fmt(row.values.get(k)) for k in labels), _fmt(row.mean)])
                sources.append(row.source)
    return header, rows, sources


def format_markdown(header: Sequence[str], rows: Sequence[Sequence[str]], sources: Sequence[str]) -> str:
    """A Markdown table, followed by the sources of published rows as a list."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    cited = [f"- {row[0]}: {src}" for row, src in zip(rows, sources) if src]
    if cited:
        lines += ["", "Sources:", *cited]
    return "\n".join(lines) + "\n"


def format_csv(header: Sequence[str], rows: Sequence[Sequence[str]], sources: Sequence[str]) -> str:
    """The same table as CSV, with a last column ``Source`` (empty for own runs)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*header, "Source"])
    writer.writerows([*row, src] for row, src in zip(rows, sources))
    return buffer.getvalue()


def _metric_title(metric: str, tolerance_mm: float) -> str:
    return {"Dice": "Dice (%)", "NSD": f"NSD (%) at {tolerance_mm:g} mm", "HD95": "HD95 (mm)"}[metric]


def _json_ready(obj: Any) -> Any:
    """Integer dict keys -> strings, numpy scalars -> Python numbers (NaN/inf kept, as nnU-Net's summary.json)."""
    if isinstance(obj, Mapping):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def run_evaluation(
    reference_folder: str | Path,
    prediction_folders: Sequence[str | Path],
    dataset_json: str | Path,
    output_folder: str | Path,
    names: Sequence[str] | None = None,
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    protocol_name: str | None = None,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Evaluate several runs, write ``evaluation.json``, ``tables.md`` and ``table_<metric>.csv``; return the JSON."""
    names = list(names) if names else [Path(p).name for p in prediction_folders]
    if len(names) != len(prediction_folders):
        raise EvaluationError(f"{len(names)} names for {len(prediction_folders)} prediction folders")
    if len(set(names)) != len(names):
        raise EvaluationError(f"row names must be unique, got {names} (use --names)")
    if not (tolerance_mm >= 0 and math.isfinite(tolerance_mm)):
        raise EvaluationError(f"NSD tolerance must be a finite number >= 0 mm, got {tolerance_mm}")
    labels, file_ending, _ = read_dataset_json(dataset_json)
    protocol = check_protocol_labels(protocol_name, labels) if protocol_name else None
    for folder in prediction_folders:  # fail before the (long) evaluation of the first run
        match_cases(reference_folder, folder, file_ending)
    runs = {
        name: evaluate_folder(reference_folder, folder, dataset_json, tolerance_mm, num_processes)
        for name, folder in zip(names, prediction_folders)
    }
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    markdown = []
    for metric in METRIC_NAMES:
        table = results_table(runs, labels, metric, protocol)
        markdown.append(f"## {_metric_title(metric, tolerance_mm)}\n\n" + format_markdown(*table))
        (output_folder / f"table_{metric}.csv").write_text(format_csv(*table))
    (output_folder / "tables.md").write_text("\n".join(markdown))
    summary = {
        "settings": {
            "reference_folder": str(reference_folder),
            "dataset_json": str(dataset_json),
            "nsd_tolerance_mm": tolerance_mm,
            "protocol": protocol_name,
            "conventions": "see nnunet_sam.evaluation.metrics: Dice/NSD NaN if reference and prediction are empty, "
            "0 if "
            "exactly one is; HD95 NaN / inf likewise; means ignore NaN",
        },
        "labels": labels,
        "runs": runs,
        "published_rows": [] if protocol is None else [asdict(r) for r in protocol.rows],
    }
    with open(output_folder / "evaluation.json", "w") as f:
        json.dump(_json_ready(summary), f, indent=2)
    return summary
